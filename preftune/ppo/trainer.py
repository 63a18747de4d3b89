"""The PPO loop: rollout -> rewards with a KL leash -> advantages -> clipped PPO epochs, with guards.

Reads top to bottom like CleanRL's ``ppo.py``: :meth:`PPOTrainer.train` runs ``updates``
iterations of

1. **rollout** (:class:`~preftune.ppo.rollout.RolloutMaker`, no gradient): sample a response per
   prompt, score it, build per-token rewards with the KL penalty and the advantages;
2. **update** (:meth:`PPOTrainer.update`): ``ppo_epochs`` passes over shuffled mini-batches of the
   rollout, each mini-batch one optimiser step (with gradient accumulation and norm clipping),
   stopping early when the approximate KL to the rollout policy passes a bound;
3. **bookkeeping**: KL-controller update, metrics to the callbacks (MLflow, Prometheus, progress
   bar), a checkpoint every ``checkpoint_every`` updates, the guards, and a checkpoint then a
   clean exit on SIGTERM.

Around it, one module per concern (like OpenRLHF's ``ppo_utils``): :mod:`~preftune.ppo.rollout`
(prompt stream, experience making, the advantage-estimator call), :mod:`~preftune.ppo.guards`
(non-finite values, KL limit, drift), :mod:`~preftune.ppo.distributed` (every collective),
:mod:`~preftune.ppo.state` (random streams, checkpoints), :mod:`~preftune.ppo.metrics`.
Each RLHF trick is named where it happens (``# trick: ...``); every number comes from
:class:`~preftune.ppo.config.PPOSection`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from preftune.errors import ExitCode, PreftuneError
from preftune.ppo import core, estimators, state
from preftune.ppo.checkpoint import CheckpointInfo, CheckpointStore
from preftune.ppo.config import PPOSection
from preftune.ppo.distributed import DistContext
from preftune.ppo.guards import Guards, all_finite
from preftune.ppo.metrics import sample_table, update_metrics
from preftune.ppo.policy import ActorCritic
from preftune.ppo.rollout import JudgeFn, PromptItem, PromptSampler, RewardFn, Rollout, RolloutMaker

__all__ = [
    "EXIT_TERMINATED",
    "Callback",
    "JudgeFn",
    "PPOTrainer",
    "PromptItem",
    "PromptSampler",
    "RewardFn",
    "Rollout",
    "Terminated",
    "TrainResult",
    "UpdateEvent",
    "install_sigterm",
]

EXIT_TERMINATED = 143
"""Exit code after SIGTERM (128 + 15, what Kubernetes and shells expect): a checkpoint was written."""


@dataclass
class UpdateEvent:
    """What callbacks get after each update."""

    update: int  # 1-based
    total: int
    metrics: dict[str, float]
    samples: list[dict[str, Any]] | None  # a table of generations, every ``samples_every`` updates


class Callback(Protocol):
    def on_update(self, event: UpdateEvent) -> None: ...


@dataclass
class TrainResult:
    updates: int
    resumed_from: int | None
    history: list[dict[str, float]]
    seconds: float
    last_checkpoint: str | None
    kl_coef: float
    final: dict[str, float] = field(default_factory=dict)
    last_samples: list[dict[str, Any]] = field(default_factory=list)


class Terminated(PreftuneError):
    """SIGTERM arrived: a checkpoint was written, the process should exit."""

    exit_code = EXIT_TERMINATED


class PPOTrainer:
    """PPO for a causal LM against a text reward, as configured by a :class:`PPOSection`."""

    def __init__(
        self,
        settings: PPOSection,
        actor: ActorCritic,
        tokenizer: Any,
        reward_fn: RewardFn,
        prompts: Sequence[PromptItem],
        *,
        seed: int,
        device: torch.device,
        reward_stats: tuple[float, float] | None = None,
        checkpoints: CheckpointStore | None = None,
        callbacks: Sequence[Callback] = (),
        progress: bool | None = None,
        world_size: int = 1,
        rank: int = 0,
        judge_fn: JudgeFn | None = None,
    ) -> None:
        s = self.s = settings
        self.actor = actor
        self.tok = tokenizer
        self.prompts = list(prompts)
        self.families = sorted({p.family for p in self.prompts})  # for the per-family reward metrics
        self.judge_fn = judge_fn  # an independent judge of the rollout responses (reward-divergence guard)
        self.seed = seed
        self.device = device
        self.checkpoints = checkpoints
        self.callbacks = list(callbacks)
        self.progress = settings.progress if progress is None else progress
        self.dist = DistContext.of(rank, world_size)
        self.world_size, self.rank = world_size, rank
        if settings.batch_size % world_size:
            raise PreftuneError(
                f"ppo.batch_size ({settings.batch_size}) must be divisible by the number of processes ({world_size})",
                ExitCode.CONFIG,
            )
        self.estimator = estimators.get(s.advantage_estimator)
        if self.estimator.needs_critic != (actor.value_head is not None):
            raise PreftuneError(
                f"ppo.advantage_estimator {s.advantage_estimator!r} "
                + (
                    "needs a critic, but the actor has no value head"
                    if self.estimator.needs_critic
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
        self.local_mini = max(1, settings.mini_batch_size // world_size)
        self.micro = max(1, self.local_mini // settings.grad_accum_steps)

        self.update_idx = 0
        self.history: list[dict[str, float]] = []
        self.last_checkpoint: str | None = None
        self.terminate_requested = False
        self.last_samples: list[dict[str, Any]] = []
        self.guards = Guards(settings, self.dist, lambda: self.last_checkpoint)
        self.streams = state.RandomStreams(seed, self.dist)
        self.sampler = PromptSampler.for_prompts(self.prompts, seed, settings.balance_families)
        self.rollouts = RolloutMaker(
            settings,
            actor,
            tokenizer,
            reward_fn,
            device=device,
            generator=self.streams.sample,
            guards=self.guards,
            reward_stats=reward_stats,
        )
        self._autocast = self.rollouts.autocast
        self.kl_ctl: core.KLController = (
            core.AdaptiveKLController(s.kl_coef, s.kl_target, s.kl_horizon, s.kl_error_clip)
            if s.kl_controller == "adaptive"
            else core.FixedKLController(s.kl_coef)
        )
        self.optimizer = self._make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda u: core.lr_multiplier(u, s.updates, s.warmup_updates, s.lr_schedule, s.min_lr_ratio),
        )  # trick: lr warm-up then decay, per update
        self._ddp_params = [p for _, p in self.actor.trainable_named_parameters()]
        self.engine: Any = None  # DeepSpeed engine when ppo.deepspeed_config is set (attach_engine)
        self.warmup_losses: list[float] = []  # critic warm-up value losses (ppo.critic_warmup_updates)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        s = self.s
        decay, no_decay, head = [], [], []
        for name, p in self.actor.trainable_named_parameters():
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

    def attach_engine(self, engine: Any) -> None:
        """Use a DeepSpeed engine (``preftune.ppo.zero``) for backward, gradient reduction, clipping and step."""
        self.engine = engine

    def broadcast_parameters(self) -> None:
        """Data parallel: start every process from rank 0's trainable weights."""
        self.dist.broadcast_parameters(self._ddp_params)

    # -- rollout ---------------------------------------------------------------------------

    def _next_items(self) -> list[PromptItem]:
        """This process's share of the next rollout batch, from the (checkpointed) prompt stream.

        With ``samples_per_prompt`` k the stream hands out batch_size / k prompts and each is repeated
        k times, adjacently (a group never straddles two processes).
        """
        k = self.s.samples_per_prompt
        idx = self.sampler.take(self.s.batch_size // k)[self.rank :: self.world_size]
        return [self.prompts[i] for i in idx for _ in range(k)]  # trick: k samples per prompt (group estimators)

    def rollout(self, items: Sequence[PromptItem], update: int) -> Rollout:
        """Sample, score and compute advantages for one batch of prompts (no gradient)."""
        return self.rollouts.make(items, update, self.kl_ctl.value)

    # -- critic warm-up ----------------------------------------------------------------------

    def warmup_critic(self) -> list[float]:
        """``critic_warmup_updates`` critic-only updates on fresh rollouts, the policy frozen; returns the losses.

        Only the critic's own parameters (the value head; the critic adapter or copy of a separate
        critic) are in the warm-up's optimiser and get gradients, and its target is the Monte-Carlo
        return, so the first PPO update takes its advantages against a critic that already predicts
        the reward. The rollouts consume prompts and random streams like updates (a checkpoint after
        update 1 resumes exactly) but do not count in ``ppo.updates``.
        """
        s = self.s
        if self.engine is not None:
            raise PreftuneError("ppo.critic_warmup_updates is not supported with ppo.deepspeed_config", ExitCode.CONFIG)
        params = [p for _, p in self.actor.critic_named_parameters()]
        opt = torch.optim.AdamW(params, lr=s.lr * s.value_head_lr_ratio, eps=s.adam_eps)
        losses: list[float] = []
        for _ in range(s.critic_warmup_updates):
            ro = self.rollout(self._next_items(), 0)
            rewards, _ = core.per_token_rewards(ro.scores, ro.kl, ro.mask, self.kl_ctl.value)
            if s.whiten_rewards:
                rewards = core.masked_whiten(rewards, ro.mask, shift_mean=False)
            target = estimators.reward_to_go(rewards, ro.mask, s.gamma)  # trick: Monte-Carlo returns as the target
            self.actor.train()
            total, n = 0.0, 0
            for _epoch in range(s.ppo_epochs):
                perm = torch.randperm(ro.batch_size, generator=self.streams.shuffle)
                for start in range(0, ro.batch_size, self.local_mini):
                    mb = perm[start : start + self.local_mini].to(self.device)
                    opt.zero_grad(set_to_none=True)
                    for micro in mb.split(self.micro):
                        loss = self._critic_loss(ro, target, micro)
                        self.guards.check(0, None if all_finite(loss) else f"critic warm-up loss became {float(loss)}")
                        (loss / s.grad_accum_steps).backward()
                        total += float(loss.detach()) / math.ceil(len(mb) / self.micro)
                    self.dist.average_gradients(params)
                    torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                    opt.step()
                    n += 1
            losses.append(self.dist.mean(total / max(1, n)))
        self.optimizer.zero_grad(set_to_none=True)
        self.warmup_losses = losses
        return losses

    def _critic_loss(self, ro: Rollout, target: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        mask = ro.mask[idx]
        r_len = int(mask.sum(dim=1).max())
        mask = mask[:, :r_len]
        seq = torch.cat([ro.prompt_ids[idx], ro.response_ids[idx, :r_len]], dim=1)
        attn = torch.cat([ro.prompt_mask[idx], mask.long()], dim=1)
        with self._autocast():
            values = self.actor.critic_values(seq, attn, r_len).float()  # the policy's trunk gets no gradient
        return 0.5 * core.masked_mean((values - target[idx, :r_len]) ** 2, mask)  # trick: plain MSE in the warm-up

    # -- update ----------------------------------------------------------------------------

    def _micro_step(self, ro: Rollout, idx: torch.Tensor, update: int) -> dict[str, torch.Tensor]:
        s, check = self.s, self.guards.check
        mask = ro.mask[idx]
        # trim columns that are padding for every row of this micro-batch (less compute, same result)
        r_len = int(mask.sum(dim=1).max())
        p_mask = ro.prompt_mask[idx]
        p_start = int((p_mask.sum(dim=0) > 0).nonzero()[0]) if bool(p_mask.any()) else 0
        prompt_ids, p_mask = ro.prompt_ids[idx, p_start:], p_mask[:, p_start:]
        resp = ro.response_ids[idx, :r_len]
        mask = mask[:, :r_len]
        seq = torch.cat([prompt_ids, resp], dim=1)
        attn = torch.cat([p_mask, mask.long()], dim=1)
        with self._autocast():
            logits, values = self.actor.policy_forward(seq, attn, r_len)
        new_logprobs = core.logprobs_from_logits(logits, resp)
        pg = core.policy_loss(new_logprobs, ro.logprobs[idx, :r_len], ro.advantages[idx, :r_len], mask, s.clip_range)
        loss = pg.loss
        out = {
            "policy_loss": pg.loss.detach(),
            "clip_frac": pg.clip_frac,
            "approx_kl": pg.approx_kl,
            "ratio": pg.ratio_mean,
        }
        if s.entropy_coef > 0:
            entropy = core.masked_mean(core.entropy_from_logits(logits), mask)
            loss = loss - s.entropy_coef * entropy  # trick: entropy bonus
            out["train_entropy"] = entropy.detach()

        def value_loss(v: torch.Tensor) -> core.ValueLossOutput:
            old, ret = ro.values[idx, :r_len], ro.returns[idx, :r_len]  # type: ignore[index]
            return core.value_loss(v.float(), old, ret, mask, s.clip_range_value)

        if self.actor.value_head is None or ro.values is None:  # no critic: the policy loss alone
            check(update, None if all_finite(loss) else f"policy loss became {float(loss)}")
            self._backward(loss / s.grad_accum_steps)
            return out
        if values is None:
            # separate critic: its own forward and backward (its parameters are disjoint from the policy's)
            check(update, None if all_finite(loss) else f"policy loss became {float(loss)}")
            self._backward(loss / s.grad_accum_steps)
            with self._autocast():
                vf = value_loss(self.actor.critic_forward(seq, attn, r_len))
            v_total = s.vf_coef * vf.loss
            check(update, None if all_finite(v_total) else f"value loss became {float(vf.loss)}")
            self._backward(v_total / s.grad_accum_steps)
        else:
            vf = value_loss(values)
            loss = loss + s.vf_coef * vf.loss  # trick: value loss with its own coefficient
            ok = all_finite(loss)
            check(
                update, None if ok else f"loss became {float(loss)} (policy {float(pg.loss)}, value {float(vf.loss)})"
            )
            self._backward(loss / s.grad_accum_steps)  # trick: gradient accumulation
        out.update(value_loss=vf.loss.detach(), value_clip_frac=vf.clip_frac)
        return out

    def _backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, or the DeepSpeed engine's (the loss is already scaled for accumulation)."""
        if self.engine is None:
            loss.backward()
        else:
            self.engine.backward(loss, scale_wrt_gas=False)

    def update(self, ro: Rollout, update: int) -> dict[str, float]:
        """PPO epochs over shuffled mini-batches of the rollout; returns averaged statistics."""
        s = self.s
        self.actor.train()
        params = self._ddp_params
        sums: dict[str, float] = {}
        n_steps = 0
        grad_norms: list[float] = []
        early_stopped = 0.0
        B = ro.batch_size
        for _epoch in range(s.ppo_epochs):
            perm = torch.randperm(B, generator=self.streams.shuffle)  # trick: fresh shuffle of mini-batches per epoch
            stop = False
            for start in range(0, B, self.local_mini):
                mb = perm[start : start + self.local_mini].to(self.device)
                self.optimizer.zero_grad(set_to_none=True)
                mb_stats: dict[str, float] = {}
                for micro in mb.split(self.micro):
                    micro_stats = self._micro_step(ro, micro, update)
                    if self.engine is not None:
                        self.engine.step()  # DeepSpeed counts micro-steps; it steps at the accumulation boundary
                    for k, v in micro_stats.items():
                        mb_stats[k] = mb_stats.get(k, 0.0) + float(v) / math.ceil(len(mb) / self.micro)
                if self.engine is not None:  # DeepSpeed reduced, clipped (gradient_clipping) and stepped already
                    grad_norm = torch.as_tensor(float(self.engine.get_global_grad_norm() or 0.0))
                else:
                    self.dist.average_gradients(params)
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)  # trick: grad-norm clipping
                self.guards.check(update, None if all_finite(grad_norm) else f"gradient norm became {float(grad_norm)}")
                grad_norms.append(float(grad_norm))
                if self.engine is None:
                    self.optimizer.step()
                n_steps += 1
                for k, v in mb_stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                approx_kl = self.dist.mean(mb_stats["approx_kl"])
                if s.approx_kl_stop is not None and approx_kl > s.approx_kl_stop:
                    stop = True  # trick: early stop of the PPO epochs when the policy moved too far
                    early_stopped = 1.0
                    break
            if stop:
                break
        self.optimizer.zero_grad(set_to_none=True)
        stats = {k: v / max(1, n_steps) for k, v in sums.items()}
        stats["grad_norm"] = float(np.mean(grad_norms)) if grad_norms else 0.0
        stats["optimizer_steps"] = float(n_steps)
        stats["early_stopped"] = early_stopped
        return stats

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly where this one stands (collective)."""
        return {
            "update": self.update_idx,
            "trainable": self.actor.trainable_state(),
            # under DeepSpeed the optimiser state is per-process ZeRO partitions: not kept (moments restart)
            "optimizer": self.optimizer.state_dict() if self.engine is None else None,
            "scheduler": self.scheduler.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "sampler": self.sampler.state_dict(),
            "per_rank": self.streams.gather(),
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.actor.load_trainable_state(saved["trainable"])
        if saved["optimizer"] is not None:
            self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.kl_ctl.load_state_dict(saved["kl_ctl"])
        self.sampler.load_state_dict(saved["sampler"])
        self.streams.load(saved["per_rank"])
        self.update_idx = int(saved["update"])
        self.history = [dict(h) for h in saved["history"]]

    def save_checkpoint(self) -> str | None:
        if self.checkpoints is None:
            return None
        saved = self.state_dict()  # collective: every process contributes its random streams
        if self.rank != 0:
            return None
        lora = self.actor.mode == "lora"
        save_adapter = (lambda folder: self.actor.model.save_pretrained(str(folder))) if lora else None
        self.last_checkpoint = state.write_checkpoint(self.checkpoints, self.update_idx, saved, save_adapter)
        return self.last_checkpoint

    def resume(self, info: CheckpointInfo, local: Path) -> None:
        self.load_state_dict(state.read_checkpoint(local))
        self.last_checkpoint = info.uri

    # -- the loop --------------------------------------------------------------------------

    def train(self) -> TrainResult:
        s = self.s
        start_update = self.update_idx
        t_start = time.perf_counter()
        if start_update == 0 and s.critic_warmup_updates and self.actor.value_head is not None:
            self.warmup_critic()  # before update 1 only: a resumed run has the warmed-up critic in its checkpoint
        bar = self._progress_bar(start_update)
        try:
            while self.update_idx < s.updates:
                u = self.update_idx + 1  # 1-based, for people
                t0 = time.perf_counter()
                ro = self.rollout(self._next_items(), u)
                t1 = time.perf_counter()
                mean_kl = self.dist.mean(float(ro.kl.sum(dim=1).mean()))
                self.guards.kl_limit(u, mean_kl)
                train_stats = self.update(ro, u)
                t2 = time.perf_counter()
                kl_coef_used = self.kl_ctl.value
                self.kl_ctl.update(mean_kl, s.batch_size)  # trick: adaptive KL controller (Ziegler et al.)
                lr_used = self.optimizer.param_groups[0]["lr"]
                self.scheduler.step()
                self.update_idx += 1
                metrics = update_metrics(
                    s,
                    self.dist,
                    ro,
                    train_stats,
                    mean_kl=mean_kl,
                    kl_coef=kl_coef_used,
                    lr=lr_used,
                    rollout_s=t1 - t0,
                    update_s=t2 - t1,
                    families=self.families,
                    judge_fn=self.judge_fn,
                )
                if self.update_idx == 1 and self.warmup_losses:
                    metrics["ppo/critic_warmup_loss_first"] = self.warmup_losses[0]
                    metrics["ppo/critic_warmup_loss_last"] = self.warmup_losses[-1]
                self.history.append({"update": float(self.update_idx), **metrics})
                self.guards.drift(self.update_idx, self.history)
                out_of_time = s.max_minutes is not None and time.perf_counter() - t_start >= 60.0 * s.max_minutes
                if self.rank == 0:
                    self._report(ro, metrics, bar)
                if self.update_idx % s.checkpoint_every == 0 or self.update_idx == s.updates or out_of_time:
                    self.save_checkpoint()
                if self.dist.any(out_of_time):  # time budget (ppo.max_minutes): a clean, early end
                    break
                if self.dist.any(self.terminate_requested):
                    self._terminate()
        finally:
            if bar is not None:
                bar.close()
        self.dist.check_replicas(self._ddp_params)
        return TrainResult(
            updates=self.update_idx,
            resumed_from=start_update if start_update > 0 else None,
            history=self.history,
            seconds=time.perf_counter() - t_start,
            last_checkpoint=self.last_checkpoint,
            kl_coef=self.kl_ctl.value,
            final=dict(self.history[-1]) if self.history else {},
            last_samples=self.last_samples,
        )

    def _progress_bar(self, start_update: int) -> Any:
        if self.rank != 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=self.s.updates,
            initial=start_update,
            desc="ppo",
            unit="update",
            dynamic_ncols=True,
            disable=not self.progress,
        )

    def _report(self, ro: Rollout, metrics: dict[str, float], bar: Any) -> None:
        """Process 0: the metrics (and every ``samples_every`` updates a table of generations) to the callbacks."""
        s = self.s
        due_table = self.update_idx % s.samples_every == 0 or self.update_idx == s.updates
        self.last_samples = sample_table(ro, s.samples_per_table)
        event = UpdateEvent(self.update_idx, s.updates, metrics, self.last_samples if due_table else None)
        for cb in self.callbacks:
            cb.on_update(event)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['ppo/reward_mean']:.3f}", kl=f"{metrics['ppo/kl']:.3f}")

    def _terminate(self) -> None:
        s = self.s
        if self.update_idx % s.checkpoint_every and self.update_idx != s.updates:
            self.save_checkpoint()
        raise Terminated(
            f"stopped by SIGTERM after update {self.update_idx}/{s.updates}; checkpoint "
            f"{self.last_checkpoint or '(none: no checkpoint store)'} written; rerun the same command to resume"
        )


def install_sigterm(trainer: PPOTrainer) -> Callable[[], None]:
    """SIGTERM asks the trainer to checkpoint after the current update and exit; returns an undo."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
        trainer.terminate_requested = True

    signal.signal(signal.SIGTERM, handler)

    def undo() -> None:
        signal.signal(signal.SIGTERM, previous)

    return undo
