"""The figures of one PPO update (``ppo/*`` in MLflow and Prometheus) and its table of generations.

Figures that depend on the whole batch are averaged over the processes (one all-reduce each, or
sums and counts for the per-family rewards) so that process 0 logs what the run did, not what its
share did.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from preftune.ppo import core, drift
from preftune.ppo.config import PPOSection
from preftune.ppo.distributed import DistContext
from preftune.ppo.rollout import JudgeFn, Rollout


def update_metrics(
    s: PPOSection,
    dist: DistContext,
    ro: Rollout,
    train: dict[str, float],
    *,
    mean_kl: float,
    kl_coef: float,
    lr: float,
    rollout_s: float,
    update_s: float,
    families: Sequence[str],
    judge_fn: JudgeFn | None,
) -> dict[str, float]:
    mean = dist.mean
    mask_f = ro.mask.float()
    lengths = mask_f.sum(dim=1)
    total_s = max(rollout_s + update_s, 1e-9)
    scores = ro.scores.float()
    value_mean = float(core.masked_mean(ro.values, ro.mask)) if ro.values is not None else 0.0
    m = {
        "ppo/reward_mean": mean(float(scores.mean())),
        "ppo/reward_std": float(scores.std(unbiased=False)) if scores.numel() > 1 else 0.0,
        "ppo/raw_reward_mean": mean(float(ro.raw_scores.mean())),
        "ppo/kl": mean_kl,
        "ppo/kl_coef": kl_coef,
        "ppo/non_score_reward": mean(float((-kl_coef * ro.kl).sum(dim=1).mean())),
        "ppo/entropy": mean(ro.entropy),
        "ppo/policy_loss": train.get("policy_loss", 0.0),
        "ppo/value_loss": train.get("value_loss", 0.0),
        "ppo/clip_frac": train.get("clip_frac", 0.0),
        "ppo/value_clip_frac": train.get("value_clip_frac", 0.0),
        "ppo/approx_kl": train.get("approx_kl", 0.0),
        "ppo/ratio": train.get("ratio", 1.0),
        "ppo/grad_norm": train.get("grad_norm", 0.0),
        "ppo/early_stopped": train.get("early_stopped", 0.0),
        "ppo/optimizer_steps": train.get("optimizer_steps", 0.0),
        "ppo/response_length": mean(float(lengths.mean())),
        "ppo/eos_rate": mean(float(ro.has_eos.float().mean())),
        "ppo/value_mean": mean(value_mean),
        "ppo/advantage_std": float(core.masked_var(ro.advantages, ro.mask).sqrt()),
        "ppo/lr": lr,
        "ppo/rollout_seconds": rollout_s,
        "ppo/update_seconds": update_s,
        "ppo/tokens_per_s": mean(ro.generated_tokens / total_s) * dist.world_size,
        "ppo/samples_per_s": mean(ro.batch_size / total_s) * dist.world_size,
    }
    if "demonstration_nll" in train:  # ppo.demonstration_coef: the written answers' NLL under the policy
        m["ppo/demonstration_nll"] = mean(train["demonstration_nll"])
    rows = [ids[keep].tolist() for ids, keep in zip(ro.response_ids, ro.mask, strict=True)]
    m["ppo/repetition"] = mean(drift.repetition_rate(rows, s.repetition_ngram))
    # reward per prompt family (the pilot's per-family trend); sums and counts so that processes agree
    per_row = [float(x) for x in ro.scores]
    sums = [sum(x for x, p in zip(per_row, ro.prompts, strict=True) if p.family == f) for f in families]
    counts = [float(sum(p.family == f for p in ro.prompts)) for f in families]
    judged: list[bool | None] = list(judge_fn(ro.prompts, ro.responses)) if judge_fn else []
    sums.append(float(sum(1 for j in judged if j)))
    counts.append(float(sum(1 for j in judged if j is not None)))
    sums, counts = dist.sum_counts(sums, counts)
    for f, total, n in zip(families, sums, counts, strict=False):
        if n:
            m[f"ppo/reward_mean/{f or 'unknown'}"] = total / n
    if judge_fn is not None and counts[-1]:
        m["ppo/judged_preferred_share"] = sums[-1] / counts[-1]
    return m


def sample_table(ro: Rollout, n: int) -> list[dict[str, Any]]:
    """The first ``n`` generations of the rollout, for the MLflow table and the pilot report."""
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
        for i in range(min(n, ro.batch_size))
    ]
