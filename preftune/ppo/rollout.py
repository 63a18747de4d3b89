"""Experience making: prompts in, a scored :class:`Rollout` with advantages out (no gradient).

Shaped like OpenRLHF's ``ppo_utils/experience_maker.py``: the trainer asks
:meth:`RolloutMaker.make` for one batch of experience and does not care how it was produced.
One call

1. encodes the prompts (rendered with :func:`preftune.text.render_prompt`, left-padded, truncated
   from the left so the assistant cue survives);
2. samples one response per prompt with the KV-cache sampler (:mod:`preftune.ppo.sampling`),
   which also returns the rollout policy's log-probs, entropies and the shared critic's inputs;
3. runs ONE no-grad pass for the reference's log-probs (and one for a separate critic's values);
4. decodes the responses and scores them with the reward model (normalised, clipped, EOS-penalised);
5. builds per-token rewards (score at the last token, ``-kl_coef * KL`` on every token) and the
   advantages -- in :func:`estimate_advantages`, the one place an advantage estimator is called.

The prompt stream (:class:`PromptSampler`) lives here too: it decides which prompts each batch
holds and is part of every checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from preftune.errors import ConfigError, ExitCode, PreftuneError
from preftune.ppo import core
from preftune.ppo.config import PPOSection
from preftune.ppo.engine import KVCacheEngine, RolloutEngine, SamplingParams
from preftune.ppo.guards import Guards, all_finite
from preftune.ppo.policy import ActorCritic
from preftune.ppo.sampling import NonFiniteLogits
from preftune.text import render_prompt


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

    @classmethod
    def for_prompts(cls, prompts: Sequence[PromptItem], seed: int, balance_families: bool) -> PromptSampler:
        if balance_families:  # trick: the same number of prompts from every family in each batch
            by_family: dict[str, list[int]] = {}
            for i, p in enumerate(prompts):
                by_family.setdefault(p.family, []).append(i)
            return cls([by_family[f] for f in sorted(by_family)], seed)
        return cls([list(range(len(prompts)))], seed)

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
    values: torch.Tensor | None  # None without a critic (critic-free estimators)
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


def autocast_for(device: torch.device, settings: PPOSection) -> Callable[[], Any]:
    """A context-manager factory for the rollout's scoring forwards and the update: ``ppo.mixed_precision``
    'auto' = bf16 autocast on a GPU that has it, fp32 on CPU; 'bf16' = bf16 autocast on any device (a CPU with
    avx512_bf16 or AMX runs it fast, others slowly); 'no' = fp32. Weights, gradients and AdamW stay fp32."""
    mode = settings.mixed_precision
    gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if mode == "bf16" and device.type == "cuda" and not gpu_bf16:
        raise ConfigError(f"ppo.mixed_precision is 'bf16' but {device} has no bf16 support: use 'auto' or 'no'")
    use_bf16 = mode == "bf16" or (mode == "auto" and gpu_bf16)
    # trick: bf16 autocast (on CPU only when asked: its speed depends on the CPU's bf16 units)
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext


def estimate_advantages(
    s: PPOSection, rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, items: Sequence[PromptItem]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns from per-token rewards: the one place an advantage estimator runs.

    ``values`` is None when the actor has no critic; ``items`` says which responses answer the same
    prompt (for estimators that compare responses to one prompt).
    """
    from preftune.ppo import estimators

    spec = estimators.get(s.advantage_estimator)
    if spec.needs_critic and values is None:
        raise PreftuneError(
            f"ppo.advantage_estimator {spec.name!r} needs a critic (values); this actor has no value head",
            ExitCode.CONFIG,
        )
    k = s.samples_per_prompt
    groups = [items[i : i + k] for i in range(0, len(items), k)]
    if any(len(g) != k or len({it.prompt for it in g}) != 1 for g in groups):
        raise PreftuneError(
            f"the rollout does not hold whole groups of {k} responses to the same prompt "
            "(ppo.samples_per_prompt); the prompt stream must repeat each prompt k times, adjacently"
        )
    inputs = estimators.AdvantageInputs(
        rewards=rewards,
        mask=mask,
        values=values if spec.needs_critic else None,
        group_ids=estimators.group_ids_for(len(groups), k, device=rewards.device),
        gamma=s.gamma,
        lam=s.lam,
    )
    advantages, returns = spec.fn(inputs)  # ppo.advantage_estimator: gae, rloo, grpo, reinforce_pp
    if s.whiten_advantages and spec.name == "gae":
        advantages = core.masked_whiten(advantages, mask)  # trick: whiten advantages
    return advantages, returns


