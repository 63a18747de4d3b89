"""Figures that answer "is my reward model good enough?" (numpy only; no torch).

- pairwise accuracy (ties count one half, so a constant scorer gets 0.5 and swapping
  chosen/rejected gives exactly 1 - accuracy), overall and per family;
- calibration: accuracy per bucket of |r_c - r_r| against the probability the
  Bradley-Terry model itself claims, sigmoid(|r_c - r_r|), and the expected calibration error;
- length bias: does the reward just measure response length?
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import stats


def pairwise_outcomes(chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """1 where chosen scored higher, 0 where lower, 0.5 on ties."""
    chosen = np.asarray(chosen, dtype=np.float64)
    rejected = np.asarray(rejected, dtype=np.float64)
    return np.where(chosen > rejected, 1.0, np.where(chosen < rejected, 0.0, 0.5))


def pairwise_accuracy(chosen: np.ndarray, rejected: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Share of pairs where the chosen response gets the higher reward (ties: 1/2)."""
    out = pairwise_outcomes(chosen, rejected)
    if out.size == 0:
        return float("nan")
    if weights is None:
        return float(out.mean())
    w = np.asarray(weights, dtype=np.float64)
    return float((w * out).sum() / w.sum())


def accuracy_by_family(chosen: np.ndarray, rejected: np.ndarray, families: Sequence[str]) -> dict[str, float]:
    """Unweighted pairwise accuracy per family (each held-out pair counts once)."""
    out = pairwise_outcomes(chosen, rejected)
    groups: dict[str, list[float]] = defaultdict(list)
    for fam, o in zip(families, out, strict=True):
        groups[fam].append(float(o))
    return {fam: float(np.mean(v)) for fam, v in sorted(groups.items())}


@dataclass(frozen=True)
class CalibrationBucket:
    lo: float  # |margin| range of the bucket
    hi: float
    n: int
    accuracy: float  # share of pairs the reward model ordered right
    predicted: float  # mean sigmoid(|r_c - r_r|): what BT says the accuracy should be
    mean_abs_margin: float


def calibration_table(chosen: np.ndarray, rejected: np.ndarray, n_buckets: int = 5) -> list[CalibrationBucket]:
    """Accuracy by |reward margin| bucket (equal-count buckets over the held-out pairs).

    A usable reward model is more often right when it is more sure: accuracy should rise from
    the first bucket to the last, and track ``predicted``.
    """
    d = np.asarray(chosen, dtype=np.float64) - np.asarray(rejected, dtype=np.float64)
    if d.size == 0:
        return []
    mag = np.abs(d)
    order = np.argsort(mag, kind="stable")
    n_buckets = max(1, min(n_buckets, d.size))
    out = []
    for idx in np.array_split(order, n_buckets):
        if idx.size == 0:
            continue
        m = mag[idx]
        out.append(
            CalibrationBucket(
                lo=float(m.min()),
                hi=float(m.max()),
                n=int(idx.size),
                accuracy=float(pairwise_outcomes(d[idx], np.zeros(idx.size)).mean()),
                predicted=float((1.0 / (1.0 + np.exp(-m))).mean()),
                mean_abs_margin=float(m.mean()),
            )
        )
    return out


def expected_calibration_error(table: Sequence[CalibrationBucket]) -> float:
    total = sum(b.n for b in table)
    if not total:
        return float("nan")
    return float(sum(b.n * abs(b.accuracy - b.predicted) for b in table) / total)


def calibration_columns(table: Sequence[CalibrationBucket]) -> dict[str, list]:
    """Column form (what ``mlflow.log_table`` takes)."""
    rows = [asdict(b) for b in table]
    keys = list(CalibrationBucket.__dataclass_fields__)
    return {k: [r[k] for r in rows] for k in keys}


def plot_calibration(table: Sequence[CalibrationBucket], path: Path, title: str = "Reward-model calibration") -> Path:
    """Reliability plot: observed accuracy vs. the BT-implied probability per margin bucket."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    try:
        ax.plot([0.5, 1.0], [0.5, 1.0], linestyle="--", color="grey", label="perfectly calibrated")
        xs = [b.predicted for b in table]
        ys = [b.accuracy for b in table]
        ax.plot(xs, ys, marker="o", label="reward model")
        for b in table:
            ax.annotate(f"n={b.n}", (b.predicted, b.accuracy), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.set_xlabel("predicted P(chosen wins) = sigmoid(|margin|)")
        ax.set_ylabel("held-out accuracy")
        ax.set_xlim(0.48, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


@dataclass(frozen=True)
class LengthBias:
    spearman: float  # rank correlation of reward with response length (chars), all held-out responses
    chosen_longer_share: float  # share of held-out pairs whose chosen response is longer
    accuracy_chosen_longer: float  # accuracy on pairs where chosen is longer (nan if none)
    accuracy_chosen_shorter: float  # ... and where it is shorter: a length-only scorer fails here


def length_bias(
    chosen: np.ndarray, rejected: np.ndarray, chosen_chars: np.ndarray, rejected_chars: np.ndarray
) -> LengthBias:
    """How much of the reward is response length.

    A high correlation is not wrong by itself (good answers may be longer), so the split
    accuracies say more: if accuracy collapses on pairs where the preferred answer is the
    shorter one, the model learned length, not behaviour.
    """
    rewards = np.concatenate([chosen, rejected])
    lengths = np.concatenate([chosen_chars, rejected_chars])
    if rewards.size < 3 or np.all(lengths == lengths[0]) or np.all(rewards == rewards[0]):
        rho = float("nan")
    else:
        rho = float(stats.spearmanr(rewards, lengths).statistic)
    longer = chosen_chars > rejected_chars
    shorter = chosen_chars < rejected_chars
    out = pairwise_outcomes(chosen, rejected)
    return LengthBias(
        spearman=rho,
        chosen_longer_share=float(longer.mean()) if longer.size else float("nan"),
        accuracy_chosen_longer=float(out[longer].mean()) if longer.any() else float("nan"),
        accuracy_chosen_shorter=float(out[shorter].mean()) if shorter.any() else float("nan"),
    )


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN: report undefined figures as null."""
    return None if x is None or not math.isfinite(x) else float(x)
