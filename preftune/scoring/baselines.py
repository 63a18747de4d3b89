"""Trivial baselines a reward model must beat: a length rule and a bag-of-words linear model.

Why: an absolute accuracy bar says little on real data. On HH-RLHF harmless, 0.63 held-out
accuracy is a good reward model; on easy data 0.8 may be no better than "pick the longer
answer". The reward gate (:mod:`preftune.reward.gate`) and check-fit's data-quality figures
compare against these two baselines instead.

Pairs
    Every function takes a sequence of pairs, each either an object with ``prompt``,
    ``chosen`` and ``rejected`` string attributes (:class:`preftune.reward.data.PreferencePair`,
    :class:`preftune.data.records.Pair`), a mapping with those keys (a dataset record), or a
    ``(prompt, chosen, rejected)`` tuple. Only the two response texts are used: the prompt is
    the same on both sides of a pair, so it cancels out of both baselines.

Scoring
    Per-pair credit is 1 when the baseline ranks the chosen response above the rejected one,
    0 when below and 1/2 on a tie (the convention of :func:`preftune.reward.metrics.pairwise_outcomes`),
    so a baseline that cannot tell the two apart scores 0.5 and the per-pair vectors can be
    compared with the reward model's, pair by pair (the gate's paired bootstrap does that).

numpy/scipy only (scikit-learn is not a dependency of preftune).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import optimize, sparse

_WORD = re.compile(r"\w+", re.UNICODE)
HASH_DIM = 1 << 18
# Inverse L2 strengths tried by the bag-of-words model's internal cross-validation (C as in
# scikit-learn's LogisticRegression: larger C = weaker regularisation).
C_GRID = (0.03, 0.3, 3.0)


def _triple(pair: Any, i: int) -> tuple[str, str, str]:
    if isinstance(pair, Mapping):
        vals = (pair.get("prompt"), pair.get("chosen"), pair.get("rejected"))
    elif isinstance(pair, (tuple, list)):
        if len(pair) != 3:
            raise ValueError(f"pair {i}: expected a (prompt, chosen, rejected) tuple, got {len(pair)} items")
        vals = tuple(pair)
    else:
        vals = (getattr(pair, "prompt", None), getattr(pair, "chosen", None), getattr(pair, "rejected", None))
    if not all(isinstance(v, str) for v in vals):
        raise ValueError(f"pair {i}: prompt, chosen and rejected must be strings")
    return vals  # type: ignore[return-value]


def as_triples(pairs: Sequence[Any]) -> list[tuple[str, str, str]]:
    """``(prompt, chosen, rejected)`` for each pair (objects, mappings or tuples; see the module doc)."""
    return [_triple(p, i) for i, p in enumerate(pairs)]


# ---------------------------------------------------------------------------- length rule


def _credit(score_chosen: np.ndarray, score_rejected: np.ndarray) -> np.ndarray:
    return np.where(score_chosen > score_rejected, 1.0, np.where(score_chosen < score_rejected, 0.0, 0.5))


def length_bias(pairs: Sequence[Any]) -> float:
    """Share of pairs whose chosen response is longer (characters; ties count 1/2). NaN if empty."""
    t = as_triples(pairs)
    if not t:
        return float("nan")
    c = np.array([len(x[1]) for x in t], dtype=np.float64)
    r = np.array([len(x[2]) for x in t], dtype=np.float64)
    return float(_credit(c, r).mean())


def length_rule_direction(train_pairs: Sequence[Any]) -> int:
    """+1 if the longer response wins at least half the training pairs, else -1 (the shorter wins)."""
    bias = length_bias(train_pairs)
    return -1 if bias == bias and bias < 0.5 else 1


def length_rule_correct(pairs: Sequence[Any], train_pairs: Sequence[Any] | None = None) -> np.ndarray:
    """Per-pair credit of the length rule (1 / 0 / 1/2 on equal length).

    The rule is "the longer response is the better one". With ``train_pairs`` its direction is
    fitted there first (if shorter answers win most training pairs, the rule picks the shorter),
    which is the fair baseline for a reward model trained on the same ``train_pairs``.
    """
    t = as_triples(pairs)
    sign = 1 if train_pairs is None else length_rule_direction(train_pairs)
    c = np.array([len(x[1]) for x in t], dtype=np.float64) * sign
    r = np.array([len(x[2]) for x in t], dtype=np.float64) * sign
    return _credit(c, r)


def length_rule_accuracy(pairs: Sequence[Any], train_pairs: Sequence[Any] | None = None) -> float:
    """Accuracy of "the longer response wins" on ``pairs`` (direction fitted on ``train_pairs`` if given).

    Equal lengths count 1/2. On data where the chosen response is always longer this is 1.0.
    NaN for no pairs.
    """
    out = length_rule_correct(pairs, train_pairs)
    return float(out.mean()) if out.size else float("nan")


# ----------------------------------------------------------------------- bag of words


def _bucket(token: str) -> int:
    return zlib.crc32(token.encode("utf-8")) % HASH_DIM


def bow_features(texts: Sequence[str]) -> sparse.csr_matrix:
    """Hashed unigram + bigram features, ``log1p(count)``, one row per text (deterministic hashing)."""
    indptr = [0]
    indices: list[int] = []
    data: list[float] = []
    for text in texts:
        words = _WORD.findall(text.lower())
        counts: dict[int, int] = {}
        for tok in words:
            b = _bucket(tok)
            counts[b] = counts.get(b, 0) + 1
        for a, b2 in zip(words, words[1:], strict=False):
            b = _bucket(a + " " + b2)
            counts[b] = counts.get(b, 0) + 1
        indices.extend(counts)
        data.extend(np.log1p(np.fromiter(counts.values(), dtype=np.float64, count=len(counts))).tolist())
        indptr.append(len(indices))
    return sparse.csr_matrix(
        (np.asarray(data, dtype=np.float64), np.asarray(indices, dtype=np.int64), np.asarray(indptr, dtype=np.int64)),
        shape=(len(texts), HASH_DIM),
    )


def _pair_diffs(triples: Sequence[tuple[str, str, str]]) -> sparse.csr_matrix:
    chosen = bow_features([t[1] for t in triples])
    rejected = bow_features([t[2] for t in triples])
    return (chosen - rejected).tocsr()


def _fit_logistic(diffs: sparse.csr_matrix, c: float) -> np.ndarray:
    """Bradley-Terry with linear features: minimise sum log(1 + exp(-w.d)) + ||w||^2 / (2C).

    No intercept: the model is antisymmetric (swapping the sides flips the prediction), as a
    reward difference is.
    """
    n, dim = diffs.shape
    diffs_t = diffs.T.tocsr()

    def loss_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = diffs @ w
        loss = np.logaddexp(0.0, -z).sum() + 0.5 * (w @ w) / c
        g = -(diffs_t @ (1.0 / (1.0 + np.exp(z)))) + w / c
        return float(loss), g

    res = optimize.minimize(loss_grad, np.zeros(dim), jac=True, method="L-BFGS-B", options={"maxiter": 200})
    return res.x


def _prompt_folds(triples: Sequence[tuple[str, str, str]], k: int, seed: int) -> np.ndarray:
    """A fold number per pair; pairs sharing a prompt share a fold (no prompt leaks across folds)."""
    prompts = sorted({t[0] for t in triples})
    rng = np.random.default_rng(seed)
    fold_of = {p: int(f) for p, f in zip(prompts, rng.permutation(len(prompts)) % k, strict=True)}
    return np.array([fold_of[t[0]] for t in triples], dtype=np.int64)


def _choose_c(diffs: sparse.csr_matrix, triples: Sequence[tuple[str, str, str]], seed: int) -> float:
    """Pick C from :data:`C_GRID` by 3-fold cross-validation on the training pairs (grouped by prompt)."""
    if len(triples) < 30 or len({t[0] for t in triples}) < 3:
        return 1.0
    folds = _prompt_folds(triples, 3, seed)
    best_c, best_acc = C_GRID[0], -1.0
    for c in C_GRID:
        credit = []
        for f in range(3):
            tr, te = folds != f, folds == f
            if not tr.any() or not te.any():
                continue
            w = _fit_logistic(diffs[np.flatnonzero(tr)], c)
            credit.append(_credit(diffs[np.flatnonzero(te)] @ w, np.zeros(int(te.sum()))))
        acc = float(np.concatenate(credit).mean()) if credit else 0.0
        if acc > best_acc + 1e-12:
            best_c, best_acc = c, acc
    return best_c


def bag_of_words_correct(train_pairs: Sequence[Any], heldout_pairs: Sequence[Any], seed: int = 0) -> np.ndarray:
    """Per-pair credit on ``heldout_pairs`` of a hashed bag-of-words Bradley-Terry model fitted on ``train_pairs``.

    Features: hashed (CRC32, 2^18 buckets) lower-cased word unigrams and bigrams of each
    response, ``log1p(count)``; the model is an L2 logistic regression on the chosen-minus-
    rejected feature difference, its strength picked by 3-fold cross-validation grouped by
    prompt (``seed`` fixes the folds). Deterministic for a given seed.
    """
    train = as_triples(train_pairs)
    held = as_triples(heldout_pairs)
    if not held:
        return np.zeros(0)
    if not train:
        return np.full(len(held), 0.5)
    diffs = _pair_diffs(train)
    used = np.unique(diffs.indices)  # fit only the hashed features that occur in training
    diffs = diffs[:, used]
    c = _choose_c(diffs, train, seed)
    w = _fit_logistic(diffs, c)
    z = _pair_diffs(held)[:, used] @ w
    return _credit(z, np.zeros_like(z))


def bag_of_words_accuracy(train_pairs: Sequence[Any], heldout_pairs: Sequence[Any], seed: int = 0) -> float:
    """Held-out accuracy of the bag-of-words baseline (see :func:`bag_of_words_correct`). NaN if no held-out pairs."""
    out = bag_of_words_correct(train_pairs, heldout_pairs, seed)
    return float(out.mean()) if out.size else float("nan")
