"""Gates: absolute thresholds and non-regression against the champion, judged on confidence bounds.

Why bounds: with a few hundred samples a share moves by several points between two runs of the
same model. A gate on the point estimate would promote a lucky draw and reject an unlucky one.
So, with ``gates.decision: bound`` (the default):

- ``max`` thresholds are met when the *upper* bound is at most the threshold, ``min`` thresholds
  when the *lower* bound is at least it: the candidate must show it is good enough;
- non-regression for a higher-is-better metric holds when the *lower* bound of the paired
  difference candidate - champion is at least ``-tolerance`` (for lower-is-better metrics: the
  upper bound at most ``+tolerance``): the candidate must show it is no worse than the champion
  by more than the tolerance. The champion is sampled with the same seeds (common random
  numbers), which keeps these paired intervals narrow where the two models agree.

A gate that cannot be judged (no interval with fewer than two cases) fails, with that reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from preftune.behaviour.thresholds import CAPABILITY_METRICS, METRIC_DIRECTIONS, Threshold
from preftune.evaluate.config import GatesSection
from preftune.evaluate.metrics import CANDIDATE, CAPABILITY, POOLED, Estimate


@dataclass
class GateResult:
    """One gate: what was compared, the verdict (None: not applicable) and a sentence saying why."""

    name: str
    family: str
    metric: str
    kind: str  # "absolute" | "non_regression"
    passed: bool | None
    judged: float | None
    point: float | None
    limit: float | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("judged", "point", "limit"):
            if isinstance(d[k], float) and not math.isfinite(d[k]):
                d[k] = None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GateResult:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})

    @property
    def tag_value(self) -> str:
        return "n/a" if self.passed is None else ("pass" if self.passed else "fail")


def _fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.4g}"


def _level(confidence: float) -> str:
    return f"{confidence * 100:g}%"


def judged_difference(
    delta: Estimate, higher: bool, decision: str, confidence: float, champion_label: str
) -> tuple[float, str]:
    """The figure of candidate - champion a comparison gate judges, and how to name it: on ``decision`` 'bound'
    the confidence bound on the side that can fail (lower for a higher-is-better metric), else the estimate."""
    if decision == "bound":
        judged = delta.ci_low if higher else delta.ci_high
        return judged, f"{'lower' if higher else 'upper'} {_level(confidence)} bound of candidate - {champion_label}"
    return delta.value, f"candidate - {champion_label}"


def config_thresholds(gates: GatesSection, has_champion: bool) -> dict[str, dict[str, Threshold]]:
    """The config's shorthand gates as thresholds (merged after the explicit ones)."""
    extra: dict[str, dict[str, Threshold]] = {}
    if gates.max_kl_to_reference is not None:
        extra.setdefault(POOLED, {})["kl_to_reference"] = Threshold(max=gates.max_kl_to_reference)
    if gates.max_capability_drop is not None:
        extra.setdefault(CAPABILITY, {})["loglik_change"] = Threshold(min=-gates.max_capability_drop)
    if gates.min_reward_win_rate is not None and has_champion:
        extra.setdefault(POOLED, {})["reward_win_rate"] = Threshold(min=gates.min_reward_win_rate)
    return extra


def absolute_gates(
    metrics: Mapping[str, Mapping[str, Mapping[str, Estimate]]],
    thresholds: Mapping[str, Mapping[str, Threshold]],
    *,
    decision: str,
    confidence: float,
) -> list[GateResult]:
    out: list[GateResult] = []
    for family in sorted(thresholds):
        for metric, t in sorted(thresholds[family].items()):
            est = metrics.get(family, {}).get(metric, {}).get(CANDIDATE)
            for side, limit in (("min", t.min), ("max", t.max)):
                if limit is None:
                    continue
                name = f"{family}.{metric}.{side}"
                if est is None:
                    out.append(
                        GateResult(
                            name,
                            family,
                            metric,
                            "absolute",
                            None,
                            None,
                            None,
                            limit,
                            f"{family}.{metric}: not measured (no case of this family defines it); gate not applicable",
                        )
                    )
                    continue
                if decision == "bound":
                    judged = est.ci_low if side == "min" else est.ci_high
                    what = f"{'lower' if side == 'min' else 'upper'} {_level(confidence)} bound"
                else:
                    judged, what = est.value, "point estimate"
                if not math.isfinite(judged):
                    passed = False
                    reason = (
                        f"{family}.{metric}: cannot be judged on a confidence bound with {est.n} case(s); "
                        "add cases to the family"
                    )
                else:
                    passed = judged >= limit if side == "min" else judged <= limit
                    op = (">=" if passed else "<") if side == "min" else ("<=" if passed else ">")
                    reason = (
                        f"{family}.{metric}: {what} {_fmt(judged)} {op} {side} {_fmt(limit)} "
                        f"(point {_fmt(est.value)}, {est.n} cases)"
                    )
                out.append(GateResult(name, family, metric, "absolute", passed, judged, est.value, limit, reason))
    return out


def non_regression_gates(
    metrics: Mapping[str, Mapping[str, Mapping[str, Estimate]]],
    families: list[str],
    gates: GatesSection,
    *,
    confidence: float,
    champion_label: str,
) -> list[GateResult]:
    out: list[GateResult] = []
    checks: list[tuple[str, str, float, str]] = [
        (family, metric, tol, METRIC_DIRECTIONS[metric])
        for family in families
        for metric, tol in sorted(gates.non_regression.items())
    ]
    if gates.capability_tolerance is not None:
        checks.append(
            (CAPABILITY, "loglik_per_token", gates.capability_tolerance, CAPABILITY_METRICS["loglik_per_token"])
        )
    for family, metric, tol, direction in checks:
        entry = metrics.get(family, {}).get(metric, {})
        delta = entry.get("delta")
        name = f"{family}.{metric}.non_regression"
        if delta is None:
            if metric in metrics.get(family, {}):
                out.append(
                    GateResult(
                        name,
                        family,
                        metric,
                        "non_regression",
                        None,
                        None,
                        None,
                        tol,
                        f"{family}.{metric}: no paired champion figure; not compared",
                    )
                )
            continue
        cand, champ = entry.get(CANDIDATE), entry.get("champion")
        higher = direction == "higher"
        judged, what = judged_difference(delta, higher, gates.decision, confidence, champion_label)
        if not math.isfinite(judged):
            passed = False
            reason = (
                f"{family}.{metric}: cannot compare with {champion_label} on a confidence bound with {delta.n} case(s)"
            )
        else:
            passed = judged >= -tol if higher else judged <= tol
            if higher:
                verdict = f"{'>=' if passed else '<'} -{_fmt(tol)}"
            else:
                verdict = f"{'<=' if passed else '>'} +{_fmt(tol)}"
            reason = (
                f"{family}.{metric}: {what} {judged:+.4g} {verdict} "
                f"(candidate {_fmt(cand.value if cand else None)} vs "
                f"{champion_label} {_fmt(champ.value if champ else None)})"
            )
            if not passed:
                reason += " - a regression"
        out.append(GateResult(name, family, metric, "non_regression", passed, judged, delta.value, tol, reason))
    return out


def verdict(results: list[GateResult]) -> tuple[bool, list[str]]:
    """Overall pass, and the reason of every failed gate."""
    failed = [g for g in results if g.passed is False]
    return not failed, [g.reason for g in failed]
