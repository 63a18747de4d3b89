"""The PPO run's guards, in one place: non-finite values, the KL hard limit, and the drift checks.

Every guard stops the run the same way: a :class:`~preftune.errors.PreftuneError` with exit code
``TRAINING_DIVERGED`` (12) that names the last good checkpoint, which is kept. Under data
parallelism a guard is decided collectively -- when one process has a problem every process
raises, since a lone raise would leave the others waiting in an all-reduce.

The drift checks (:mod:`preftune.ppo.drift`) read the metric history: length drift, repetition
drift and reward divergence (reward up while the independent judge's preferred share stays
flat), each ``off``, ``warn`` (once per run) or ``stop``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from preftune.errors import ExitCode, PreftuneError
from preftune.ppo import drift
from preftune.ppo.config import PPOSection
from preftune.ppo.distributed import DistContext

log = logging.getLogger(__name__)


def all_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


class Guards:
    """Stops a run that went wrong; ``last_checkpoint`` says where a rerun will resume from."""

    def __init__(self, settings: PPOSection, dist: DistContext, last_checkpoint: Callable[[], str | None]) -> None:
        self.s = settings
        self.dist = dist
        self.last_checkpoint = last_checkpoint
        self.warned: set[str] = set()

    def diverged(self, update: int, what: str) -> None:
        where = self.last_checkpoint() or "none written yet"
        raise PreftuneError(
            f"training diverged at update {update}/{self.s.updates}: {what}; the last good checkpoint ({where}) is "
            "kept. Lower ppo.lr or raise ppo.kl_coef, check the reward model, then rerun (it resumes from there)",
            ExitCode.TRAINING_DIVERGED,
        )

    def check(self, update: int, problem: str | None) -> None:
        """Stop on ``problem`` -- on every process when one has it."""
        if self.dist.any(problem is not None) and problem is None:
            problem = "another process hit a non-finite value"
        if problem:
            self.diverged(update, problem)

    def finite(self, update: int, what: str, *tensors: torch.Tensor) -> None:
        """Stop when any of ``tensors`` holds a NaN or an infinity (``what`` names them)."""
        self.check(update, None if all(all_finite(t) for t in tensors) else what)

    def kl_limit(self, update: int, mean_kl: float) -> None:
        """Stop when the mean KL to the reference passed ``ppo.kl_hard_limit`` (or is not a number)."""
        if not math.isfinite(mean_kl) or mean_kl > self.s.kl_hard_limit:
            self.diverged(
                update, f"KL to the reference is {mean_kl:.3f} nats, past ppo.kl_hard_limit={self.s.kl_hard_limit}"
            )

    def drift(self, update: int, history: list[dict[str, Any]]) -> None:
        """The drift guards on the history so far: flag the last row, warn once each, or stop (exit 12)."""
        s, h = self.s, history
        w = s.drift_window
        checks = [
            # length drift: the reward model may pay for long (or short) answers instead of the behaviour
            (
                "length_drift",
                s.length_drift_guard,
                lambda: drift.length_drift([m.get("ppo/response_length") for m in h], w, s.max_length_drift),
            ),
            # repetition drift: degenerate loops the reward model happens to score well
            (
                "repetition_drift",
                s.repetition_drift_guard,
                lambda: drift.repetition_drift([m.get("ppo/repetition") for m in h], w, s.max_repetition_rise),
            ),
            # reward up, judged behaviour flat: the policy games the reward model (reward hacking)
            (
                "reward_divergence",
                s.reward_divergence_guard,
                lambda: drift.reward_divergence(
                    [m.get("ppo/reward_mean") for m in h],
                    [m.get("ppo/judged_preferred_share") for m in h],
                    w,
                    s.divergence_min_reward_rise,
                    s.divergence_min_judged_rise,
                ),
            ),
        ]
        for name, mode, measure in checks:
            problem = measure() if mode != "off" else None
            if problem is None:
                continue
            h[-1][f"ppo/guard/{name}"] = 1.0
            if mode == "stop":
                self.diverged(update, f"{name} guard: {problem}")
            if name not in self.warned and self.dist.is_main:
                self.warned.add(name)
                log.warning("update %d: %s: %s (ppo.%s_guard: warn)", update, name, problem, name)
