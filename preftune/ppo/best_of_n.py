"""Best-of-N sampling with the reward model: the baseline any RL run must beat at equal KL.

Draw n responses from the starting policy, keep the one the reward model scores highest. For a
reward without ties the chosen response's distribution is pi_n(y) = F(y)^n - F(y-)^n (F: the
reward's CDF under the policy), whose KL to the policy is, in the continuous limit,

    KL(n) = log n - (n - 1) / n            (Stiennon et al. 2020; Gao et al. 2023)

so best-of-n buys reward without training, at a KL that depends on n only. An RL run that ends
with less reward than best-of-n at the KL it spent should not be served: serve best-of-n, or fix
the reward model first. :func:`exact_best_of_n` computes the exact KL of best-of-n on a finite
support (the tests check the closed form against it on the toy world); :func:`measure` samples a
policy, scores with the reward model and returns the reward of best-of-n at each n with the
closed-form KL, and (given the trained policy) the trained policy's reward and KL on the same
prompts; :func:`compare` says whether the trained policy beats best-of-n at the KL it spends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_NS: tuple[int, ...] = (1, 2, 4, 8, 16)


def kl_closed_form(n: int) -> float:
    """KL(best-of-n || policy) in nats per response: log n - (n - 1) / n."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return math.log(n) - (n - 1) / n


