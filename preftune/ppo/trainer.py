"""The PPO loop: rollout -> rewards with a KL leash -> GAE -> clipped PPO epochs, with guards.

Reads top to bottom like CleanRL's ``ppo.py``: :meth:`PPOTrainer.train` runs ``updates``
iterations of

1. **rollout** (:meth:`PPOTrainer.rollout`, no gradient): sample a response per prompt (KV cache,
   stop at EOS), then ONE no-grad pass for the policy's log-probs and values and ONE for the
   reference's log-probs (two in total with the shared critic; a third for a separate critic),
   score the decoded texts with the reward model, build per-token rewards (score at the last token,
   -beta * KL on every token) and advantages (GAE);
2. **update** (:meth:`PPOTrainer.update`): ``ppo_epochs`` passes over shuffled mini-batches of the
   rollout, each mini-batch one optimiser step (with gradient accumulation and norm clipping),
   stopping early when the approximate KL to the rollout policy passes a bound;
3. **bookkeeping**: KL-controller update, metrics to the callbacks (MLflow, Prometheus, progress
   bar), a checkpoint every ``checkpoint_every`` updates, the divergence guards, and a checkpoint
   then a clean exit on SIGTERM.

Each RLHF trick is named where it happens (``# trick: ...``); every number comes from
:class:`~preftune.ppo.config.PPOSection`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from preftune.errors import ExitCode, PreftuneError
from preftune.ppo import core, drift
from preftune.ppo.checkpoint import STATE_FILE, CheckpointInfo, CheckpointStore
from preftune.ppo.config import PPOSection
from preftune.ppo.policy import ActorCritic
from preftune.ppo.sampling import NonFiniteLogits, sample
from preftune.text import render_prompt

log = logging.getLogger(__name__)

EXIT_TERMINATED = 143
"""Exit code after SIGTERM (128 + 15, what Kubernetes and shells expect): a checkpoint was written."""


class RewardFn(Protocol):
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor: ...


class JudgeFn(Protocol):
    """Per response: True when it shows its family's preferred behaviour, False when not, None when not judged."""

    def __call__(self, items: Sequence[PromptItem], responses: Sequence[str]) -> Sequence[bool | None]: ...


@dataclass(frozen=True)
class PromptItem:
    """One prompt of the rollout set (raw user text; rendered with preftune.text.render_prompt)."""

    prompt: str
    family: str = ""
    prompt_id: str = ""


class PromptSampler:
    """Deterministic stream of prompt indexes: a fresh seeded permutation per pass over each group.

    With one group (all prompts) this is plain shuffling. With one group per family, draws go
    round-robin over the families, so every rollout batch holds (nearly) the same number of
    prompts of each family however unequal their sizes. The whole state is the position in each
    group's stream and whose turn it is, so a resumed run continues with exactly the prompts the
    uninterrupted run would have used.
    """

    def __init__(self, groups: Sequence[Sequence[int]], seed: int) -> None:
        groups = [list(g) for g in groups if len(g)]
        if not groups:
            raise PreftuneError("no prompts to roll out on", ExitCode.INPUT)
        self.groups = groups
        self.seed = seed
        self.positions = [0] * len(groups)
        self.turn = 0

    def _order(self, group: int, epoch: int) -> list[int]:
        members = self.groups[group]
        perm = np.random.default_rng([self.seed, group, epoch]).permutation(len(members))
        return [members[int(i)] for i in perm]

    def _next(self, group: int) -> int:
        epoch, offset = divmod(self.positions[group], len(self.groups[group]))
        self.positions[group] += 1
        return self._order(group, epoch)[offset]

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            out.append(self._next(self.turn))
            self.turn = (self.turn + 1) % len(self.groups)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"positions": list(self.positions), "turn": self.turn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["positions"]) != len(self.groups):
            raise PreftuneError(
                f"the checkpoint's prompt stream has {len(state['positions'])} group(s), this run has "
                f"{len(self.groups)}; resume with the same prompts and ppo.balance_families",
                ExitCode.CONFIG,
            )
        self.positions = [int(p) for p in state["positions"]]
        self.turn = int(state["turn"])


