"""What a resumed PPO run needs to continue exactly where it stopped: random streams and checkpoints.

Three random streams per process, each seeded from ``(run seed, stream, rank)`` with numpy's
``SeedSequence`` so that they are independent and reproducible: sampling (the rollout's
``torch.multinomial``), shuffling (the PPO epochs' mini-batch order), and the global generators
(Python, numpy, torch, CUDA) that library code may touch. A checkpoint holds all of them for every
process, with the trainable weights, optimiser, scheduler, KL controller, prompt stream and metric
history (:class:`TrainingState`, behind :meth:`preftune.ppo.trainer.PPOTrainer.state_dict`), so a
run killed at update ``n`` and resumed produces the same figures as one that was never stopped.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preftune.errors import ExitCode, PreftuneError
from preftune.ppo.checkpoint import STATE_FILE, CheckpointStore
from preftune.ppo.distributed import DistContext

SAMPLE_STREAM = 1
SHUFFLE_STREAM = 2


def stream_seed(seed: int, stream: int, rank: int) -> int:
    """Independent, reproducible seeds per random stream and process (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, stream, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def global_rng_state() -> dict[str, Any]:
    """Python's, numpy's, torch's (and CUDA's) global generators, as tensors and plain values."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy_key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
        "numpy_pos": int(np_state["state"]["pos"]),
        "numpy_has_gauss": int(np_state["has_gauss"]),
        "numpy_gauss": float(np_state["gauss"]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": state["numpy_key"].numpy().astype(np.uint32), "pos": state["numpy_pos"]},
            "has_gauss": state["numpy_has_gauss"],
            "gauss": state["numpy_gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RandomStreams:
    """This process's sampling and shuffling generators, and the per-rank state of every process."""

    def __init__(self, seed: int, dist: DistContext) -> None:
        self.dist = dist
        self.sample = torch.Generator().manual_seed(stream_seed(seed, SAMPLE_STREAM, dist.rank))
        self.shuffle = torch.Generator().manual_seed(stream_seed(seed, SHUFFLE_STREAM, dist.rank))

    def mine(self) -> dict[str, Any]:
        return {
            "sample_gen": self.sample.get_state(),
            "shuffle_gen": self.shuffle.get_state(),
            "rng": global_rng_state(),
        }

    def gather(self) -> list[dict[str, Any]]:
        """Every process's random streams (they differ per rank), in rank order (collective)."""
        return self.dist.gather_objects(self.mine())

    def load(self, per_rank: list[dict[str, Any]]) -> None:
        if len(per_rank) != self.dist.world_size:
            raise PreftuneError(
                f"the checkpoint was written by {len(per_rank)} process(es), this run has {self.dist.world_size}; "
                "resume with the same number of processes (or start over with --no-resume)",
                ExitCode.CONFIG,
            )
        mine = per_rank[self.dist.rank]
        self.sample.set_state(mine["sample_gen"])
        self.shuffle.set_state(mine["shuffle_gen"])
        set_global_rng_state(mine["rng"])


def write_checkpoint(
    store: CheckpointStore, update: int, state: dict[str, Any], save_adapter: Callable[[Path], None] | None
) -> str:
    """Publish ``state`` (and the LoRA adapter folder, when there is one) as checkpoint ``update``."""

    def write(folder: Path) -> None:
        torch.save(state, folder / STATE_FILE)
        if save_adapter is not None:
            save_adapter(folder / "adapter")

    return store.save(update, write)


def read_checkpoint(local: Path) -> dict[str, Any]:
    return torch.load(local / STATE_FILE, map_location="cpu", weights_only=True)


@dataclass
class TrainingState:
    """The stateful parts of a PPO run, saved and loaded together (the trainer adds the update and history)."""

    actor: Any  # preftune.ppo.policy.ActorCritic
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    kl_ctl: Any  # preftune.ppo.core.KLController
    sampler: Any  # preftune.ppo.rollout.PromptSampler
    streams: RandomStreams

    def state_dict(self, update: int, history: list[dict[str, float]], *, with_optimizer: bool) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly at ``update`` (collective: gathers the streams)."""
        return {
            "update": update,
            "trainable": self.actor.trainable_state(),
            "optimizer": self.optimizer.state_dict() if with_optimizer else None,
            "scheduler": self.scheduler.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "sampler": self.sampler.state_dict(),
            "per_rank": self.streams.gather(),
            "history": [dict(h) for h in history],
        }

    def load_state_dict(self, saved: dict[str, Any]) -> tuple[int, list[dict[str, float]]]:
        """Restore every part from ``saved``; returns (update, history) for the trainer."""
        self.actor.load_trainable_state(saved["trainable"])
        if saved["optimizer"] is not None:
            self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.kl_ctl.load_state_dict(saved["kl_ctl"])
        self.sampler.load_state_dict(saved["sampler"])
        self.streams.load(saved["per_rank"])
        return int(saved["update"]), [dict(h) for h in saved["history"]]

    def write(self, store: CheckpointStore, update: int, saved: dict[str, Any]) -> str:
        """Publish ``saved`` as checkpoint ``update``, with the LoRA adapter folder when the actor has one."""
        lora = self.actor.mode == "lora"
        save_adapter = (lambda folder: self.actor.model.save_pretrained(str(folder))) if lora else None
        return write_checkpoint(store, update, saved, save_adapter)
