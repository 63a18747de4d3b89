"""Advantage estimators, one small named function each, in a registry (``ppo.advantage_estimator``).

Like verl's ``core_algos.py``: every estimator takes the same :class:`AdvantageInputs` (per-token
rewards with the KL penalty already in them, the critic's values when there is a critic, the
response mask, the group of each response) and returns ``(advantages, returns)`` of shape
``(batch, response_tokens)``, 0 outside the mask. The trainer looks the name up in
:data:`ESTIMATORS` and otherwise does not care which one runs: the same guards, checkpoints,
KL controller and logging apply to all four.

- ``gae`` (Schulman et al. 2016): needs a critic; ``ppo.gamma``, ``ppo.lam``.
- ``rloo`` (Ahmadian et al. 2024, "Back to Basics"): k samples per prompt, each response's return
  minus the mean return of the *other* k-1 responses to the same prompt. Critic-free.
- ``grpo`` (Shao et al. 2024, DeepSeekMath): k samples per prompt, the return standardised within
  its group. Critic-free.
- ``reinforce_pp`` (Hu 2025, REINFORCE++): the discounted reward-to-go of every token (per-token KL
  penalties included), standardised over the whole batch. Critic-free, one sample per prompt is
  enough.

The sequence return of a response is the sum of its per-token rewards: the (normalised, clipped,
EOS-penalised) score minus ``kl_coef`` x its summed KL, so the KL leash and its controller act the
same way whichever estimator runs (verl's ``use_kl_in_reward``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from preftune.ppo import core


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may read; every (batch, R) tensor is aligned on the response tokens."""

    rewards: torch.Tensor  # per-token rewards: -kl_coef * KL on each token, + the score on the last one
    mask: torch.Tensor  # 1 on the response tokens that count
    values: torch.Tensor | None = None  # the critic's values (gae only)
    group_ids: torch.Tensor | None = None  # (batch,) responses with the same id answer the same prompt
    gamma: float = 1.0
    lam: float = 0.95
    eps: float = 1e-6


Estimator = Callable[[AdvantageInputs], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class EstimatorSpec:
    name: str
    fn: Estimator
    needs_critic: bool
    min_samples_per_prompt: int  # responses per prompt the estimator needs (1: none)


ESTIMATORS: dict[str, EstimatorSpec] = {}


def register(name: str, *, needs_critic: bool, min_samples_per_prompt: int = 1) -> Callable[[Estimator], Estimator]:
    """Add an estimator to :data:`ESTIMATORS` under ``name`` (a decorator, as in verl)."""

    def wrap(fn: Estimator) -> Estimator:
        ESTIMATORS[name] = EstimatorSpec(name, fn, needs_critic, min_samples_per_prompt)
        return fn

    return wrap


def get(name: str) -> EstimatorSpec:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; expected one of {sorted(ESTIMATORS)}") from None


# ---------------------------------------------------------------------------------------
# helpers


def sequence_returns(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Undiscounted return of each response: the sum of its per-token rewards over the mask."""
    return core.masked_sum(rewards, mask.to(rewards.dtype), dim=1)


def _groups(group_ids: torch.Tensor | None, n: int, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense group index per row, rows per group) -- every group needs at least two responses."""
    if group_ids is None:
        raise ValueError(f"{who} needs group_ids (k samples per prompt)")
    if group_ids.shape[0] != n:
        raise ValueError(f"{who}: {group_ids.shape[0]} group ids for {n} responses")
    _, dense = torch.unique(group_ids, return_inverse=True)
    counts = torch.bincount(dense)
    if bool((counts < 2).any()):
        raise ValueError(f"{who} needs at least 2 responses per prompt; a group has {int(counts.min())}")
    return dense, counts


def _group_sum(x: torch.Tensor, dense: torch.Tensor, n_groups: int) -> torch.Tensor:
    return torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, dense, x)


def _broadcast(per_response: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One advantage per response, on each of its valid tokens (0 elsewhere)."""
    return per_response[:, None] * mask.to(per_response.dtype)


# ---------------------------------------------------------------------------------------
# the estimators


@register("gae", needs_critic=True)
def gae(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation with the critic's values (:func:`preftune.ppo.core.compute_gae`)."""
    if x.values is None:
        raise ValueError("gae needs the critic's values")
    return core.compute_gae(x.rewards, x.values, x.mask, x.gamma, x.lam)  # trick: GAE


@register("rloo", needs_critic=False, min_samples_per_prompt=2)
def rloo(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """A_i = R_i - mean_{j != i} R_j over the k responses to the same prompt, on every token of response i."""
    returns = sequence_returns(x.rewards, x.mask)
    dense, counts = _groups(x.group_ids, returns.shape[0], "rloo")
    sums = _group_sum(returns, dense, int(counts.shape[0]))
    k = counts[dense].to(returns.dtype)
    baseline = (sums[dense] - returns) / (k - 1)  # trick: leave-one-out baseline (RLOO)
    adv = returns - baseline
    return _broadcast(adv, x.mask), _broadcast(returns, x.mask)


@register("grpo", needs_critic=False, min_samples_per_prompt=2)
def grpo(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """A_i = (R_i - mean_group) / (std_group + eps) over the k responses to the same prompt (std unbiased)."""
    returns = sequence_returns(x.rewards, x.mask)
    dense, counts = _groups(x.group_ids, returns.shape[0], "grpo")
    n_groups = int(counts.shape[0])
    k = counts.to(returns.dtype)
    mean = _group_sum(returns, dense, n_groups) / k
    var = _group_sum((returns - mean[dense]) ** 2, dense, n_groups) / (k - 1)
    adv = (returns - mean[dense]) / (var.sqrt()[dense] + x.eps)  # trick: group-normalised return (GRPO)
    return _broadcast(adv, x.mask), _broadcast(returns, x.mask)


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s - t) r_s over each row's valid tokens (0 outside the mask)."""
    mask_f = mask.to(rewards.dtype)
    r = rewards * mask_f
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running * mask_f[:, t]
        out[:, t] = running
    return out * mask_f


@register("reinforce_pp", needs_critic=False)
def reinforce_pp(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: per-token discounted reward-to-go, whitened over the whole batch's valid tokens."""
    returns = reward_to_go(x.rewards, x.mask, x.gamma)  # trick: token-level reward-to-go with the KL penalty in it
    adv = core.masked_whiten(returns, x.mask)  # trick: global batch normalisation of the returns (REINFORCE++)
    return adv, returns


def compute_advantages(name: str, x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the estimator ``name`` (see :data:`ESTIMATORS`)."""
    return get(name).fn(x)


def group_ids_for(n_prompts: int, k: int, device: torch.device | None = None) -> torch.Tensor:
    """Group id of each row when each of ``n_prompts`` prompts is repeated ``k`` times in a row."""
    return torch.arange(n_prompts, device=device).repeat_interleave(k)
