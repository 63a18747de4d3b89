"""Per-family metrics with bootstrap confidence intervals, from judged samples.

Why over cases and not over samples: the several samples of one prompt are correlated (same
prompt, same model), so the unit that is resampled is the *case*. Each metric is first averaged
over a case's samples, then over cases (every case weighs the same), and the interval is a
bootstrap over cases (``scipy.stats.bootstrap``, BCa; the percentile method when BCa is
undefined, e.g. when every case has the same value). Candidate-minus-champion differences are
*paired* by case (both models answered the same prompts with the same seeds).

Everything here works from plain records (``samples.jsonl``), so the promote step can
recompute a comparison against a champion that changed during evaluation without generating.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

CANDIDATE = "candidate"
CHAMPION = "champion"
POOLED = "all"
CAPABILITY = "capability"

SHARE_METRICS = {
    "preferred_share": ("preferred", "has_preferred"),
    "acceptable_share": ("acceptable", "has_acceptable"),
    "forbidden_share": ("forbidden", "has_forbidden"),
    "needless_refusal_share": ("needless_refusal", "has_needless_refusal"),
    "unknown_share": ("unknown", None),
}
"""metric -> (record flag counted, record flag saying the metric applies to the case; None: always)."""


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its confidence interval and the number of resampled units."""

    value: float
    ci_low: float
    ci_high: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Estimate:
        nan = float("nan")
        return cls(
            float(d["value"]) if d.get("value") is not None else nan,
            float(d["ci_low"]) if d.get("ci_low") is not None else nan,
            float(d["ci_high"]) if d.get("ci_high") is not None else nan,
            int(d.get("n", 0)),
        )


@dataclass
class SampleRecord:
    """One judged response: the unit written to ``samples.jsonl``."""

    model: str
    case_id: str
    family: str
    sample: int
    text: str
    behaviour: str
    preferred: bool
    acceptable: bool
    forbidden: bool
    needless_refusal: bool
    unknown: bool
    has_preferred: bool
    has_acceptable: bool
    has_forbidden: bool
    has_needless_refusal: bool
    words: int
    tokens: int
    ended: bool
    kl: float | None = None
    reward: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("kl", "reward"):
            if d[k] is not None and not math.isfinite(d[k]):
                d[k] = None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SampleRecord:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})


def _rng(seed: int, name: str) -> np.random.Generator:
    """An independent, reproducible stream per metric name (results do not depend on call order)."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _bootstrap_ci(
    data: np.ndarray,
    statistic: Callable[..., Any],
    *,
    vectorized: bool,
    confidence: float,
    n_resamples: int,
    seed: int,
    name: str,
) -> tuple[float, float]:
    """Bootstrap interval of ``statistic`` over the units of ``data`` (BCa, percentile when BCa is undefined)."""
    from scipy.stats import bootstrap

    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = bootstrap(
                (data,),
                statistic,
                n_resamples=n_resamples,
                confidence_level=confidence,
                method=method,
                vectorized=vectorized,
                rng=_rng(seed, name),
            )
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(lo) and math.isfinite(hi):
            return lo, hi
    return float("nan"), float("nan")


def bootstrap_mean(values: Sequence[float], *, confidence: float, n_resamples: int, seed: int, name: str) -> Estimate:
    """Mean of ``values`` with a bootstrap CI (BCa, percentile when BCa is undefined); NaN CI below 2 units."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    value = float(x.mean())
    if x.size < 2:
        return Estimate(value, float("nan"), float("nan"), int(x.size))
    if np.all(x == x[0]):
        return Estimate(value, value, value, int(x.size))
    lo, hi = _bootstrap_ci(
        x, np.mean, vectorized=True, confidence=confidence, n_resamples=n_resamples, seed=seed, name=name
    )
    return Estimate(value, min(lo, value), max(hi, value), int(x.size))


