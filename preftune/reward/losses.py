"""The pairwise Bradley-Terry loss.

Under Bradley-Terry, P(chosen beats rejected) = sigmoid(r_c - r_r). Training maximises the
log-likelihood of the observed preferences:

    d    = r_c - r_r - margin
    loss = -(1 - eps) * logsigmoid(d) - eps * logsigmoid(-d)

``margin`` asks the chosen answer to win by at least that much; ``eps`` (label smoothing,
"conservative BT") says a share eps of labels is assumed wrong, which stops the model from
pushing rewards apart without bound on noisy human data. Pair weights (from the dataset)
scale each comparison; the mean is weighted: sum(w * loss) / sum(w).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: float | torch.Tensor = 0.0,
    label_smoothing: float = 0.0,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Weighted (conservative) Bradley-Terry loss over a batch of pairs.

    ``reduction``: "mean" (weighted mean), "sum" (sum of w * loss; the caller divides, e.g. by
    the total weight of an accumulated optimiser step) or "none" (per pair, unweighted).
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"chosen and rejected rewards differ in shape: {chosen_rewards.shape} vs {rejected_rewards.shape}"
        )
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    d = chosen_rewards - rejected_rewards - margin
    per_pair = -F.logsigmoid(d)
    if label_smoothing:
        per_pair = (1.0 - label_smoothing) * per_pair - label_smoothing * F.logsigmoid(-d)
    if reduction == "none":
        return per_pair
    w = torch.ones_like(per_pair) if weights is None else weights.to(per_pair.dtype)
    total = (w * per_pair).sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / w.sum().clamp_min(torch.finfo(per_pair.dtype).tiny)
    raise ValueError(f"unknown reduction {reduction!r}")
