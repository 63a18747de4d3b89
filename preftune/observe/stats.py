"""The figures of a window: behaviour shares with intervals, drift tests, the regression check.

Drift test: for each family with enough records, a chi-square test of homogeneity between the
window's behaviour counts and the baseline's (the champion's own evaluation, or the pooled recent
windows), ``unknown`` included as a behaviour. Each family's test runs at ``alpha / k`` for ``k``
families tested (Bonferroni), so the chance that a window raises a false alarm on a baseline whose
mix did not change is at most ``alpha``; a drift also needs a total variation distance of at least
``min_shift``, which only lowers that rate. Sparse categories are pooled into one so every expected
count stays usable.

Regression: a family's forbidden share breaks its gate when the *lower* Wilson bound of the
observed share is above the gate's ``max`` -- the evidence must be clear before a rollback.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

UNKNOWN = "unknown"


@dataclass(frozen=True)
class Share:
    behaviour: str
    k: int
    n: int
    share: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "behaviour": self.behaviour,
            "k": self.k,
            "n": self.n,
            "share": self.share,
            "low": self.low,
            "high": self.high,
        }


def wilson(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of ``k`` successes in ``n`` (scipy's binomtest)."""
    if n == 0:
        return 0.0, 1.0
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def shares(counts: Mapping[str, int], behaviours: list[str], confidence: float) -> dict[str, Share]:
    """Each behaviour's share (and ``unknown``'s) with its Wilson interval."""
    n = int(sum(counts.values()))
    out = {}
    for b in [*behaviours, UNKNOWN]:
        k = int(counts.get(b, 0))
        low, high = wilson(k, n, confidence)
        out[b] = Share(b, k, n, k / n if n else 0.0, low, high)
    return out


def total_variation(a: Mapping[str, int], b: Mapping[str, int]) -> float:
    """Half the L1 distance between the two behaviour mixes."""
    na, nb = sum(a.values()), sum(b.values())
    if not na or not nb:
        return 0.0
    keys = set(a) | set(b)
    return 0.5 * float(sum(abs(a.get(k, 0) / na - b.get(k, 0) / nb) for k in keys))


@dataclass(frozen=True)
class DriftTest:
    baseline: str  # "champion_eval" or "recent"
    family: str
    n_window: int
    n_baseline: int
    tv: float
    p_value: float | None  # None: not tested (too few records)
    threshold: float  # the per-family significance level (alpha / families tested)
    drift: bool

    def to_dict(self) -> dict[str, object]:
        return self.__dict__.copy()


def _pooled_table(window: Mapping[str, int], base: Mapping[str, int], min_expected: float = 5.0) -> np.ndarray:
    """A 2 x K table; categories whose expected count would be below ``min_expected`` are pooled."""
    keys = sorted(set(window) | set(base))
    table = np.array([[window.get(k, 0) for k in keys], [base.get(k, 0) for k in keys]], dtype=float)
    totals = table.sum(axis=1, keepdims=True)
    expected = table.sum(axis=0, keepdims=True) * totals / totals.sum()
    small = expected.min(axis=0) < min_expected
    if small.any():
        pooled = table[:, small].sum(axis=1, keepdims=True)
        table = np.hstack([table[:, ~small], pooled])
    return table[:, table.sum(axis=0) > 0]


def drift_tests(
    window: Mapping[str, Counter],
    baseline: Mapping[str, Counter],
    *,
    name: str,
    alpha: float,
    min_shift: float,
    min_records: int,
) -> dict[str, DriftTest]:
    """One :class:`DriftTest` per family present in both (see the module docstring)."""
    from scipy.stats import chi2_contingency

    families = sorted(f for f in window if f in baseline and baseline[f])
    testable = [
        f for f in families if sum(window[f].values()) >= min_records and sum(baseline[f].values()) >= min_records
    ]
    threshold = alpha / max(len(testable), 1)
    out = {}
    for fam in families:
        w, b = window[fam], baseline[fam]
        tv = total_variation(w, b)
        p = None
        if fam in testable:
            table = _pooled_table(w, b)
            if table.shape[1] >= 2:
                p = float(chi2_contingency(table, correction=False).pvalue)
            else:
                p = 1.0  # everything in one category on both sides: the same mix
        out[fam] = DriftTest(
            baseline=name,
            family=fam,
            n_window=int(sum(w.values())),
            n_baseline=int(sum(b.values())),
            tv=tv,
            p_value=p,
            threshold=threshold,
            drift=p is not None and p < threshold and tv >= min_shift,
        )
    return out


@dataclass(frozen=True)
class GateCheck:
    family: str
    forbidden_k: int
    n: int
    share: float
    low: float
    high: float
    max: float
    broken: bool

    def to_dict(self) -> dict[str, object]:
        return self.__dict__.copy()


def forbidden_checks(
    counts: Mapping[str, Counter],
    forbidden: Mapping[str, frozenset[str]],
    gate_max: Mapping[str, float],
    confidence: float,
) -> dict[str, GateCheck]:
    """For each family with a forbidden-share gate: the observed share and whether it clearly breaks it."""
    out = {}
    for fam, limit in gate_max.items():
        c = counts.get(fam)
        if not c:
            continue
        n = int(sum(c.values()))
        k = int(sum(v for b, v in c.items() if b in forbidden.get(fam, frozenset())))
        low, high = wilson(k, n, confidence)
        out[fam] = GateCheck(fam, k, n, k / n if n else 0.0, low, high, float(limit), broken=low > limit)
    return out