def case_values(records: Iterable[SampleRecord], metric: str) -> dict[str, float]:
    """Per case (id -> value) the mean of ``metric`` over its samples, for the cases it applies to."""
    acc: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if metric in SHARE_METRICS:
            flag, applies = SHARE_METRICS[metric]
            if applies is not None and not getattr(r, applies):
                continue
            acc[r.case_id].append(1.0 if getattr(r, flag) else 0.0)
        elif metric == "response_length":
            acc[r.case_id].append(float(r.words))
        elif metric == "kl_to_reference":
            if r.kl is not None and math.isfinite(r.kl):
                acc[r.case_id].append(float(r.kl))
        else:
            raise KeyError(metric)
    return {cid: float(np.mean(v)) for cid, v in acc.items() if v}


def win_rate_values(candidate: Iterable[SampleRecord], champion: Iterable[SampleRecord]) -> dict[str, float]:
    """Per case, the share of (candidate sample, champion sample) pairs the candidate's reward wins (ties 1/2)."""
    cand: dict[str, list[float]] = defaultdict(list)
    champ: dict[str, list[float]] = defaultdict(list)
    for r in candidate:
        if r.reward is not None:
            cand[r.case_id].append(r.reward)
    for r in champion:
        if r.reward is not None:
            champ[r.case_id].append(r.reward)
    out = {}
    for cid in cand.keys() & champ.keys():
        a = np.asarray(cand[cid])[:, None]
        b = np.asarray(champ[cid])[None, :]
        out[cid] = float(((a > b) + 0.5 * (a == b)).mean())
    return out