class RolloutMaker:
    """Turns prompts into a :class:`Rollout` under the current policy, as ``ppo.*`` configures."""

    def __init__(
        self,
        settings: PPOSection,
        actor: ActorCritic,
        tokenizer: Any,
        reward_fn: RewardFn,
        *,
        device: torch.device,
        generator: torch.Generator,
        guards: Guards,
        reward_stats: tuple[float, float] | None = None,
        engine: RolloutEngine | None = None,
    ) -> None:
        self.s = settings
        self.actor = actor
        self.tok = tokenizer
        self.reward_fn = reward_fn
        self.device = device
        self.generator = generator
        self.guards = guards
        self.reward_stats = reward_stats
        self.autocast = autocast_for(device, settings)
        if tokenizer.eos_token_id is None:
            raise PreftuneError("the policy tokenizer has no EOS token: responses could never stop", ExitCode.INPUT)
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        # the rollout engine (preftune.ppo.engine): the KV-cache sampler on the live policy unless one is given
        self.engine: RolloutEngine = engine or KVCacheEngine(
            actor.policy_lm,
            merge_lora=settings.rollout_merge_lora,
            early_exit=settings.rollout_early_exit,
            dtype=settings.rollout_dtype,
            autocast=self.autocast,
            compile=settings.rollout_compile,
            compile_bucket=settings.rollout_compile_bucket,
            length_batching=settings.rollout_length_batching,
            share_prefix=settings.rollout_share_prefix,
        )

    # -- text in and out -------------------------------------------------------------------------

    def encode(self, items: Sequence[PromptItem]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [render_prompt(p.prompt, self.tok) for p in items]
        self.tok.padding_side = "left"  # trick: left-pad prompts so every row generates from the same column
        self.tok.truncation_side = "left"  # an over-long prompt loses its beginning, never the assistant cue
        enc = self.tok(texts, padding=True, truncation=True, max_length=self.s.max_prompt_tokens, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def decode(self, response_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        out = []
        for ids, m in zip(response_ids.tolist(), mask.tolist(), strict=True):
            kept = [t for t, keep in zip(ids, m, strict=True) if keep and t != self.eos_id]
            out.append(self.tok.decode(kept, skip_special_tokens=True).strip())
        return out

    def score(
        self, items: Sequence[PromptItem], responses: list[str], has_eos: torch.Tensor, update: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(final scores on the device, raw reward-model scores on the CPU)."""
        s = self.s
        raw = self.reward_fn([p.prompt for p in items], responses).detach().float().cpu().reshape(-1)
        if raw.shape[0] != len(items):
            raise PreftuneError(f"the reward model returned {raw.shape[0]} scores for {len(items)} responses")
        self.guards.check(
            update,
            None
            if all_finite(raw)
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

    # -- one batch of experience -----------------------------------------------------------------

    def _shared_prefill(self, items: Sequence[PromptItem]) -> int:
        """k when the batch holds each prompt k times in a row and one prefill per prompt gives the same rows."""
        s, k = self.s, self.s.samples_per_prompt
        if k == 1 or not s.rollout_share_prefill or s.forward_batch_size % k or len(items) % k:
            return 1
        runs = [items[i : i + k] for i in range(0, len(items), k)]
        return k if all(len({it.prompt for it in run}) == 1 for run in runs) else 1

    def _generate(self, items: Sequence[PromptItem], update: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(prompt ids, prompt mask, Generation) for the batch, through the rollout engine."""
        s = self.s
        k = self._shared_prefill(items)
        prompt_ids, prompt_mask = self.encode(items[::k] if k > 1 else items)
        params = SamplingParams(
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            num_samples=k,
            with_scores=s.logprobs_from_sampling,
            batch_size=s.forward_batch_size,
        )
        self.engine.sync()  # the engine samples from the weights of the last update
        gen, problem = None, None
        try:
            gen = self.engine.generate(prompt_ids, prompt_mask, params, self.generator)
        except NonFiniteLogits as err:
            problem = f"the policy produced non-finite logits while sampling ({err})"
        self.guards.check(update, problem)
        if k > 1:
            prompt_ids, prompt_mask = prompt_ids.repeat_interleave(k, dim=0), prompt_mask.repeat_interleave(k, dim=0)
        return prompt_ids, prompt_mask, gen

    @torch.no_grad()
    def make(self, items: Sequence[PromptItem], update: int, kl_coef: float) -> Rollout:
        """Sample, score and compute advantages for one batch of prompts."""
        s, actor = self.s, self.actor
        actor.eval()
        prompt_ids, prompt_mask, gen = self._generate(items, update)
        from_sampling = s.logprobs_from_sampling and gen.logprobs is not None
        response_ids, R = gen.response_ids, int(gen.response_ids.shape[1])
        mask = core.response_mask(response_ids, self.eos_id)  # trick: mask tokens after EOS
        has_eos = core.ends_with_eos(response_ids, self.eos_id)
        response_ids = torch.where(mask, response_ids, torch.full_like(response_ids, self.pad_id))
        gen_tokens = int(mask.sum())

        # As few passes as possible: the sampling pass already gave the policy's log-probs (and the shared
        # critic's inputs); one no-grad pass gives the reference; a separate critic needs its own.
        seq = torch.cat([prompt_ids, response_ids], dim=1)
        attn = torch.cat([prompt_mask, mask.long()], dim=1)
        has_critic = actor.value_head is not None
        logprobs, ref_logprobs, values, entropies = [], [], [], []
        if from_sampling:
            logprobs, entropies = [gen.logprobs], [gen.entropy]
            if has_critic and actor.critic_layout == "shared":
                values = [actor.value_head(gen.hidden)]
        for start in range(0, len(items), s.forward_batch_size):
            sl = slice(start, start + s.forward_batch_size)
            outputs = []
            with self.autocast():
                if not from_sampling:
                    logits, v = actor.policy_forward(seq[sl], attn[sl], R)
                    logprobs.append(core.logprobs_from_logits(logits, response_ids[sl]))
                    entropies.append(core.entropy_from_logits(logits))
                    if v is not None:
                        values.append(v.float())
                    outputs.append(logits)
                if has_critic and actor.critic_layout == "separate":
                    v = actor.critic_forward(seq[sl], attn[sl], R)
                    values.append(v.float())
                    outputs.append(v)
                ref_logits = actor.ref_logits(seq[sl], attn[sl], R)
                outputs.append(ref_logits)
            self.guards.finite(update, "the policy, reference or critic produced non-finite outputs", *outputs)
            ref_logprobs.append(core.logprobs_from_logits(ref_logits, response_ids[sl]))
            del outputs, ref_logits
        mask_f = mask.float()
        logprobs_t = torch.cat(logprobs) * mask_f
        ref_logprobs_t = torch.cat(ref_logprobs) * mask_f
        values_t = torch.cat(values).float() * mask_f if has_critic else None
        checked = [logprobs_t] + ([values_t] if values_t is not None else [])
        self.guards.finite(update, "the policy produced non-finite log-probs or values", *checked)
        entropy = float(core.masked_sum(torch.cat(entropies), mask) / mask_f.sum().clamp(min=1.0))

        responses = self.decode(response_ids, mask)
        scores, raw = self.score(items, responses, has_eos, update)
        kl = core.kl_per_token(logprobs_t, ref_logprobs_t, s.kl_estimator) * mask_f
        rewards, _ = core.per_token_rewards(scores, kl, mask, kl_coef)
        if s.whiten_rewards:  # trick: reward whitening (unit variance, mean kept)
            rewards = core.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = estimate_advantages(s, rewards, values_t, mask, items)
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
