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

This module keeps the update and the loop; around it, one module per concern (like OpenRLHF's
``ppo_utils``): :mod:`~preftune.ppo.rollout` (prompt stream, experience making, the
advantage-estimator call), :mod:`~preftune.ppo.setup` (batch layout, optimiser, schedule, KL
controller), :mod:`~preftune.ppo.warmup` (critic warm-up), :mod:`~preftune.ppo.guards`
(non-finite values, KL limit, drift), :mod:`~preftune.ppo.distributed` (every collective),
:mod:`~preftune.ppo.state` (random streams, checkpoints), :mod:`~preftune.ppo.metrics`,
:mod:`~preftune.ppo.reporting` (callbacks, progress bar) and :mod:`~preftune.ppo.sigterm`.
Each RLHF trick is named where it happens (``# trick: ...``); every number comes from
:class:`~preftune.ppo.config.PPOSection`. :class:`PPOTrainer` is a little over 300 lines on
purpose: the micro-step, the epochs over mini-batches and the loop are the algorithm, read in one
place; everything else is in the modules above.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preftune.errors import ExitCode, PreftuneError
from preftune.ppo import core, estimators, setup, state, warmup
from preftune.ppo.checkpoint import CheckpointInfo, CheckpointStore
from preftune.ppo.config import PPOSection
from preftune.ppo.demonstrations import DemonstrationSampler
from preftune.ppo.distributed import DistContext
from preftune.ppo.guards import Guards, all_finite
from preftune.ppo.metrics import update_metrics
from preftune.ppo.policy import ActorCritic
from preftune.ppo.reporting import Callback, Reporter, UpdateEvent
from preftune.ppo.rollout import JudgeFn, PromptItem, PromptSampler, RewardFn, Rollout, RolloutMaker
from preftune.ppo.sigterm import EXIT_TERMINATED, Terminated, install_sigterm

__all__ = ["EXIT_TERMINATED", "Callback", "JudgeFn", "PPOTrainer", "PromptItem", "PromptSampler", "RewardFn"]
__all__ += ["Rollout", "Terminated", "TrainResult", "UpdateEvent", "install_sigterm"]

SECONDS_PER_MINUTE = 60.0


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
        demonstrations: DemonstrationSampler | None = None,
    ) -> None:
        s = self.s = settings
        self.actor = actor
        self.tok = tokenizer
        self.prompts = list(prompts)
        self.families = sorted({p.family for p in self.prompts})  # for the per-family reward metrics
        self.judge_fn = judge_fn  # an independent judge of the rollout responses (reward-divergence guard)
        self.demos = demonstrations if settings.demonstration_coef > 0 else None  # the raters' written answers
        self._micro_count = 0  # micro-steps of this update (seeds the demonstration draw)
        self.seed = seed
        self.device = device
        self.checkpoints = checkpoints
        self.callbacks = list(callbacks)
        self.progress = settings.progress if progress is None else progress
        self.dist = DistContext.of(rank, world_size)
        self.world_size, self.rank = world_size, rank
        self.estimator = estimators.get(s.advantage_estimator)
        setup.check_layout(s, self.estimator, actor, world_size)

        self.update_idx = 0
        self.history: list[dict[str, float]] = []
        self.last_checkpoint: str | None = None
        self.terminate_requested = False
        self.guards = Guards(settings, self.dist, lambda: self.last_checkpoint)
        self.streams = state.RandomStreams(seed, self.dist)
        self.batches = setup.MiniBatches.of(s, world_size, device, self.streams.shuffle)
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
        self.kl_ctl = setup.make_kl_controller(s)
        self.optimizer = setup.make_optimizer(s, actor)
        self.scheduler = setup.make_scheduler(s, self.optimizer)
        self.training_state = state.TrainingState(
            actor, self.optimizer, self.scheduler, self.kl_ctl, self.sampler, self.streams
        )
        self.reporter = Reporter(s, self.callbacks, main=rank == 0, progress=self.progress)
        self._ddp_params = [p for _, p in self.actor.trainable_named_parameters()]
        self.engine: Any = None  # DeepSpeed engine when ppo.deepspeed_config is set (attach_engine)
        self.warmup_losses: list[float] = []  # critic warm-up value losses (ppo.critic_warmup_updates)

    def attach_engine(self, engine: Any) -> None:
        """Use a DeepSpeed engine (``preftune.ppo.zero``) for backward, gradient reduction, clipping and step."""
        self.engine = engine

    def broadcast_parameters(self) -> None:
        """Data parallel: start every process from rank 0's trainable weights."""
        self.dist.broadcast_parameters(self._ddp_params)

    @property
    def last_samples(self) -> list[dict[str, Any]]:
        return self.reporter.last_samples

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

    def warmup_critic(self) -> list[float]:
        """``critic_warmup_updates`` critic-only updates, the policy frozen (:mod:`preftune.ppo.warmup`)."""
        if self.engine is not None:
            raise PreftuneError("ppo.critic_warmup_updates is not supported with ppo.deepspeed_config", ExitCode.CONFIG)
        self.warmup_losses = warmup.warmup_critic(
            self.s,
            self.actor,
            lambda: self.rollout(self._next_items(), 0),
            self.kl_ctl.value,
            self.batches,
            self.guards,
            self.dist,
            self._autocast,
        )
        self.optimizer.zero_grad(set_to_none=True)
        return self.warmup_losses

    # -- update ----------------------------------------------------------------------------

    def _micro_step(self, ro: Rollout, idx: torch.Tensor, update: int) -> dict[str, torch.Tensor]:
        s = self.s
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
        if self.demos is not None:
            demo_nll = self._demonstration_nll(update)
            loss = loss + s.demonstration_coef * demo_nll  # trick: demonstration term (PPO-ptx on written answers)
            out["demonstration_nll"] = demo_nll.detach()

        def value_loss(v: torch.Tensor) -> core.ValueLossOutput:
            old, ret = ro.values[idx, :r_len], ro.returns[idx, :r_len]  # type: ignore[index]
            return core.value_loss(v.float(), old, ret, mask, s.clip_range_value)

        if self.actor.value_head is None or ro.values is None:  # no critic: the policy loss alone
            self._backward(update, loss, lambda: f"policy loss became {float(loss)}")
            return out
        if values is None:
            # separate critic: its own forward and backward (its parameters are disjoint from the policy's)
            self._backward(update, loss, lambda: f"policy loss became {float(loss)}")
            with self._autocast():
                vf = value_loss(self.actor.critic_forward(seq, attn, r_len))
            self._backward(update, s.vf_coef * vf.loss, lambda: f"value loss became {float(vf.loss)}")
        else:
            vf = value_loss(values)
            loss = loss + s.vf_coef * vf.loss  # trick: value loss with its own coefficient
            self._backward(
                update, loss, lambda: f"loss became {float(loss)} (policy {float(pg.loss)}, value {float(vf.loss)})"
            )
        out.update(value_loss=vf.loss.detach(), value_clip_frac=vf.clip_frac)
        return out

    def _demonstration_nll(self, update: int) -> torch.Tensor:
        """Mean per-token negative log-likelihood of this micro-step's written answers under the policy."""
        assert self.demos is not None
        self._micro_count += 1
        b = self.demos.draw(update, self._micro_count * self.world_size + self.rank)  # each process its own draw
        r_len = b.response_ids.shape[1]
        with self._autocast():
            logits, _ = self.actor.policy_forward(b.input_ids, b.attention_mask, r_len)
        return -core.masked_mean(core.logprobs_from_logits(logits, b.response_ids), b.response_mask)

    def _backward(self, update: int, loss: torch.Tensor, problem: Callable[[], str]) -> None:
        """Stop on a non-finite ``loss`` (on every process), else backward its share of the accumulated mini-batch
        (``loss.backward()`` or the DeepSpeed engine's)."""
        self.guards.check(update, None if all_finite(loss) else problem())
        scaled = loss / self.s.grad_accum_steps  # trick: gradient accumulation
        if self.engine is None:
            scaled.backward()
        else:
            self.engine.backward(scaled, scale_wrt_gas=False)

    def _optimizer_step(self, update: int) -> float:
        """Reduce, clip and apply one mini-batch's accumulated gradients; returns the gradient norm."""
        if self.engine is not None:  # DeepSpeed reduced, clipped (gradient_clipping) and stepped already
            grad_norm = torch.as_tensor(float(self.engine.get_global_grad_norm() or 0.0))
        else:
            params = self._ddp_params
            self.dist.average_gradients(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.s.max_grad_norm)  # trick: grad-norm clipping
        self.guards.check(update, None if all_finite(grad_norm) else f"gradient norm became {float(grad_norm)}")
        if self.engine is None:
            self.optimizer.step()
        return float(grad_norm)

    def update(self, ro: Rollout, update: int) -> dict[str, float]:
        """PPO epochs over shuffled mini-batches of the rollout; returns averaged statistics."""
        s = self.s
        self.actor.train()
        sums: dict[str, float] = {}
        grad_norms: list[float] = []
        early_stopped = 0.0
        self._micro_count = 0
        for _epoch in range(s.ppo_epochs):
            for mb in self.batches.epoch(ro.batch_size):  # trick: fresh shuffle of mini-batches per epoch
                self.optimizer.zero_grad(set_to_none=True)
                mb_stats: dict[str, float] = {}
                micros = self.batches.micro_batches(mb)
                for micro in micros:
                    micro_stats = self._micro_step(ro, micro, update)
                    if self.engine is not None:
                        self.engine.step()  # DeepSpeed counts micro-steps; it steps at the accumulation boundary
                    for k, v in micro_stats.items():
                        mb_stats[k] = mb_stats.get(k, 0.0) + float(v) / len(micros)
                grad_norms.append(self._optimizer_step(update))
                for k, v in mb_stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                approx_kl = self.dist.mean(mb_stats["approx_kl"])  # every process decides alike
                if s.approx_kl_stop is not None and approx_kl > s.approx_kl_stop:
                    early_stopped = 1.0  # trick: early stop of the PPO epochs when the policy moved too far
                    break
            if early_stopped:
                break
        self.optimizer.zero_grad(set_to_none=True)
        n_steps = len(grad_norms)
        stats = {k: v / max(1, n_steps) for k, v in sums.items()}
        stats["grad_norm"] = float(np.mean(grad_norms)) if grad_norms else 0.0
        stats["optimizer_steps"] = float(n_steps)
        stats["early_stopped"] = early_stopped
        return stats

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly where this one stands (collective)."""
        # under DeepSpeed the optimiser state is per-process ZeRO partitions: not kept (moments restart)
        return self.training_state.state_dict(self.update_idx, self.history, with_optimizer=self.engine is None)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.update_idx, self.history = self.training_state.load_state_dict(saved)

    def save_checkpoint(self) -> str | None:
        if self.checkpoints is None:
            return None
        saved = self.state_dict()  # collective: every process contributes its random streams
        if self.rank == 0:
            self.last_checkpoint = self.training_state.write(self.checkpoints, self.update_idx, saved)
            return self.last_checkpoint
        return None

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
        self.reporter.open(start_update)
        try:
            for u in range(start_update + 1, s.updates + 1):  # 1-based, for people
                # 1. rollout: sample, score, per-token rewards with the KL penalty, advantages (no gradient)
                t0 = time.perf_counter()
                ro = self.rollout(self._next_items(), u)
                t1 = time.perf_counter()
                mean_kl = self.dist.mean(float(ro.kl.sum(dim=1).mean()))
                self.guards.kl_limit(u, mean_kl)  # guard: KL hard limit (stop, keep the last good checkpoint)
                # 2. update: clipped PPO epochs over shuffled mini-batches
                train_stats = self.update(ro, u)
                t2 = time.perf_counter()
                # 3. bookkeeping: KL controller, lr schedule, metrics, guards, checkpoint, time budget, SIGTERM
                kl_coef_used, lr_used = self.kl_ctl.value, self.optimizer.param_groups[0]["lr"]
                self.kl_ctl.update(mean_kl, s.batch_size)  # trick: adaptive KL controller (Ziegler et al.)
                self.scheduler.step()
                self.update_idx = u
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
                if u == 1 and self.warmup_losses:
                    metrics["ppo/critic_warmup_loss_first"] = self.warmup_losses[0]
                    metrics["ppo/critic_warmup_loss_last"] = self.warmup_losses[-1]
                self.history.append({"update": float(u), **metrics})
                self.guards.drift(u, self.history)  # guard: length drift, repetition drift, reward divergence
                elapsed = time.perf_counter() - t_start
                out_of_time = s.max_minutes is not None and elapsed >= SECONDS_PER_MINUTE * s.max_minutes
                self.reporter.report(u, ro, metrics)
                if u % s.checkpoint_every == 0 or u == s.updates or out_of_time:
                    self.save_checkpoint()
                if self.dist.any(out_of_time):  # time budget (ppo.max_minutes): a clean, early end
                    break
                if self.dist.any(self.terminate_requested):
                    self._terminate()
        finally:
            self.reporter.close()
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

    def _terminate(self) -> None:
        s = self.s
        if self.update_idx % s.checkpoint_every and self.update_idx != s.updates:
            self.save_checkpoint()
        raise Terminated(
            f"stopped by SIGTERM after update {self.update_idx}/{s.updates}; checkpoint "
            f"{self.last_checkpoint or '(none: no checkpoint store)'} written; rerun the same command to resume"
        )