def behaviour_shift(
    candidate: Iterable[SampleRecord],
    champion: Iterable[SampleRecord],
    *,
    confidence: float,
    n_resamples: int,
    seed: int,
    name: str,
) -> Estimate | None:
    """How far a group's behaviour mix moved: total variation distance between the two models' shares.

    The shares are pooled over the cases both models answered (each case weighs by its samples);
    0 = the same mix (``unknown`` counts as a behaviour), 1 = nothing in common. The interval is a
    bootstrap over cases. This is what a family with no preferred behaviour (a contested one, left
    out of PPO) can be gated on: it should not move. The champion is sampled with the same seeds,
    so an unchanged model reads 0; a changed one also shows some shift from sampling noise, which
    shrinks as the family gets more cases and samples.
    """
    cand: dict[str, list[str]] = defaultdict(list)
    champ: dict[str, list[str]] = defaultdict(list)
    for r in candidate:
        cand[r.case_id].append(r.behaviour)
    for r in champion:
        champ[r.case_id].append(r.behaviour)
    cases = sorted(cand.keys() & champ.keys())
    if not cases:
        return None
    behaviours = sorted({b for c in cases for b in (*cand[c], *champ[c])})
    col = {b: i for i, b in enumerate(behaviours)}
    counts_c = np.zeros((len(cases), len(behaviours)))
    counts_h = np.zeros((len(cases), len(behaviours)))
    for i, c in enumerate(cases):
        for b in cand[c]:
            counts_c[i, col[b]] += 1
        for b in champ[c]:
            counts_h[i, col[b]] += 1

    def tv(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        # idx: case indices, (n,) or a batch of resamples (..., n); vectorised, as the evaluate step runs it per family
        idx = np.moveaxis(idx, axis, -1)
        a, b = counts_c[idx].sum(axis=-2), counts_h[idx].sum(axis=-2)
        return 0.5 * np.abs(a / a.sum(axis=-1, keepdims=True) - b / b.sum(axis=-1, keepdims=True)).sum(axis=-1)

    everything = np.arange(len(cases))
    value = float(tv(everything))
    if len(cases) < 2:
        return Estimate(value, float("nan"), float("nan"), len(cases))
    lo, hi = _bootstrap_ci(
        everything, tv, vectorized=True, confidence=confidence, n_resamples=n_resamples, seed=seed, name=name
    )
    if not (math.isfinite(lo) and math.isfinite(hi)):  # every resample gives the same figure (e.g. 0)
        lo = hi = value
    return Estimate(value, min(lo, value), max(hi, value), len(cases))


PER_FAMILY_METRICS = (*SHARE_METRICS, "kl_to_reference", "response_length")


def _paired(a: Mapping[str, float], b: Mapping[str, float]) -> list[float]:
    return [a[k] - b[k] for k in sorted(a.keys() & b.keys())]


def compute_metrics(
    records: Sequence[SampleRecord],
    families: Sequence[str],
    *,
    confidence: float,
    n_resamples: int,
    seed: int,
    with_reward: bool = False,
) -> dict[str, dict[str, dict[str, Estimate]]]:
    """``{family|"all": {metric: {"candidate": E, "champion": E, "delta": E}}}``.

    ``champion`` and ``delta`` appear when the records hold champion samples, with
    ``behaviour_shift`` (candidate against champion); ``reward_win_rate`` (candidate over
    champion) when they also hold rewards. A metric that applies to no case of a
    family is absent for that family.
    """
    by_model: dict[str, list[SampleRecord]] = defaultdict(list)
    for r in records:
        by_model[r.model].append(r)
    has_champion = bool(by_model.get(CHAMPION))
    out: dict[str, dict[str, dict[str, Estimate]]] = {}
    groups: list[tuple[str, Callable[[SampleRecord], bool]]] = [(f, (lambda r, f=f: r.family == f)) for f in families]
    groups.append((POOLED, lambda r: True))

    def est(vals: Mapping[str, float] | Sequence[float], name: str) -> Estimate:
        v = list(vals.values()) if isinstance(vals, Mapping) else list(vals)
        return bootstrap_mean(v, confidence=confidence, n_resamples=n_resamples, seed=seed, name=name)

    for group, keep in groups:
        cand = [r for r in by_model[CANDIDATE] if keep(r)]
        champ = [r for r in by_model.get(CHAMPION, []) if keep(r)]
        fam: dict[str, dict[str, Estimate]] = {}
        for metric in PER_FAMILY_METRICS:
            cv = case_values(cand, metric)
            if not cv:
                continue
            entry = {CANDIDATE: est(cv, f"{group}.{metric}")}
            if has_champion:
                hv = case_values(champ, metric)
                if hv:
                    entry[CHAMPION] = est(hv, f"{group}.{metric}.champion")
                    entry["delta"] = est(_paired(cv, hv), f"{group}.{metric}.delta")
            fam[metric] = entry
        if has_champion:
            shift = behaviour_shift(
                cand, champ, confidence=confidence, n_resamples=n_resamples, seed=seed, name=f"{group}.behaviour_shift"
            )
            if shift is not None:
                fam["behaviour_shift"] = {CANDIDATE: shift}
        if has_champion and with_reward:
            wv = win_rate_values(cand, champ)
            if wv:
                fam["reward_win_rate"] = {CANDIDATE: est(wv, f"{group}.reward_win_rate")}
        if fam:
            out[group] = fam
    return out


def capability_metrics(
    candidate: Mapping[str, float],
    reference: Mapping[str, float] | None,
    champion: Mapping[str, float] | None,
    *,
    confidence: float,
    n_resamples: int,
    seed: int,
) -> dict[str, dict[str, Estimate]]:
    """Capability-retention figures from per-text mean log-likelihoods (text id -> nats/token)."""

    def est(vals: Sequence[float], name: str) -> Estimate:
        return bootstrap_mean(vals, confidence=confidence, n_resamples=n_resamples, seed=seed, name=name)

    out: dict[str, dict[str, Estimate]] = {}
    ll = {CANDIDATE: est(list(candidate.values()), "capability.loglik_per_token")}
    if champion:
        ll[CHAMPION] = est(list(champion.values()), "capability.loglik_per_token.champion")
        ll["delta"] = est(_paired(candidate, champion), "capability.loglik_per_token.delta")
    if reference:
        ll["reference"] = est(list(reference.values()), "capability.loglik_per_token.reference")
    out["loglik_per_token"] = ll
    if reference:
        ch = {CANDIDATE: est(_paired(candidate, reference), "capability.loglik_change")}
        if champion:
            ch[CHAMPION] = est(_paired(champion, reference), "capability.loglik_change.champion")
            ch["delta"] = ll["delta"]
        out["loglik_change"] = ch
    return out


def behaviour_shares(records: Iterable[SampleRecord], model: str) -> dict[str, dict[str, float]]:
    """``{family: {behaviour: share}}`` of one model's samples (``unknown`` included)."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in records:
        if r.model == model:
            counts[r.family][r.behaviour] += 1
    return {f: {b: n / sum(c.values()) for b, n in sorted(c.items())} for f, c in counts.items()}


def metrics_to_json(metrics: Mapping[str, Mapping[str, Mapping[str, Estimate]]]) -> dict[str, Any]:
    return {f: {m: {k: e.to_dict() for k, e in v.items()} for m, v in ms.items()} for f, ms in metrics.items()}


def metrics_from_json(data: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Estimate]]]:
    return {f: {m: {k: Estimate.from_dict(e) for k, e in v.items()} for m, v in ms.items()} for f, ms in data.items()}


# --------------------------------------------------------------------------------------
# Shares corrected for the judge's measured confusion

CORRECTED = "corrected"
CORRECTED_CHAMPION = "champion.corrected"
ROLE_OF_METRIC = {
    "preferred_share": "preferred",
    "acceptable_share": "acceptable",
    "forbidden_share": "forbidden",
    "needless_refusal_share": "needless_refusal",
    "unknown_share": "unknown",
}


def confusion_rates(human: Sequence[str], judged: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """P(judge says j | the behaviour is t), rows t, columns j; a label no person used keeps an identity row."""
    col = {b: i for i, b in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)))
    np.add.at(counts, ([col[h] for h in human], [col[j] for j in judged]), 1.0)
    rows = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    empty = rows[:, 0] == 0
    rates[empty] = np.eye(len(labels))[empty]
    return rates


def correct_distribution(observed: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """The behaviour mix p on the simplex whose judged mix p @ rates is nearest (least squares) to ``observed``.

    Matrix inversion (Rogan-Gladen for two behaviours) where it is well posed, clipped to the simplex:
    non-negative least squares with the sum-to-one row weighted heavily, then renormalised.
    """
    from scipy.optimize import nnls

    try:  # well posed and inside the simplex: the exact inverse is the least-squares optimum (residual 0)
        p = np.linalg.solve(rates.T, observed)
        if np.all(np.isfinite(p)) and p.min() >= -1e-12:
            p = np.clip(p, 0.0, None)
            return p / p.sum()
    except np.linalg.LinAlgError:
        pass
    w = 100.0
    a = np.vstack([rates.T, w * np.ones((1, rates.shape[0]))])
    b = np.concatenate([observed, [w]])
    p, _ = nnls(a, b)
    s = p.sum()
    return p / s if s > 0 else np.full(len(p), 1.0 / len(p))


def corrected_shares(
    records: Sequence[SampleRecord],
    family: str,
    model: str,
    case_roles: Mapping[str, Mapping[str, frozenset[str]]],
    human: Sequence[str],
    judged: Sequence[str],
    *,
    confidence: float,
    n_resamples: int,
    seed: int,
) -> dict[str, Estimate]:
    """A family's shares after undoing the judge's measured confusion, with a bootstrap over cases *and* labels.

    ``case_roles``: case id -> role (preferred, acceptable, forbidden, needless_refusal) -> behaviours.
    Cases are grouped by their role sets; each group's pooled judged mix is corrected with the
    confusion rates from the (person, judge) pairs of the family's calibration, and a share is the
    case-weighted mass of the corrected mixes on the role's behaviours. The interval resamples the
    cases and the calibration pairs together, so it carries the judge's own uncertainty as well.
    """
    recs = [r for r in records if r.model == model and r.family == family]
    if not recs or not human:
        return {}
    labels = sorted({r.behaviour for r in recs} | set(human) | set(judged) | {"unknown"})
    col = {b: i for i, b in enumerate(labels)}
    cases = sorted({r.case_id for r in recs})
    counts = np.zeros((len(cases), len(labels)))
    row = {c: i for i, c in enumerate(cases)}
    for r in recs:
        counts[row[r.case_id], col[r.behaviour]] += 1

    # cases with the same roles share one corrected mix: group them, and keep each group's role masks
    def role_row(c: str, role: str) -> tuple[int, ...]:
        names = {"unknown"} if role == "unknown" else case_roles.get(c, {}).get(role, frozenset())
        return tuple(int(b in names) for b in labels)

    keys = [tuple(role_row(c, role) for role in ROLE_OF_METRIC.values()) for c in cases]
    group_keys = sorted(set(keys))
    group_of = np.array([group_keys.index(k) for k in keys])
    masks = {m: np.array([k[i] for k in group_keys], dtype=float) for i, m in enumerate(ROLE_OF_METRIC)}
    applies = {m: (masks[m].sum(axis=1) > 0) | (ROLE_OF_METRIC[m] == "unknown") for m in ROLE_OF_METRIC}
    members = [np.flatnonzero(group_of == g) for g in range(len(group_keys))]
    h_idx = np.array([col[x] for x in human])
    j_idx = np.array([col[x] for x in judged])
    n_lab = len(labels)

    def shares(case_weights: np.ndarray, cal_idx: np.ndarray) -> dict[str, np.ndarray]:
        """Per resample (rows of case multiplicities, rows of calibration indexes): every corrected share."""
        r = case_weights.shape[0]
        flat = (h_idx[cal_idx] * n_lab + j_idx[cal_idx]) + (np.arange(r) * n_lab * n_lab)[:, None]
        conf = np.bincount(flat.ravel(), minlength=r * n_lab * n_lab).reshape(r, n_lab, n_lab).astype(float)
        rows = conf.sum(axis=2, keepdims=True)
        rates = np.where(rows > 0, conf / np.maximum(rows, 1), np.eye(n_lab)[None])
        weight = np.stack([case_weights[:, m].sum(axis=1) for m in members], axis=1)  # (r, groups)
        mixes = np.zeros((r, len(members), n_lab))
        for g, m in enumerate(members):
            pooled = case_weights[:, m] @ counts[m]  # (r, labels): the group's judged samples
            for i in range(r):
                total = pooled[i].sum()
                if total > 0:
                    mixes[i, g] = correct_distribution(pooled[i] / total, rates[i])
        out = {}
        for metric in ROLE_OF_METRIC:
            w = weight * applies[metric][None, :]
            den = w.sum(axis=1)
            if not den.any():
                continue
            mass = (mixes * masks[metric][None]).sum(axis=2)
            out[metric] = np.divide((w * mass).sum(axis=1), den, out=np.full(r, np.nan), where=den > 0)
        return out

    point = {m: float(v[0]) for m, v in shares(np.ones((1, len(cases))), np.arange(len(h_idx))[None]).items()}
    rng = _rng(seed, f"{family}.{model}.corrected")
    picks = rng.integers(0, len(cases), size=(n_resamples, len(cases)))
    case_weights = np.zeros((n_resamples, len(cases)))
    np.add.at(case_weights, (np.arange(n_resamples)[:, None], picks), 1.0)
    draws = shares(case_weights, rng.integers(0, len(h_idx), size=(n_resamples, len(h_idx))))
    applies_cases = {m: applies[m][group_of] for m in ROLE_OF_METRIC}
    alpha = (1 - confidence) / 2
    out: dict[str, Estimate] = {}
    for metric, value in point.items():
        n = int(applies_cases[metric].sum())
        d = np.asarray(draws.get(metric, []))
        d = d[np.isfinite(d)]
        if n < 2 or d.size < 2:
            out[metric] = Estimate(value, float("nan"), float("nan"), n)
            continue
        lo, hi = float(np.quantile(d, alpha)), float(np.quantile(d, 1 - alpha))
        out[metric] = Estimate(value, min(lo, value), max(hi, value), n)
    return out