@dataclass
class Rollout:
    """One batch of experience; every (batch, R) tensor is aligned on the response tokens."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    mask: torch.Tensor  # bool: response tokens up to and including EOS
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor  # per-token KL estimate (masked)
    scores: torch.Tensor  # final per-response score (normalised, clipped, EOS-penalised)
    raw_scores: torch.Tensor  # reward-model output
    has_eos: torch.Tensor
    prompts: list[PromptItem]
    responses: list[str]
    entropy: float
    generated_tokens: int

    @property
    def batch_size(self) -> int:
        return int(self.response_ids.shape[0])


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


SAMPLE_STREAM = 1
SHUFFLE_STREAM = 2


def _stream_seed(seed: int, stream: int, rank: int) -> int:
    """Independent, reproducible seeds per random stream and process (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, stream, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _all_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any]) -> None:
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
        self.s = settings
        self.judge_fn = judge_fn  # an independent judge of the rollout responses (reward-divergence guard)
        self.warned: set[str] = set()
        self.actor = actor
        self.tok = tokenizer
        self.reward_fn = reward_fn
        self.prompts = list(prompts)
        self.families = sorted({p.family for p in self.prompts})  # for the per-family reward metrics
        self.seed = seed
        self.device = device
        self.reward_stats = reward_stats
        self.checkpoints = checkpoints
        self.callbacks = list(callbacks)
        self.progress = settings.progress if progress is None else progress
        self.world_size = world_size
        self.rank = rank
        if tokenizer.eos_token_id is None:
            raise PreftuneError("the policy tokenizer has no EOS token: responses could never stop", ExitCode.INPUT)
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        if settings.batch_size % world_size:
            raise PreftuneError(
                f"ppo.batch_size ({settings.batch_size}) must be divisible by the number of processes ({world_size})",
                ExitCode.CONFIG,
            )
        self.local_batch = settings.batch_size // world_size
        self.local_mini = max(1, settings.mini_batch_size // world_size)
        self.micro = max(1, self.local_mini // settings.grad_accum_steps)

        use_bf16 = device.type == "cuda" and settings.mixed_precision != "no" and torch.cuda.is_bf16_supported()
        self._autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext
        )  # trick: bf16 autocast on GPU only, fp32 on CPU

        self.kl_ctl: core.KLController = (
            core.AdaptiveKLController(settings.kl_coef, settings.kl_target, settings.kl_horizon, settings.kl_error_clip)
            if settings.kl_controller == "adaptive"
            else core.FixedKLController(settings.kl_coef)
        )
        if settings.balance_families:  # trick: the same number of prompts from every family in each batch
            by_family: dict[str, list[int]] = {}
            for i, p in enumerate(self.prompts):
                by_family.setdefault(p.family, []).append(i)
            groups = [by_family[f] for f in sorted(by_family)]
        else:
            groups = [list(range(len(self.prompts)))]
        self.sampler = PromptSampler(groups, seed)
        self.sample_gen = torch.Generator().manual_seed(_stream_seed(seed, SAMPLE_STREAM, rank))
        self.shuffle_gen = torch.Generator().manual_seed(_stream_seed(seed, SHUFFLE_STREAM, rank))
        self.optimizer = self._make_optimizer()
        s = settings
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda u: core.lr_multiplier(u, s.updates, s.warmup_updates, s.lr_schedule, s.min_lr_ratio),
        )  # trick: lr warm-up then decay, per update
        self.update_idx = 0
        self.history: list[dict[str, float]] = []
        self.last_checkpoint: str | None = None
        self.terminate_requested = False
        self.last_samples: list[dict[str, Any]] = []
        self._ddp_params = [p for _, p in self.actor.trainable_named_parameters()]
        self.engine: Any = None  # DeepSpeed engine when ppo.deepspeed_config is set (attach_engine)

    # -- setup -----------------------------------------------------------------------------

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

    # -- rollout ---------------------------------------------------------------------------

    def _encode_prompts(self, items: Sequence[PromptItem]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [render_prompt(p.prompt, self.tok) for p in items]
        self.tok.padding_side = "left"  # trick: left-pad prompts so every row generates from the same column
        self.tok.truncation_side = "left"  # an over-long prompt loses its beginning, never the assistant cue
        enc = self.tok(texts, padding=True, truncation=True, max_length=self.s.max_prompt_tokens, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _decode(self, response_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        out = []
        for ids, m in zip(response_ids.tolist(), mask.tolist(), strict=True):
            kept = [t for t, keep in zip(ids, m, strict=True) if keep and t != self.eos_id]
            out.append(self.tok.decode(kept, skip_special_tokens=True).strip())
        return out

    def _score_texts(
        self, items: Sequence[PromptItem], responses: list[str], has_eos: torch.Tensor, update: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.s
        raw = self.reward_fn([p.prompt for p in items], responses).detach().float().cpu().reshape(-1)
        if raw.shape[0] != len(items):
            raise PreftuneError(f"the reward model returned {raw.shape[0]} scores for {len(items)} responses")
        self._guard(
            update,
            None
            if _all_finite(raw)
            else f"the reward model returned {int((~torch.isfinite(raw)).sum())} non-finite rewards",
        )
        scores = raw.clone()
        if s.reward_normalize and self.reward_stats is not None:
            mean, std = self.reward_stats
            scores = (scores - mean) / std  # trick: normalise rewards with the reward model's saved statistics
        if s.reward_clip is not None:
            scores = scores.clamp(-s.reward_clip, s.reward_clip)  # trick: reward clipping
        if s.missing_eos_penalty is not None:
            scores = scores - s.missing_eos_penalty * (~has_eos.cpu()).float()  # trick: EOS trick (penalise truncation)
        return scores.to(self.device), raw

    @torch.no_grad()
    def rollout(self, items: Sequence[PromptItem], update: int) -> Rollout:
        """Sample, score and compute advantages for one batch of prompts (no gradient)."""
        s = self.s
        self.actor.eval()
        prompt_ids, prompt_mask = self._encode_prompts(items)
        from_sampling = s.logprobs_from_sampling
        chunks: list[Any] = []
        for start in range(0, len(items), s.forward_batch_size):
            sl = slice(start, start + s.forward_batch_size)
            problem = None
            try:
                with self._autocast():
                    out = sample(
                        self.actor.policy_lm,
                        prompt_ids[sl],
                        prompt_mask[sl],
                        max_new_tokens=s.max_new_tokens,
                        temperature=s.temperature,
                        eos_token_id=self.eos_id,
                        pad_token_id=self.pad_id,
                        generator=self.sample_gen,
                        with_scores=from_sampling,
                    )
            except NonFiniteLogits as err:
                problem = f"the policy produced non-finite logits while sampling ({err})"
            self._guard(update, problem)
            chunks.append(out)
        R = max(c.response_ids.shape[1] for c in chunks)

        def padded(ts: list[torch.Tensor], value: float) -> torch.Tensor:
            pad = torch.nn.functional.pad
            return torch.cat([pad(t, (0, 0) * (t.dim() - 2) + (0, R - t.shape[1]), value=value) for t in ts])

        response_ids = padded([c.response_ids for c in chunks], self.pad_id)
        mask = core.response_mask(response_ids, self.eos_id)  # trick: mask tokens after EOS
        has_eos = core.ends_with_eos(response_ids, self.eos_id)
        response_ids = torch.where(mask, response_ids, torch.full_like(response_ids, self.pad_id))
        gen_tokens = int(mask.sum())

        # As few passes as possible: the sampling pass already gave the policy's log-probs (and the shared
        # critic's inputs); one no-grad pass gives the reference; a separate critic needs its own.
        seq = torch.cat([prompt_ids, response_ids], dim=1)
        attn = torch.cat([prompt_mask, mask.long()], dim=1)
        logprobs, ref_logprobs, values, entropies = [], [], [], []
        if from_sampling:
            logprobs = [padded([c.logprobs for c in chunks], 0.0)]
            entropies = [padded([c.entropy for c in chunks], 0.0)]
            if self.actor.critic_layout == "shared":
                values = [self.actor.value_head(padded([c.hidden for c in chunks], 0.0))]
        for start in range(0, len(items), s.forward_batch_size):
            sl = slice(start, start + s.forward_batch_size)
            outputs = []
            with self._autocast():
                if not from_sampling:
                    logits, v = self.actor.policy_forward(seq[sl], attn[sl], R)
                    logprobs.append(core.logprobs_from_logits(logits, response_ids[sl]))
                    entropies.append(core.entropy_from_logits(logits))
                    if v is not None:
                        values.append(v.float())
                    outputs.append(logits)
                if self.actor.critic_layout == "separate":
                    v = self.actor.critic_forward(seq[sl], attn[sl], R)
                    values.append(v.float())
                    outputs.append(v)
                ref_logits = self.actor.ref_logits(seq[sl], attn[sl], R)
                outputs.append(ref_logits)
            finite = all(_all_finite(t) for t in outputs)
            self._guard(update, None if finite else "the policy, reference or critic produced non-finite outputs")
            ref_logprobs.append(core.logprobs_from_logits(ref_logits, response_ids[sl]))
            del outputs, ref_logits
        mask_f = mask.float()
        logprobs_t = torch.cat(logprobs) * mask_f
        ref_logprobs_t = torch.cat(ref_logprobs) * mask_f
        values_t = torch.cat(values).float() * mask_f
        scored_ok = _all_finite(logprobs_t) and _all_finite(values_t)
        self._guard(update, None if scored_ok else "the policy produced non-finite log-probs or values")
        entropy = float(core.masked_sum(torch.cat(entropies), mask) / mask_f.sum().clamp(min=1.0))

        responses = self._decode(response_ids, mask)
        scores, raw = self._score_texts(items, responses, has_eos, update)
        kl = core.kl_per_token(logprobs_t, ref_logprobs_t, s.kl_estimator) * mask_f
        rewards, _ = core.per_token_rewards(scores, kl, mask, self.kl_ctl.value)
        if s.whiten_rewards:  # trick: reward whitening (unit variance, mean kept)
            rewards = core.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = core.compute_gae(rewards, values_t, mask, s.gamma, s.lam)  # trick: GAE
        if s.whiten_advantages:
            advantages = core.masked_whiten(advantages, mask)  # trick: whiten advantages
        return Rollout(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids,
            mask=mask,
            logprobs=logprobs_t,
            ref_logprobs=ref_logprobs_t,
            values=values_t,
            advantages=advantages,
            returns=returns,
            kl=kl,
            scores=scores,
            raw_scores=raw,
            has_eos=has_eos,
            prompts=list(items),
            responses=responses,
            entropy=entropy,
            generated_tokens=gen_tokens,
        )

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
        entropy = None
        if s.entropy_coef > 0:
            entropy = core.masked_mean(core.entropy_from_logits(logits), mask)
            loss = loss - s.entropy_coef * entropy  # trick: entropy bonus
        if values is None:
            # separate critic: its own forward and backward (its parameters are disjoint from the policy's)
            self._guard(update, None if _all_finite(loss) else f"policy loss became {float(loss)}")
            self._backward(loss / s.grad_accum_steps)
            with self._autocast():
                values = self.actor.critic_forward(seq, attn, r_len)
            vf = core.value_loss(
                values.float(), ro.values[idx, :r_len], ro.returns[idx, :r_len], mask, s.clip_range_value
            )
            v_total = s.vf_coef * vf.loss
            self._guard(update, None if _all_finite(v_total) else f"value loss became {float(vf.loss)}")
            self._backward(v_total / s.grad_accum_steps)
        else:
            vf = core.value_loss(
                values.float(), ro.values[idx, :r_len], ro.returns[idx, :r_len], mask, s.clip_range_value
            )
            loss = loss + s.vf_coef * vf.loss  # trick: value loss with its own coefficient
            self._guard(
                update,
                None
                if _all_finite(loss)
                else f"loss became {float(loss)} (policy {float(pg.loss)}, value {float(vf.loss)})",
            )
            self._backward(loss / s.grad_accum_steps)  # trick: gradient accumulation
        out = {
            "policy_loss": pg.loss.detach(),
            "value_loss": vf.loss.detach(),
            "clip_frac": pg.clip_frac,
            "value_clip_frac": vf.clip_frac,
            "approx_kl": pg.approx_kl,
            "ratio": pg.ratio_mean,
        }
        if entropy is not None:
            out["train_entropy"] = entropy.detach()
        return out

    def _backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, or the DeepSpeed engine's (the loss is already scaled for accumulation)."""
        if self.engine is None:
            loss.backward()
        else:
            self.engine.backward(loss, scale_wrt_gas=False)

    def attach_engine(self, engine: Any) -> None:
        """Use a DeepSpeed engine (``preftune.ppo.zero``) for backward, gradient reduction, clipping and step."""
        self.engine = engine

    def _sync_grads(self) -> None:
        """Data parallel: average gradients over processes (what DDP's all-reduce does)."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        for p in self._ddp_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= self.world_size

    def broadcast_parameters(self) -> None:
        """Data parallel: start every process from rank 0's trainable weights."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for p in self._ddp_params:
                dist.broadcast(p.data, src=0)

    def _check_replicas(self) -> None:
        """Data parallel: the processes must end with the same weights (the gradient all-reduce worked)."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            total = torch.stack([p.detach().double().sum() for p in self._ddp_params]).sum().reshape(1)
        lo, hi = total.clone(), total.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if float(hi - lo) > 1e-6 * max(1.0, abs(float(hi))):
            raise PreftuneError(
                f"data-parallel replicas ended with different weights (checksums {float(lo)} vs {float(hi)})"
            )

    def _mean_across(self, value: float) -> float:
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / self.world_size

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
            perm = torch.randperm(B, generator=self.shuffle_gen)  # trick: fresh shuffle of mini-batches per epoch
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
                    self._sync_grads()
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)  # trick: grad-norm clipping
                self._guard(update, None if _all_finite(grad_norm) else f"gradient norm became {float(grad_norm)}")
                grad_norms.append(float(grad_norm))
                if self.engine is None:
                    self.optimizer.step()
                n_steps += 1
                for k, v in mb_stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                approx_kl = self._mean_across(mb_stats["approx_kl"])
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

    # -- guards ----------------------------------------------------------------------------

    def _guard(self, update: int, problem: str | None) -> None:
        """Stop on ``problem`` -- on every process when one has it (a lone raise would hang the others)."""
        if self.world_size > 1:
            import torch.distributed as dist

            flag = torch.tensor([1.0 if problem else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if float(flag) > 0 and problem is None:
                problem = "another process hit a non-finite value"
        if problem:
            self._diverged(update, problem)

    def _drift_guards(self, update: int) -> None:
        """The drift guards of :mod:`preftune.ppo.drift` on the history so far: warn once each, or stop (exit 12)."""
        s, h = self.s, self.history
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
                self._diverged(update, f"{name} guard: {problem}")
            if name not in self.warned and self.rank == 0:
                self.warned.add(name)
                log.warning("update %d: %s: %s (ppo.%s_guard: warn)", update, name, problem, name)

    def _sum_count_across(self, sums: list[float], counts: list[float]) -> tuple[list[float], list[float]]:
        """Element-wise sums and counts over every process (one all-reduce)."""
        if self.world_size == 1:
            return sums, counts
        import torch.distributed as dist

        t = torch.tensor(sums + counts, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        v = t.tolist()
        return v[: len(sums)], v[len(sums) :]

    def _any_process(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(float(t) > 0)

    def _diverged(self, update: int, what: str) -> None:
        where = self.last_checkpoint or "none written yet"
        raise PreftuneError(
            f"training diverged at update {update}/{self.s.updates}: {what}; the last good checkpoint ({where}) is "
            "kept. Lower ppo.lr or raise ppo.kl_coef, check the reward model, then rerun (it resumes from there)",
            ExitCode.TRAINING_DIVERGED,
        )

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly where this one stands."""
        return {
            "update": self.update_idx,
            "trainable": self.actor.trainable_state(),
            # under DeepSpeed the optimiser state is per-process ZeRO partitions: not kept (moments restart)
            "optimizer": self.optimizer.state_dict() if self.engine is None else None,
            "scheduler": self.scheduler.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "sampler": self.sampler.state_dict(),
            "per_rank": self._gather_random_state(),
            "history": [dict(h) for h in self.history],
        }

    def _random_state(self) -> dict[str, Any]:
        return {
            "sample_gen": self.sample_gen.get_state(),
            "shuffle_gen": self.shuffle_gen.get_state(),
            "rng": _rng_state(),
        }

    def _gather_random_state(self) -> list[dict[str, Any]]:
        """Every process's random streams (they differ per rank), in rank order."""
        mine = self._random_state()
        if self.world_size == 1:
            return [mine]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, mine)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.actor.load_trainable_state(state["trainable"])
        if state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.sampler.load_state_dict(state["sampler"])
        per_rank = state["per_rank"]
        if len(per_rank) != self.world_size:
            raise PreftuneError(
                f"the checkpoint was written by {len(per_rank)} process(es), this run has {self.world_size}; resume "
                "with the same number of processes (or start over with --no-resume)",
                ExitCode.CONFIG,
            )
        mine = per_rank[self.rank]
        self.sample_gen.set_state(mine["sample_gen"])
        self.shuffle_gen.set_state(mine["shuffle_gen"])
        _set_rng_state(mine["rng"])
        self.update_idx = int(state["update"])
        self.history = [dict(h) for h in state["history"]]

    def save_checkpoint(self) -> str | None:
        if self.checkpoints is None:
            return None
        state = self.state_dict()  # collective: every process contributes its random streams
        if self.rank != 0:
            return None

        def write(folder: Path) -> None:
            torch.save(state, folder / STATE_FILE)
            if self.actor.mode == "lora":
                self.actor.model.save_pretrained(str(folder / "adapter"))

        self.last_checkpoint = self.checkpoints.save(self.update_idx, write)
        return self.last_checkpoint

    def resume(self, info: CheckpointInfo, local: Path) -> None:
        state = torch.load(local / STATE_FILE, map_location="cpu", weights_only=True)
        self.load_state_dict(state)
        self.last_checkpoint = info.uri

    # -- the loop --------------------------------------------------------------------------

    def _sample_table(self, ro: Rollout) -> list[dict[str, Any]]:
        n = min(self.s.samples_per_table, ro.batch_size)
        return [
            {
                "prompt_id": ro.prompts[i].prompt_id,
                "family": ro.prompts[i].family,
                "prompt": ro.prompts[i].prompt,
                "response": ro.responses[i],
                "reward": float(ro.scores[i]),
                "raw_reward": float(ro.raw_scores[i]),
                "kl": float(ro.kl[i].sum()),
                "ended_with_eos": bool(ro.has_eos[i]),
            }
            for i in range(n)
        ]

    def train(self) -> TrainResult:
        s = self.s
        start_update = self.update_idx
        resumed_from = start_update if start_update > 0 else None
        t_start = time.perf_counter()
        bar = None
        if self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=s.updates,
                initial=start_update,
                desc="ppo",
                unit="update",
                dynamic_ncols=True,
                disable=not self.progress,
            )
        try:
            while self.update_idx < s.updates:
                u = self.update_idx + 1  # 1-based, for people
                t0 = time.perf_counter()
                idx = self.sampler.take(s.batch_size)[self.rank :: self.world_size]
                items = [self.prompts[i] for i in idx]
                ro = self.rollout(items, u)
                t1 = time.perf_counter()
                seq_kl = ro.kl.sum(dim=1)
                mean_kl = self._mean_across(float(seq_kl.mean()))
                if not math.isfinite(mean_kl) or mean_kl > s.kl_hard_limit:
                    self._diverged(
                        u, f"KL to the reference is {mean_kl:.3f} nats, past ppo.kl_hard_limit={s.kl_hard_limit}"
                    )
                train_stats = self.update(ro, u)
                t2 = time.perf_counter()
                kl_coef_used = self.kl_ctl.value
                self.kl_ctl.update(mean_kl, s.batch_size)  # trick: adaptive KL controller (Ziegler et al.)
                lr_used = self.optimizer.param_groups[0]["lr"]
                self.scheduler.step()
                self.update_idx += 1
                metrics = self._metrics(ro, train_stats, mean_kl, kl_coef_used, lr_used, t1 - t0, t2 - t1)
                self.history.append({"update": float(self.update_idx), **metrics})
                self._drift_guards(self.update_idx)
                out_of_time = s.max_minutes is not None and time.perf_counter() - t_start >= 60.0 * s.max_minutes
                if self.rank == 0:
                    due_table = self.update_idx % s.samples_every == 0 or self.update_idx == s.updates
                    self.last_samples = self._sample_table(ro)
                    event = UpdateEvent(self.update_idx, s.updates, metrics, self.last_samples if due_table else None)
                    for cb in self.callbacks:
                        cb.on_update(event)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(reward=f"{metrics['ppo/reward_mean']:.3f}", kl=f"{mean_kl:.3f}")
                if self.update_idx % s.checkpoint_every == 0 or self.update_idx == s.updates or out_of_time:
                    self.save_checkpoint()
                if self._any_process(out_of_time):  # time budget (ppo.max_minutes): a clean, early end
                    break
                if self._any_process(self.terminate_requested):
                    if self.update_idx % s.checkpoint_every and self.update_idx != s.updates:
                        self.save_checkpoint()
                    raise Terminated(
                        f"stopped by SIGTERM after update {self.update_idx}/{s.updates}; checkpoint "
                        f"{self.last_checkpoint or '(none: no checkpoint store)'} written; rerun the same command "
                        "to resume"
                    )
        finally:
            if bar is not None:
                bar.close()
        self._check_replicas()
        return TrainResult(
            updates=self.update_idx,
            resumed_from=resumed_from,
            history=self.history,
            seconds=time.perf_counter() - t_start,
            last_checkpoint=self.last_checkpoint,
            kl_coef=self.kl_ctl.value,
            final=dict(self.history[-1]) if self.history else {},
            last_samples=self.last_samples,
        )

    def _metrics(
        self,
        ro: Rollout,
        train: dict[str, float],
        mean_kl: float,
        kl_coef: float,
        lr: float,
        rollout_s: float,
        update_s: float,
    ) -> dict[str, float]:
        mask_f = ro.mask.float()
        lengths = mask_f.sum(dim=1)
        total_s = max(rollout_s + update_s, 1e-9)
        scores = ro.scores.float()
        m = {
            "ppo/reward_mean": self._mean_across(float(scores.mean())),
            "ppo/reward_std": float(scores.std(unbiased=False)) if scores.numel() > 1 else 0.0,
            "ppo/raw_reward_mean": self._mean_across(float(ro.raw_scores.mean())),
            "ppo/kl": mean_kl,
            "ppo/kl_coef": kl_coef,
            "ppo/non_score_reward": self._mean_across(float((-kl_coef * ro.kl).sum(dim=1).mean())),
            "ppo/entropy": self._mean_across(ro.entropy),
            "ppo/policy_loss": train.get("policy_loss", 0.0),
            "ppo/value_loss": train.get("value_loss", 0.0),
            "ppo/clip_frac": train.get("clip_frac", 0.0),
            "ppo/value_clip_frac": train.get("value_clip_frac", 0.0),
            "ppo/approx_kl": train.get("approx_kl", 0.0),
            "ppo/ratio": train.get("ratio", 1.0),
            "ppo/grad_norm": train.get("grad_norm", 0.0),
            "ppo/early_stopped": train.get("early_stopped", 0.0),
            "ppo/optimizer_steps": train.get("optimizer_steps", 0.0),
            "ppo/response_length": self._mean_across(float(lengths.mean())),
            "ppo/eos_rate": self._mean_across(float(ro.has_eos.float().mean())),
            "ppo/value_mean": self._mean_across(float(core.masked_mean(ro.values, ro.mask))),
            "ppo/advantage_std": float(core.masked_var(ro.advantages, ro.mask).sqrt()),
            "ppo/lr": lr,
            "ppo/rollout_seconds": rollout_s,
            "ppo/update_seconds": update_s,
            "ppo/tokens_per_s": self._mean_across(ro.generated_tokens / total_s) * self.world_size,
            "ppo/samples_per_s": self._mean_across(ro.batch_size / total_s) * self.world_size,
        }
        rows = [ids[keep].tolist() for ids, keep in zip(ro.response_ids, ro.mask, strict=True)]
        m["ppo/repetition"] = self._mean_across(drift.repetition_rate(rows, self.s.repetition_ngram))
        # reward per prompt family (the pilot's per-family trend); sums and counts so that processes agree
        families = self.families
        scores = [float(x) for x in ro.scores]
        sums = [sum(x for x, p in zip(scores, ro.prompts, strict=True) if p.family == f) for f in families]
        counts = [float(sum(p.family == f for p in ro.prompts)) for f in families]
        judged: list[bool | None] = list(self.judge_fn(ro.prompts, ro.responses)) if self.judge_fn else []
        sums.append(float(sum(1 for j in judged if j)))
        counts.append(float(sum(1 for j in judged if j is not None)))
        sums, counts = self._sum_count_across(sums, counts)
        for f, total, n in zip(families, sums, counts, strict=False):
            if n:
                m[f"ppo/reward_mean/{f or 'unknown'}"] = total / n
        if self.judge_fn is not None and counts[-1]:
            m["ppo/judged_preferred_share"] = sums[-1] / counts[-1]
        return m


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