def expected_max_of_n(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Unbiased estimate of E[max of n draws] per row from N >= n draws per row (shape (P, N) -> (P,)).

    The mean over all n-subsets of a row's draws of their maximum: with the draws sorted ascending,
    the i-th smallest (1-based) is the maximum of C(i-1, n-1) of the C(N, n) subsets.
    """
    N = scores.shape[-1]
    if not 1 <= n <= N:
        raise ValueError(f"best-of-{n} needs at least {n} draws per prompt, got {N}")
    ordered = torch.sort(scores.double(), dim=-1).values
    weights = torch.tensor([math.comb(i - 1, n - 1) for i in range(1, N + 1)], dtype=torch.float64)
    weights = weights / math.comb(N, n)
    return (ordered * weights).sum(dim=-1).to(scores.dtype)


@dataclass(frozen=True)
class ExactBestOfN:
    kl: float  # KL(best-of-n || policy), nats
    reward: float  # E[reward] under best-of-n
    probs: torch.Tensor  # best-of-n's probability of each outcome


def exact_best_of_n(logp: torch.Tensor, rewards: torch.Tensor, n: int) -> ExactBestOfN:
    """Best-of-n over a finite set of outcomes with policy log-probs ``logp`` (summing to one) and ``rewards``.

    Ties are broken uniformly (a tied group gets F(r)^n - F(r-)^n, shared in proportion to p).
    """
    p = logp.double().exp()
    p = p / p.sum()
    r = rewards.double()
    levels, inverse = torch.unique(r, sorted=True, return_inverse=True)
    mass = torch.zeros(levels.shape[0], dtype=torch.float64).index_add_(0, inverse, p)
    cdf = mass.cumsum(0).clamp(max=1.0)
    below = cdf - mass
    level_prob = cdf**n - below.clamp(min=0.0) ** n
    probs = level_prob[inverse] * p / mass[inverse]
    keep = probs > 0
    kl = float((probs[keep] * (probs[keep].log() - p[keep].log())).sum())
    return ExactBestOfN(kl=kl, reward=float((probs * r).sum()), probs=probs)


# ---------------------------------------------------------------------------------------
# measuring on a policy


@dataclass
class Draws:
    """``samples`` responses per prompt, scored; row-major (prompt i's draws are rows i*N .. i*N+N-1)."""

    scores: torch.Tensor  # (P, N)
    logprob_sums: torch.Tensor  # (P, N) summed log-prob of each response under the sampling policy
    response_ids: torch.Tensor  # (P*N, R)
    mask: torch.Tensor  # (P*N, R)
    prompt_ids: torch.Tensor  # (P*N, L) left-padded
    prompt_mask: torch.Tensor  # (P*N, L)
    responses: list[str]


ScoreFn = Callable[[Sequence[str], Sequence[str]], torch.Tensor]


@torch.no_grad()
def draw(
    model: Any,
    tok: Any,
    prompts: Sequence[str],
    score: ScoreFn,
    *,
    samples: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 64,
) -> Draws:
    """Sample ``samples`` responses to each prompt (as the PPO rollout does) and score them."""
    from preftune.ppo import core
    from preftune.ppo.sampling import sample
    from preftune.text import render_prompt

    tok.padding_side = "left"
    tok.truncation_side = "left"
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    eos = int(tok.eos_token_id)
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else eos)
    items = [p for p in prompts for _ in range(samples)]
    enc = tok([render_prompt(p, tok) for p in items], padding=True, return_tensors="pt")
    ids_all, attn_all = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    chunks = []
    for start in range(0, len(items), batch_size):
        sl = slice(start, start + batch_size)
        chunks.append(
            sample(
                model,
                ids_all[sl],
                attn_all[sl],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                eos_token_id=eos,
                pad_token_id=pad,
                generator=gen,
                with_scores=True,
            )
        )
    R = max(c.response_ids.shape[1] for c in chunks)
    pad_to = torch.nn.functional.pad
    response_ids = torch.cat([pad_to(c.response_ids, (0, R - c.response_ids.shape[1]), value=pad) for c in chunks])
    logprobs = torch.cat([pad_to(c.logprobs, (0, R - c.logprobs.shape[1]), value=0.0) for c in chunks])  # type: ignore[arg-type]
    mask = core.response_mask(response_ids, eos)
    response_ids = torch.where(mask, response_ids, torch.full_like(response_ids, pad))
    texts = []
    for ids, m in zip(response_ids.tolist(), mask.tolist(), strict=True):
        kept = [t for t, keep in zip(ids, m, strict=True) if keep and t != eos]
        texts.append(tok.decode(kept, skip_special_tokens=True).strip())
    scores = score(items, texts).detach().float().cpu().reshape(len(prompts), samples)
    sums = core.masked_sum(logprobs.float().cpu(), mask.cpu(), dim=1).reshape(len(prompts), samples)
    return Draws(scores, sums, response_ids, mask, ids_all, attn_all, texts)


@torch.no_grad()
def logprob_sums(model: Any, d: Draws, temperature: float, batch_size: int = 64) -> torch.Tensor:
    """Summed log-prob of each drawn response under ``model`` (at ``temperature``), shape like ``d.scores``."""
    from preftune.ppo import core
    from preftune.ppo.policy import position_ids_from_mask

    R = d.response_ids.shape[1]
    out = []
    for start in range(0, d.response_ids.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        seq = torch.cat([d.prompt_ids[sl], d.response_ids[sl]], dim=1)
        attn = torch.cat([d.prompt_mask[sl], d.mask[sl].long()], dim=1)
        logits = model(
            input_ids=seq, attention_mask=attn, position_ids=position_ids_from_mask(attn), logits_to_keep=R + 1
        ).logits[:, :-1]
        lp = core.logprobs_from_logits(logits / temperature, d.response_ids[sl])
        out.append(core.masked_sum(lp.float().cpu(), d.mask[sl].cpu(), dim=1))
    return torch.cat(out).reshape(d.scores.shape)


def curve(scores: torch.Tensor, ns: Sequence[int] = DEFAULT_NS) -> list[dict[str, float]]:
    """Best-of-n reward (mean over prompts of the unbiased E[max of n]) with the closed-form KL, per n."""
    return [{"n": float(n), "kl": kl_closed_form(n), "reward": float(expected_max_of_n(scores, n).mean())} for n in ns]


def measure(
    base: Any,
    tok: Any,
    prompts: Sequence[str],
    score: ScoreFn,
    *,
    ns: Sequence[int] = DEFAULT_NS,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    trained: Any = None,
    trained_samples: int = 4,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Best-of-n of ``base`` at each n in ``ns`` (max(ns) draws per prompt) and, with ``trained``, that policy.

    The trained policy's reward is the mean score of ``trained_samples`` responses per prompt; its KL
    to ``base`` is the mean over those responses of log p_trained - log p_base (k1, nats per
    response), the same quantity the closed form gives for best-of-n.
    """
    n_max = max(ns)
    d = draw(
        base,
        tok,
        prompts,
        score,
        samples=n_max,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
    )
    out: dict[str, Any] = {"prompts": len(prompts), "draws_per_prompt": n_max, "curve": curve(d.scores, ns)}
    if trained is not None:
        t = draw(
            trained,
            tok,
            prompts,
            score,
            samples=trained_samples,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed + 1,
            batch_size=batch_size,
        )
        kl = (t.logprob_sums - logprob_sums(base, t, temperature, batch_size)).mean()
        out["policy"] = {"reward": float(t.scores.mean()), "kl": float(kl), "samples_per_prompt": trained_samples}
    return out


def reward_at_kl(points: Sequence[dict[str, float]], kl: float) -> float | None:
    """Best-of-n reward at ``kl`` by linear interpolation along the curve (None beyond its largest n)."""
    pts = sorted((p["kl"], p["reward"]) for p in points)
    if not pts or kl < pts[0][0] or kl > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= kl <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (kl - x0) / (x1 - x0)
    return pts[-1][1]


def compare(points: Sequence[dict[str, float]], policy_kl: float, policy_reward: float) -> dict[str, Any]:
    """Does the trained policy beat best-of-n at the KL it spends?

    ``beats``: True / False when the policy's KL is within the curve's range (compared with best-of-n
    interpolated at that KL); beyond the largest n, False when the policy gets no more reward than
    that largest n (best-of-n does as well with less KL), None (undecided) when it gets more.
    """
    at = reward_at_kl(points, max(policy_kl, 0.0))
    largest = max(points, key=lambda p: p["n"])
    top = f"best-of-{int(largest['n'])} ({largest['reward']:.3f} at {largest['kl']:.2f} nats)"
    if at is not None:
        beats: bool | None = policy_reward > at
        how = f"PPO {policy_reward:.3f} at {policy_kl:.2f} nats vs best-of-n {at:.3f} at the same KL: " + (
            "PPO beats best-of-n"
            if beats
            else "best-of-n does as well or better; serve best-of-n or fix the reward model"
        )
    elif policy_reward <= largest["reward"]:
        beats = False
        how = (
            f"PPO {policy_reward:.3f} at {policy_kl:.2f} nats, {top}: best-of-n does as well with less KL; "
            "serve best-of-n or fix the reward model"
        )
    else:
        beats = None
        how = (
            f"PPO {policy_reward:.3f} at {policy_kl:.2f} nats beats {top} but spends more KL than the largest n "
            "measured: undecided"
        )
    return {
        "policy_kl": policy_kl,
        "policy_reward": policy_reward,
        "best_of_n_at_kl": at,
        "beats": beats,
        "detail": how,
    }
