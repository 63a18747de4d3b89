"""Judge calibration: how often each judge agrees with people, measured before its verdicts gate anything.

A suite may carry human-labelled responses per family (``calibration:`` in the suite, inline or
JSONL). Before any generation, evaluate runs every judge a family uses (its judge and, for an
ensemble, each member) on that family's labelled responses and records

- accuracy and Cohen's kappa (agreement beyond chance; its interval is a bootstrap over the
  labelled responses), and the confusion matrix (rows: the person's label, columns: the judge's);
- whether the family's judge reaches ``judge_min_kappa`` (the family's own floor, else the
  calibration section's). A family whose judge does not is not gated: evaluate stops with exit
  code 2 naming the family and the figures (:func:`require_calibrated`).

The measured (person, judge) pairs are kept: the evaluate step reports each family's shares
corrected for this confusion (:func:`preftune.evaluate.metrics.corrected_shares`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from preftune.behaviour.judges import judge_type
from preftune.errors import ConfigError

UNKNOWN = "unknown"
CALIBRATION_FILE = "calibration.json"


def cohen_kappa(human: Sequence[str], judged: Sequence[str]) -> float:
    """Cohen's kappa of two labelings of the same items: (p_o - p_e) / (1 - p_e); NaN when p_e = 1."""
    if len(human) != len(judged) or not human:
        raise ValueError("two labelings of the same, non-empty set of items are needed")
    labels = sorted(set(human) | set(judged))
    col = {b: i for i, b in enumerate(labels)}
    a = np.array([col[x] for x in human])
    b = np.array([col[x] for x in judged])
    return float(_kappa_batch(a[None, :], b[None, :], len(labels))[0])


def _kappa_batch(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Kappa of each row of (R, n) label-index arrays."""
    n = a.shape[1]
    po = (a == b).mean(axis=1)
    pa = np.stack([(a == i).sum(axis=1) for i in range(k)], axis=1) / n
    pb = np.stack([(b == i).sum(axis=1) for i in range(k)], axis=1) / n
    pe = (pa * pb).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (po - pe) / (1.0 - pe)
    return np.where(np.isclose(pe, 1.0), np.nan, out)


def confusion_matrix(human: Sequence[str], judged: Sequence[str], labels: Sequence[str]) -> list[list[int]]:
    """Counts: rows = the person's label, columns = the judge's, both in ``labels`` order."""
    col = {b: i for i, b in enumerate(labels)}
    m = [[0] * len(labels) for _ in labels]
    for h, j in zip(human, judged, strict=True):
        m[col[h]][col[j]] += 1
    return m


@dataclass
class JudgeCalibration:
    """One judge on one family's labelled responses."""

    family: str
    judge: str
    gating: bool  # the family's own judge (an ensemble member is measured, not gated on)
    n: int
    accuracy: float
    kappa: float
    kappa_ci: tuple[float, float]
    labels: list[str]
    confusion: list[list[int]]
    min_kappa: float
    human: list[str] = field(default_factory=list)
    judged: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return math.isfinite(self.kappa) and self.kappa >= self.min_kappa

    def figures(self) -> str:
        lo, hi = self.kappa_ci
        k = "undefined" if not math.isfinite(self.kappa) else f"{self.kappa:.3f}"
        ci = f" [{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) and math.isfinite(hi) else ""
        return f"kappa {k}{ci} < {self.min_kappa:g}, accuracy {self.accuracy:.3f} on {self.n} labelled responses"

    def to_dict(self) -> dict[str, Any]:
        def f(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {
            "family": self.family,
            "judge": self.judge,
            "gating": self.gating,
            "n": self.n,
            "accuracy": self.accuracy,
            "kappa": f(self.kappa),
            "kappa_ci": [f(self.kappa_ci[0]), f(self.kappa_ci[1])],
            "min_kappa": self.min_kappa,
            "passed": self.passed,
            "labels": self.labels,
            "confusion": self.confusion,
        }


@dataclass
class CalibrationReport:
    entries: list[JudgeCalibration]
    confidence: float

    def gating(self) -> dict[str, JudgeCalibration]:
        """family -> its own judge's calibration."""
        return {e.family: e for e in self.entries if e.gating}

    def failures(self) -> list[JudgeCalibration]:
        return [e for e in self.entries if e.gating and not e.passed]

    def to_json(self) -> dict[str, Any]:
        return {"confidence": self.confidence, "judges": [e.to_dict() for e in self.entries]}

    def metrics(self) -> dict[str, float]:
        """MLflow metrics ``calibration.<family>.<judge>.{kappa,accuracy,n}`` (+ kappa interval)."""
        out: dict[str, float] = {}
        for e in self.entries:
            base = f"calibration.{e.family}.{e.judge}"
            out[f"{base}.accuracy"] = e.accuracy
            out[f"{base}.n"] = float(e.n)
            for suffix, v in (("kappa", e.kappa), ("kappa.ci_low", e.kappa_ci[0]), ("kappa.ci_high", e.kappa_ci[1])):
                if math.isfinite(v):
                    out[f"{base}.{suffix}"] = v
        return out

    def tables(self) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        """(one row per family and judge, one row per confusion-matrix cell), as columns for ``mlflow.log_table``."""
        summary: dict[str, list[Any]] = {
            k: [] for k in ("family", "judge", "gating", "n", "accuracy", "kappa", "min_kappa", "passed")
        }
        cells: dict[str, list[Any]] = {k: [] for k in ("family", "judge", "human_label", "judge_label", "count")}
        for e in self.entries:
            for k, v in (
                ("family", e.family),
                ("judge", e.judge),
                ("gating", e.gating),
                ("n", e.n),
                ("accuracy", round(e.accuracy, 4)),
                ("kappa", round(e.kappa, 4) if math.isfinite(e.kappa) else None),
                ("min_kappa", e.min_kappa),
                ("passed", e.passed),
            ):
                summary[k].append(v)
            for i, h in enumerate(e.labels):
                for j, jl in enumerate(e.labels):
                    for k, v in (
                        ("family", e.family),
                        ("judge", e.judge),
                        ("human_label", h),
                        ("judge_label", jl),
                        ("count", e.confusion[i][j]),
                    ):
                        cells[k].append(v)
        return summary, cells

    def pairs(self) -> dict[str, tuple[list[str], list[str]]]:
        """family -> (people's labels, its judge's labels): what the share correction is estimated from."""
        return {f: (e.human, e.judged) for f, e in self.gating().items()}


def _kappa_interval(
    human: Sequence[str], judged: Sequence[str], *, confidence: float, n_resamples: int, seed: int
) -> tuple[float, float]:
    labels = sorted(set(human) | set(judged))
    col = {b: i for i, b in enumerate(labels)}
    a = np.array([col[x] for x in human])
    b = np.array([col[x] for x in judged])
    if len(a) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_resamples, len(a)))
    ks = _kappa_batch(a[idx], b[idx], len(labels))
    ks = ks[np.isfinite(ks)]
    if ks.size < n_resamples // 2:
        return float("nan"), float("nan")
    alpha = (1 - confidence) / 2
    return float(np.quantile(ks, alpha)), float(np.quantile(ks, 1 - alpha))


