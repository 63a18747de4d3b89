"""Cross-fitting for the reward gate on small datasets (``reward.gate.cross_fit_folds``).

With one rating per pair and a few hundred held-out pairs, the paired bootstrap bound of the
lift over the best baseline is wide (~0.06 on HH-RLHF's 199 held-out pairs): a real but modest
lift cannot clear it. Cross-fitting uses every pair as a held-out pair exactly once: all pairs
(training and held-out) are split by prompt into ``k`` folds; for each fold a fresh reward model
and fresh baselines are fitted on the other ``k - 1`` folds and score the fold they did not
see. The per-pair results of all folds then go through the same paired cluster bootstrap, over
all pairs, so the bound narrows by about ``sqrt(all pairs / held-out pairs)`` (the spread of a
mean falls with the square root of the pairs behind it, whatever k; a fold's models see
``(k - 1) / k`` of the data, so larger k keeps them closer to the published model). The gate's
statistics are unchanged; only the evidence grows.

What the gate then judges is the *training procedure* (this base, these settings, this much
data), not the one published model: the published reward model is still the one trained on the
training split, and its own held-out figures are reported beside the cross-fitted ones.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from preftune.scoring.baselines import bag_of_words_correct, length_rule_correct

FitAndScore = Callable[[list[Any], list[Any], int], np.ndarray]  # (train pairs, test pairs, fold) -> credit


@dataclass
class CrossFit:
    """Per-pair results of a cross-fit, in ``pairs`` order (every pair scored by a model that never saw it)."""

    pairs: list[Any]
    folds: np.ndarray  # fold index per pair
    credit: np.ndarray  # reward model: 1 / 0 / 0.5 (tie) per pair
    baselines: dict[str, np.ndarray] = field(default_factory=dict)
    fold_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def k(self) -> int:
        return len(self.fold_accuracy)

    def metrics(self) -> dict[str, float]:
        """``reward.crossfit.*``: folds, pairs, the model's and each baseline's cross-fitted accuracy, seconds."""
        m = {
            "reward.crossfit.folds": float(self.k),
            "reward.crossfit.pairs": float(len(self.pairs)),
            "reward.crossfit.accuracy": float(self.credit.mean()),
            "reward.crossfit.seconds": self.seconds,
        }
        m.update({f"reward.crossfit.baseline.{k}": float(v.mean()) for k, v in self.baselines.items()})
        m.update({f"reward.crossfit.fold_accuracy.{i}": a for i, a in enumerate(self.fold_accuracy)})
        return m


def prompt_folds(pairs: Sequence[Any], k: int, seed: int) -> np.ndarray:
    """Fold index per pair: prompts (``prompt_id``, else the prompt text) shuffled and dealt round-robin into k folds.

    All pairs of one prompt land in one fold (best-of-N pairs and several raters make them
    correlated, as the bootstrap's clusters assume); fold sizes in prompts differ by at most one.
    """
    if k < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {k}")
    keys = [str(getattr(p, "prompt_id", "") or getattr(p, "prompt", "")) for p in pairs]
    prompts = sorted(set(keys))
    if len(prompts) < k:
        raise ValueError(f"{len(prompts)} distinct prompts cannot fill {k} folds; lower reward.gate.cross_fit_folds")
    order = np.random.default_rng(seed).permutation(len(prompts))
    fold_of = {prompts[j]: i % k for i, j in enumerate(order)}
    return np.array([fold_of[key] for key in keys], dtype=np.int64)


def baseline_credit(names: Sequence[str], train: list[Any], test: list[Any], seed: int) -> dict[str, np.ndarray]:
    """Per-pair credit of each named trivial baseline, fitted on ``train``, on ``test`` (as the gate fits them)."""
    out: dict[str, np.ndarray] = {}
    if "length" in names:
        out["length"] = np.asarray(length_rule_correct(test, train), dtype=np.float64)
    if "bag_of_words" in names:
        out["bag_of_words"] = np.asarray(bag_of_words_correct(train, test, seed=seed), dtype=np.float64)
    return out


def cross_fit(
    pairs: Sequence[Any],
    k: int,
    fit_and_score: FitAndScore,
    *,
    baselines: Sequence[str],
    seed: int,
    progress: bool = True,
) -> CrossFit:
    """Score every pair with a model (and baselines) fitted on the other folds; a progress bar with ETA over folds."""
    pairs = list(pairs)
    folds = prompt_folds(pairs, k, seed)
    credit = np.zeros(len(pairs), dtype=np.float64)
    base: dict[str, np.ndarray] = {name: np.zeros(len(pairs), dtype=np.float64) for name in baselines}
    fold_accuracy: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(
        total=k,
        desc="reward gate cross-fit",
        unit="fold",
        dynamic_ncols=True,
        disable=not progress,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
    )
    try:
        for f in range(k):
            test_idx = np.flatnonzero(folds == f)
            train = [pairs[i] for i in np.flatnonzero(folds != f)]
            test = [pairs[i] for i in test_idx]
            got = np.asarray(fit_and_score(train, test, f), dtype=np.float64)
            if got.shape != (len(test),):
                raise ValueError(f"fold {f}: {got.size} results for {len(test)} pairs")
            credit[test_idx] = got
            fold_accuracy.append(float(got.mean()))
            for name, x in baseline_credit(baselines, train, test, seed).items():
                base[name][test_idx] = x
            bar.update(1)
            bar.set_postfix(accuracy=f"{fold_accuracy[-1]:.3f}")
    finally:
        bar.close()
    return CrossFit(
        pairs=pairs,
        folds=folds,
        credit=credit,
        baselines=base,
        fold_accuracy=fold_accuracy,
        seconds=time.perf_counter() - t0,
    )
