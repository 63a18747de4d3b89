"""Where an update's figures go on process 0: the callbacks (MLflow, Prometheus; :mod:`preftune.ppo.observe`)
and the progress bar, with a table of generations every ``ppo.samples_every`` updates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from preftune.ppo.config import PPOSection
from preftune.ppo.metrics import sample_table
from preftune.ppo.rollout import Rollout

__all__ = ["Callback", "Reporter", "UpdateEvent"]


@dataclass
class UpdateEvent:
    """What callbacks get after each update."""

    update: int  # 1-based
    total: int
    metrics: dict[str, float]
    samples: list[dict[str, Any]] | None  # a table of generations, every ``samples_every`` updates


class Callback(Protocol):
    def on_update(self, event: UpdateEvent) -> None: ...


class Reporter:
    """Process 0's callbacks and progress bar; ``callbacks`` is the trainer's list (a step may append to it)."""

    def __init__(self, settings: PPOSection, callbacks: list[Callback], *, main: bool, progress: bool) -> None:
        self.s = settings
        self.callbacks = callbacks
        self.main = main
        self.progress = progress
        self.bar: Any = None
        self.last_samples: list[dict[str, Any]] = []

    def open(self, start_update: int) -> None:
        if not self.main:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=self.s.updates,
            initial=start_update,
            desc="ppo",
            unit="update",
            dynamic_ncols=True,
            disable=not self.progress,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def report(self, update: int, ro: Rollout, metrics: dict[str, float]) -> None:
        """The metrics (and every ``samples_every`` updates a table of generations) to the callbacks."""
        if not self.main:
            return
        s = self.s
        due_table = update % s.samples_every == 0 or update == s.updates
        self.last_samples = sample_table(ro, s.samples_per_table)
        event = UpdateEvent(update, s.updates, metrics, self.last_samples if due_table else None)
        for cb in self.callbacks:
            cb.on_update(event)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(reward=f"{metrics['ppo/reward_mean']:.3f}", kl=f"{metrics['ppo/kl']:.3f}")