def calibrate(
    suite: Any, judges: Mapping[str, Any], *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> CalibrationReport | None:
    """Score every judge a family uses on that family's labelled responses (None: the suite has none)."""
    cal = suite.calibration
    if cal is None:
        return None
    entries: list[JudgeCalibration] = []
    for family, items in sorted(cal.by_family().items()):
        fam = suite.families[family]
        top = fam.judge
        spec = suite.judges[top]
        names = [top] + [m for m in judge_type(spec).members(spec) if m != top]
        human = [it.label for it in items]
        for name in names:
            judged = list(judges[name].judge(family, [it.prompt for it in items], [it.response for it in items]))
            labels = sorted(set(human) | set(judged) | {UNKNOWN})
            kappa = cohen_kappa(human, judged)
            entries.append(
                JudgeCalibration(
                    family=family,
                    judge=name,
                    gating=name == top,
                    n=len(items),
                    accuracy=float(np.mean([h == j for h, j in zip(human, judged, strict=True)])),
                    kappa=kappa,
                    kappa_ci=_kappa_interval(human, judged, confidence=confidence, n_resamples=n_resamples, seed=seed),
                    labels=labels,
                    confusion=confusion_matrix(human, judged, labels),
                    min_kappa=cal.min_kappa(fam),
                    human=human,
                    judged=judged,
                )
            )
    return CalibrationReport(entries, confidence)


def require_calibrated(report: CalibrationReport | None, suite: Any) -> None:
    """Refuse to gate on a judge that disagrees with people: ConfigError (exit 2) naming families and figures."""
    if report is None:
        return
    bad = report.failures()
    if bad:
        parts = [f"family {e.family!r}: judge {e.judge!r} {e.figures()}" for e in bad]
        raise ConfigError(
            f"{suite.source}: judge calibration failed, these families cannot be gated: "
            + "; ".join(parts)
            + " (improve the judge or its rubric, or lower judge_min_kappa in the suite's calibration section)"
        )


def render_table(report: CalibrationReport) -> str:
    """A plain-text table for the CLI and the report."""
    rows = [("family", "judge", "n", "accuracy", "kappa", f"{report.confidence * 100:g}% CI", "floor", "verdict")]
    for e in report.entries:
        lo, hi = e.kappa_ci
        rows.append(
            (
                e.family,
                e.judge + ("" if e.gating else " (member)"),
                str(e.n),
                f"{e.accuracy:.3f}",
                f"{e.kappa:.3f}" if math.isfinite(e.kappa) else "undefined",
                f"[{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) and math.isfinite(hi) else "-",
                f"{e.min_kappa:g}",
                ("pass" if e.passed else "FAIL") if e.gating else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
