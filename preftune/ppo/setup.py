"""What the PPO trainer is built with, from :class:`~preftune.ppo.config.PPOSection`: the batch layout and its
checks, the mini-batch stream, the optimiser's parameter groups, the learning-rate schedule and the KL controller.

Kept out of :mod:`preftune.ppo.trainer` so that the trainer holds the update and the loop only;
every number here comes from the typed config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from preftune.errors import ExitCode, PreftuneError
from preftune.ppo import core
from preftune.ppo.config import PPOSection
from preftune.ppo.estimators import EstimatorSpec
from preftune.ppo.policy import ActorCritic

__all__ = ["MiniBatches", "check_layout", "kl_horizon", "make_kl_controller", "make_optimizer", "make_scheduler"]


def check_layout(s: PPOSection, estimator: EstimatorSpec, actor: ActorCritic, world_size: int) -> None:
    """Refuse a batch that does not split over the processes, or an estimator that does not fit the actor."""
    if s.batch_size % world_size:
        raise PreftuneError(
            f"ppo.batch_size ({s.batch_size}) must be divisible by the number of processes ({world_size})",
            ExitCode.CONFIG,
        )
    if estimator.needs_critic != (actor.value_head is not None):
        raise PreftuneError(
            f"ppo.advantage_estimator {s.advantage_estimator!r} "
            + (
                "needs a critic, but the actor has no value head"
                if estimator.needs_critic
                else "is critic-free, but the actor has a value head (build it with critic='none')"
            ),
            ExitCode.CONFIG,
        )
    if (s.batch_size // s.samples_per_prompt) % world_size:
        raise PreftuneError(
            f"ppo.batch_size / ppo.samples_per_prompt ({s.batch_size // s.samples_per_prompt} prompts) must be "
            f"divisible by the number of processes ({world_size}): each process rolls out whole groups",
            ExitCode.CONFIG,
        )


@dataclass
class MiniBatches:
    """This process's mini-batches of a rollout: ``ppo.mini_batch_size`` split over the processes, each split
    again into ``ppo.grad_accum_steps`` micro-batches (gradient accumulation)."""

    local_mini: int
    micro: int
    device: torch.device
    shuffle: torch.Generator  # the checkpointed shuffling stream (preftune.ppo.state.RandomStreams)

    @classmethod
    def of(cls, s: PPOSection, world_size: int, device: torch.device, shuffle: torch.Generator) -> MiniBatches:
        local_mini = max(1, s.mini_batch_size // world_size)
        return cls(local_mini, max(1, local_mini // s.grad_accum_steps), device, shuffle)

    def epoch(self, batch_size: int) -> list[torch.Tensor]:
        """One epoch's mini-batches: row indices of a fresh random permutation, ``local_mini`` at a time."""
        perm = torch.randperm(batch_size, generator=self.shuffle)
        step = self.local_mini
        return [perm[start : start + step].to(self.device) for start in range(0, batch_size, step)]

    def micro_batches(self, mb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return mb.split(self.micro)


def make_optimizer(s: PPOSection, actor: ActorCritic) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: no weight decay on biases and norms, the value head at its own lr."""
    decay, no_decay, head = [], [], []
    for name, p in actor.trainable_named_parameters():
        if name.startswith("value_head."):
            head.append(p)
        elif p.ndim < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": s.weight_decay, "lr": s.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": s.lr},
        {"params": head, "weight_decay": 0.0, "lr": s.lr * s.value_head_lr_ratio},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=s.lr, eps=s.adam_eps)


def make_scheduler(s: PPOSection, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda u: core.lr_multiplier(u, s.updates, s.warmup_updates, s.lr_schedule, s.min_lr_ratio),
    )  # trick: lr warm-up then decay, per update


def kl_horizon(s: PPOSection) -> float:
    """The adaptive controller's horizon in responses: ``ppo.kl_horizon``, or with 'auto' the run's responses
    (``updates`` x ``batch_size``) over ``kl_horizons_per_run``: the controller's reach then follows the run's
    length (``updates`` may grow on resume, and the horizon with it, like the lr schedule)."""
    if s.kl_horizon == "auto":
        return s.updates * s.batch_size / s.kl_horizons_per_run
    return float(s.kl_horizon)


def make_kl_controller(s: PPOSection) -> core.KLController:
    if s.kl_controller == "adaptive":
        return core.AdaptiveKLController(
            s.kl_coef,
            s.kl_target,
            kl_horizon(s),
            s.kl_error_clip,
            s.kl_controller_step,
            s.kl_target_ramp * s.updates,
            s.kl_damping,
            s.kl_damping_smoothing,
        )  # trick: log-space step, a horizon tied to the run's length and a ramped target give the controller reach
    return core.FixedKLController(s.kl_coef)
