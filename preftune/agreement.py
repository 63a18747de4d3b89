"""Rater agreement: the first half of the test of fit ("can people reliably pick the better one?").

Both the check-fit step and the feedback service's agreement endpoint compute their
figures here, so the two always agree on the same judgements.

An *item* is one prompt with one set of candidates; each judgement is one rater's pick of
the best candidate, or "all unacceptable". Picks are compared by the candidate's text when
the records carry it (two candidates with the same text are the same answer), else by index.

- ``alpha``: Krippendorff's alpha, nominal level (the ``krippendorff`` package), over items
  rated by at least two raters: 1 is perfect agreement, 0 is chance, below 0 is systematic
  disagreement.
- ``pairwise``: the share of agreeing rater pairs on the same item, pooled over items.
- Confidence intervals: percentile bootstrap over items (``scipy.stats.bootstrap``), seeded.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

ALL_UNACCEPTABLE = "<all-unacceptable>"


@dataclass
class FamilyAgreement:
    family: str
    n_items: int  # items with at least two judgements
    n_judgements: int
    n_raters: int
    alpha: float
    alpha_ci: tuple[float, float]
    pairwise: float
    pairwise_ci: tuple[float, float]
    confidence: float = 0.95
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("alpha", "pairwise"):
            d[key] = _finite_or_none(d[key])
        for key in ("alpha_ci", "pairwise_ci"):
            d[key] = [_finite_or_none(v) for v in d[key]]
        return d


def _finite_or_none(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _pick_value(record: Mapping[str, Any]) -> str | None:
    """What a judgement picked, comparable across raters of the same item."""
    if record.get("all_unacceptable"):
        return ALL_UNACCEPTABLE
    best = record.get("best")
    if best is None:
        return None  # skipped or unknown: not a judgement
    candidates = record.get("candidates") or []
    if isinstance(best, int) and 0 <= best < len(candidates):
        cand = candidates[best]
        text = cand.get("text") if isinstance(cand, Mapping) else cand
        if isinstance(text, str):
            return "t:" + hashlib.sha1(" ".join(text.split()).encode("utf-8")).hexdigest()
    return f"i:{best}"


def _matrix(items: list[list[tuple[str, str]]]) -> tuple[np.ndarray, int]:
    """Raters x items matrix of value codes (nan = not rated), for krippendorff."""
    raters = sorted({r for item in items for r, _ in item})
    values = sorted({v for item in items for _, v in item})
    r_index = {r: i for i, r in enumerate(raters)}
    v_index = {v: float(i) for i, v in enumerate(values)}
    m = np.full((len(raters), len(items)), np.nan)
    for j, item in enumerate(items):
        for r, v in item:
            m[r_index[r], j] = v_index[v]
    return m, len(values)


def _alpha(items: list[list[tuple[str, str]]]) -> float:
    import krippendorff

    if len(items) < 2:
        return math.nan
    m, n_values = _matrix(items)
    if n_values < 2:
        return math.nan  # one value in the whole domain: alpha is undefined
    return float(krippendorff.alpha(reliability_data=m, level_of_measurement="nominal"))


def _pairwise(items: list[list[tuple[str, str]]]) -> float:
    agree = total = 0
    for item in items:
        vals = [v for _, v in item]
        for a in range(len(vals)):
            for b in range(a + 1, len(vals)):
                total += 1
                agree += vals[a] == vals[b]
    return agree / total if total else math.nan


def _bootstrap_ci(items, statistic, confidence: float, n_resamples: int, seed: int) -> tuple[float, float]:
    from scipy.stats import bootstrap

    if len(items) < 3:
        return (math.nan, math.nan)

    def stat(idx):
        return statistic([items[int(i)] for i in idx])

    import warnings

    from scipy.stats import DegenerateDataWarning

    with np.errstate(all="ignore"), warnings.catch_warnings():
        # all resamples equal (e.g. perfect agreement): the interval is that value, not a warning
        warnings.simplefilter("ignore", DegenerateDataWarning)
        res = bootstrap(
            (np.arange(len(items)),),
            stat,
            vectorized=False,
            n_resamples=n_resamples,
            confidence_level=confidence,
            method="percentile",
            random_state=np.random.default_rng(seed),
        )
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return (lo, hi)


def agreement_by_family(
    judgements: Iterable[Mapping[str, Any]],
    *,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, FamilyAgreement]:
    """Agreement per family over judgement records (``item_id, family, rater_id, best, all_unacceptable``)."""
    by_family: dict[str, dict[str, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    counts: dict[str, int] = defaultdict(int)
    raters: dict[str, set[str]] = defaultdict(set)
    for rec in judgements:
        value = _pick_value(rec)
        if value is None:
            continue
        family = str(rec.get("family") or "default")
        rater = str(rec.get("rater_id") or "")
        item = str(rec.get("item_id") or rec.get("prompt_id") or "")
        counts[family] += 1
        raters[family].add(rater)
        by_family[family][item][rater] = value  # a rater's later judgement of the same item wins

    out: dict[str, FamilyAgreement] = {}
    for family in sorted(by_family):
        items = [sorted(r.items()) for r in by_family[family].values() if len(r) >= 2]
        notes = []
        if len(items) < 2:
            notes.append("fewer than two items rated by two or more raters: agreement cannot be measured")
        alpha = _alpha(items)
        pairwise = _pairwise(items)
        alpha_ci = (
            _bootstrap_ci(items, _alpha, confidence, n_resamples, seed)
            if math.isfinite(alpha)
            else (
                math.nan,
                math.nan,
            )
        )
        pairwise_ci = _bootstrap_ci(items, _pairwise, confidence, n_resamples, seed) if items else (math.nan, math.nan)
        out[family] = FamilyAgreement(
            family=family,
            n_items=len(items),
            n_judgements=counts[family],
            n_raters=len(raters[family]),
            alpha=alpha,
            alpha_ci=alpha_ci,
            pairwise=pairwise,
            pairwise_ci=pairwise_ci,
            confidence=confidence,
            notes=notes,
        )
    return out
