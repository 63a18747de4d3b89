"""The reward gate, calibrated to the data: is this reward model better than trivial, and near what people agree on?

An absolute accuracy bar misjudges real data (0.63 is a good reward model on HH-RLHF harmless,
where crowdworkers agree ~63-70 %; 0.8 may be no better than "pick the longer answer" on easy
data). The gate therefore asks, on the held-out pairs:

1. **baseline** — does the reward model beat the best trivial baseline (:mod:`preftune.scoring.baselines`:
   the length rule and the bag-of-words model, fitted on the training pairs)? Statistic: the
   lift ``accuracy - max(baseline accuracies)``; its one-sided lower confidence bound comes from a
   *paired cluster bootstrap*: held-out prompts are resampled with replacement (pairs of one prompt
   stay together, since best-of-N judgements and several raters make them correlated) and the
   reward model and every baseline are re-scored on the same resample; the max over baselines is
   taken inside each resample, so picking the best baseline is part of the interval. Pass when
   the lower bound exceeds ``reward.gate.min_lift``. When the best baseline is already within
   ``min_headroom`` of the ceiling (the measured agreement, else 1.0), there is nothing left to
   beat it by (easy data, or labels no better than a keyword rule): the check becomes "reach
   ``min_ceiling_share`` of that ceiling" instead.
2. **ceiling** — where check-fit measured agreement (repeated ratings: pooled pairwise agreement;
   an audit: the share of re-ratings that pick the dataset's label), accuracy on those families'
   held-out pairs must reach ``min_ceiling_share`` of the pair-weighted ceiling (point estimates).
3. **floor** — ``reward.min_accuracy`` when set.

numpy only; the verdict's ``reason`` names every figure.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from preftune.scoring.baselines import bag_of_words_correct, length_rule_correct

FIT_REPORT_FILE = "fit_report.json"
BASELINE_NAMES = {"length": "length rule", "bag_of_words": "bag-of-words"}
# check-fit verdicts whose agreement figure is a real measurement (not "needs data" / "not measured" / "unaudited")
_MEASURED_VERDICTS = ("fit", "contested", "capability gap")


@dataclass(frozen=True)
class Ceiling:
    """The agreement ceiling of one family: what people themselves reach on these labels."""

    family: str
    value: float
    source: str  # "audit" (re-raters vs the dataset's label) or "repeated ratings" (raters vs each other)


def ceilings_from_fit_report(report: Mapping[str, Any] | None) -> dict[str, Ceiling]:
    """Per-family agreement ceilings from check-fit's ``fit_report.json`` (empty when nothing was measured).

    Audited families: ``audit.match_share`` (share of re-ratings picking the dataset's label: how
    often a fresh person agrees with the labels the model is scored against). Families with
    repeated ratings: ``agreement.pairwise`` (pooled pairwise agreement between raters).
    Families whose agreement was not measured get no ceiling.
    """
    out: dict[str, Ceiling] = {}
    for fam, rec in ((report or {}).get("families") or {}).items():
        if not isinstance(rec, Mapping):
            continue
        audit = rec.get("audit") or {}
        agreement = rec.get("agreement") or {}
        share = audit.get("match_share") if isinstance(audit, Mapping) else None
        if isinstance(share, (int, float)) and math.isfinite(share):
            out[fam] = Ceiling(fam, float(share), "audit")
            continue
        pairwise = agreement.get("pairwise") if isinstance(agreement, Mapping) else None
        if rec.get("verdict") in _MEASURED_VERDICTS and isinstance(pairwise, (int, float)) and math.isfinite(pairwise):
            out[fam] = Ceiling(fam, float(pairwise), "repeated ratings")
    return out


def read_fit_report(dataset_root: str | Path) -> dict[str, Any] | None:
    """``fit_report.json`` of a dataset folder (check-fit writes it into the dataset it passes on), or None."""
    path = Path(dataset_root) / FIT_REPORT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class GateCheck:
    name: str  # "baseline", "ceiling", "floor"
    passed: bool
    detail: str


@dataclass
class GateVerdict:
    """Every figure of the gate, and the reason that names them."""

    passed: bool
    enforced: bool  # reward.gate.enabled: a failed check stops the step
    reason: str
    n_pairs: int
    n_prompts: int
    accuracy: float
    baselines: dict[str, float] = field(default_factory=dict)
    best_baseline: str | None = None
    lift: float | None = None
    lift_lower: float | None = None
    confidence: float = 0.95
    rule: str | None = None  # "superiority", or "no headroom" (the best baseline is at the ceiling)
    required_lift: float | None = None
    needed_lift: float | None = None  # lift at which the lower bound would clear required_lift, at this spread
    ceiling: float | None = None
    ceiling_source: str | None = None
    ceiling_accuracy: float | None = None  # accuracy on the families that have a ceiling
    ceiling_share: float | None = None
    min_ceiling_share: float | None = None
    floor: float | None = None
    cross_fit_folds: int | None = None  # the figures are cross-fitted over all pairs (reward.gate.cross_fit_folds)
    checks: list[GateCheck] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}

    def metrics(self) -> dict[str, float]:
        """MLflow metrics (``reward.gate.*``, ``reward.baseline.*``); non-finite and missing figures left out."""
        m: dict[str, float | None] = {
            "reward.gate_passed": 1.0 if self.passed else 0.0,
            "reward.gate.lift": self.lift,
            "reward.gate.lift_lower": self.lift_lower,
            "reward.gate.required_lift": self.required_lift,
            "reward.gate.needed_lift": self.needed_lift,
            "reward.gate.ceiling": self.ceiling,
            "reward.gate.ceiling_share": self.ceiling_share,
            "reward.gate.floor": self.floor,
            "reward.gate.cross_fit_folds": self.cross_fit_folds,
        }
        for name, acc in self.baselines.items():
            m[f"reward.baseline.{name}"] = acc
        return {k: float(v) for k, v in m.items() if v is not None and math.isfinite(v)}


def lift_lower_bound(
    model: np.ndarray,
    baselines: Mapping[str, np.ndarray],
    groups: Sequence[str],
    *,
    confidence: float,
    resamples: int,
    seed: int,
) -> float:
    """One-sided lower bound of ``mean(model) - max_k mean(baseline_k)``: paired cluster bootstrap over ``groups``."""
    model = np.asarray(model, dtype=np.float64)
    names = list(baselines)
    if not names or model.size == 0:
        return float("nan")
    _, cluster = np.unique(np.asarray(list(groups)), return_inverse=True)
    n_groups = int(cluster.max()) + 1
    size = np.bincount(cluster, minlength=n_groups).astype(np.float64)
    sums = np.stack(
        [np.bincount(cluster, weights=model, minlength=n_groups)]
        + [np.bincount(cluster, weights=np.asarray(baselines[k], dtype=np.float64), minlength=n_groups) for k in names]
    )  # (1 + K, G): per-prompt sums of per-pair credit
    rng = np.random.default_rng(seed)
    lifts = np.empty(resamples)
    chunk = max(1, min(resamples, 2_000_000 // max(n_groups, 1)))
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        counts = np.stack([np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups) for _ in range(k)])
        acc = (counts @ sums.T) / (counts @ size)[:, None]  # (k, 1 + K) accuracies per resample
        lifts[start : start + k] = acc[:, 0] - acc[:, 1:].max(axis=1)
    return float(np.quantile(lifts, 1.0 - confidence))


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


def evaluate_gate(
    *,
    accuracy_per_pair: np.ndarray,
    train_pairs: Sequence[Any],
    eval_pairs: Sequence[Any],
    gate: Any,
    min_accuracy: float | None = None,
    fit_report: Mapping[str, Any] | None = None,
    seed: int = 0,
    baseline_credit: Mapping[str, np.ndarray] | None = None,
    cross_fit_folds: int | None = None,
) -> GateVerdict:
    """The gate's verdict for a reward model whose per-pair credit on ``eval_pairs`` is ``accuracy_per_pair``.

    ``accuracy_per_pair``: 1 / 0 / 0.5 (tie) per held-out pair, in ``eval_pairs`` order.
    ``train_pairs`` / ``eval_pairs``: objects with ``prompt``, ``chosen``, ``rejected``, ``family``
    and ``prompt_id`` (:class:`preftune.reward.data.PreferencePair`). ``gate``: a
    :class:`preftune.reward.config.RewardGateSection`. ``baseline_credit``: per-pair baseline results
    already computed (a cross-fit, :mod:`preftune.reward.crossfit`: each pair scored by baselines
    fitted without its fold) instead of baselines fitted on ``train_pairs``; ``cross_fit_folds``
    then says how many folds, and the reason says the gate judged the training procedure.
    """
    credit = np.asarray(accuracy_per_pair, dtype=np.float64)
    if credit.shape != (len(eval_pairs),):
        raise ValueError(f"{credit.size} per-pair results for {len(eval_pairs)} held-out pairs")
    accuracy = float(credit.mean()) if credit.size else float("nan")
    groups = [str(getattr(p, "prompt_id", "") or getattr(p, "prompt", "")) for p in eval_pairs]
    checks: list[GateCheck] = []
    v = GateVerdict(
        passed=True,
        enforced=bool(gate.enabled),
        reason="",
        n_pairs=len(eval_pairs),
        n_prompts=len(set(groups)),
        accuracy=accuracy,
        confidence=float(gate.confidence),
        floor=min_accuracy or None,
        min_ceiling_share=float(gate.min_ceiling_share) if gate.min_ceiling_share > 0 else None,
        cross_fit_folds=cross_fit_folds,
    )

    # ceiling (pair-weighted over the held-out families that have one)
    ceilings = ceilings_from_fit_report(fit_report)
    with_ceiling = [i for i, p in enumerate(eval_pairs) if getattr(p, "family", None) in ceilings]
    if with_ceiling:
        fams = [eval_pairs[i].family for i in with_ceiling]
        v.ceiling = float(np.mean([ceilings[f].value for f in fams]))
        v.ceiling_source = ", ".join(sorted({ceilings[f].source for f in fams}))
        v.ceiling_accuracy = float(credit[with_ceiling].mean())
        v.ceiling_share = v.ceiling_accuracy / v.ceiling if v.ceiling > 0 else float("inf")

    # baseline
    per_pair = _baseline_results(gate.baselines, train_pairs, eval_pairs, seed, baseline_credit)
    if per_pair and credit.size:
        v.baselines = {k: float(x.mean()) for k, x in per_pair.items()}
        v.best_baseline = max(v.baselines, key=lambda k: v.baselines[k])
        best = v.baselines[v.best_baseline]
        v.lift = accuracy - best
        v.lift_lower = lift_lower_bound(
            credit,
            per_pair,
            groups,
            confidence=gate.confidence,
            resamples=gate.bootstrap_resamples,
            seed=seed,
        )
        top = v.ceiling if v.ceiling is not None else 1.0
        named = f"{BASELINE_NAMES[v.best_baseline]} {best:.3f}"
        level = f"{gate.confidence:.0%} lower bound"
        if top - best <= gate.min_headroom:
            v.rule = "no headroom"
            need = gate.min_ceiling_share * top
            why = (
                f"the best baseline ({named}) is within {gate.min_headroom:.3f} of the ceiling {top:.3f}"
                f"{'' if v.ceiling is not None else ' (no agreement measured: 1.0)'}, so there is nothing left to beat "
                f"it by; accuracy {accuracy:.3f} must instead reach {gate.min_ceiling_share:.0%} of that ceiling "
                f"({need:.3f}); lift {v.lift:+.3f}, {level} {v.lift_lower:+.3f}"
            )
            ok = bool(accuracy >= need)
        else:
            v.rule, v.required_lift = "superiority", float(gate.min_lift)
            why = (
                f"lift over the best baseline ({named}) {v.lift:+.3f}, {level} {v.lift_lower:+.3f} vs more than "
                f"{gate.min_lift:+.3f} required"
            )
            ok = bool(v.lift_lower > v.required_lift)
            if math.isfinite(v.lift_lower):
                v.needed_lift = v.required_lift + (v.lift - v.lift_lower)
                if not ok:
                    why += (
                        f"; with {v.n_pairs} held-out pairs the bound sits {v.lift - v.lift_lower:.3f} below the "
                        f"lift, so a lift of about {v.needed_lift:+.3f} would pass (a better model, or more "
                        "held-out pairs for a narrower bound)"
                    )
        others = ", ".join(f"{BASELINE_NAMES[k]} {a:.3f}" for k, a in v.baselines.items() if k != v.best_baseline)
        if others:
            why += f" (also: {others})"
        checks.append(GateCheck("baseline", ok, why))
    elif not credit.size:
        checks.append(GateCheck("baseline", False, "no held-out pairs"))

    if v.ceiling is not None and v.min_ceiling_share is not None:
        checks.append(
            GateCheck(
                "ceiling",
                bool(v.ceiling_share >= v.min_ceiling_share),
                f"accuracy {v.ceiling_accuracy:.3f} on {len(with_ceiling)} pairs of families with measured agreement "
                f"is {v.ceiling_share:.0%} of their agreement ceiling {v.ceiling:.3f} ({v.ceiling_source}); "
                f"at least {v.min_ceiling_share:.0%} required",
            )
        )
    if min_accuracy:  # None or 0: no floor
        checks.append(
            GateCheck(
                "floor",
                bool(accuracy >= min_accuracy),
                f"accuracy {_fmt(accuracy)} vs the reward.min_accuracy floor {min_accuracy:.3f}",
            )
        )
    v.checks = checks
    v.passed = all(c.passed for c in checks)
    scope = (
        f"cross-fitted ({cross_fit_folds} folds by prompt: every pair scored by a model and baselines trained "
        "without it, so the gate judges the training procedure; the published model is the one trained on the "
        "training split) pairwise accuracy"
        if cross_fit_folds
        else "held-out pairwise accuracy"
    )
    head = (
        f"reward gate {'passed' if v.passed else 'failed'}: {scope} {_fmt(accuracy)} on "
        f"{v.n_pairs} pairs ({v.n_prompts} prompts)"
    )
    if not checks:
        v.reason = head + "; no gate check configured"
    else:
        v.reason = head + "; " + "; ".join(f"{c.name} {'ok' if c.passed else 'FAILED'}: {c.detail}" for c in checks)
    if v.ceiling is None and (fit_report is None or not ceilings):
        v.reason += "; agreement not measured (no ceiling check)"
    return v


def _baseline_results(
    names: Sequence[str],
    train_pairs: Sequence[Any],
    eval_pairs: Sequence[Any],
    seed: int,
    given: Mapping[str, np.ndarray] | None,
) -> dict[str, np.ndarray]:
    """Per-pair credit of each configured baseline: ``given`` (cross-fitted) or fitted on ``train_pairs`` here."""
    if given is not None:
        missing = [n for n in names if n not in given]
        if missing:
            raise ValueError(f"no per-pair results for the baselines {missing}")
        out = {n: np.asarray(given[n], dtype=np.float64) for n in names}
        for n, x in out.items():
            if x.shape != (len(eval_pairs),):
                raise ValueError(f"baseline {n}: {x.size} per-pair results for {len(eval_pairs)} pairs")
        return out
    per_pair: dict[str, np.ndarray] = {}
    if "length" in names:
        per_pair["length"] = length_rule_correct(eval_pairs, train_pairs)
    if "bag_of_words" in names:
        per_pair["bag_of_words"] = bag_of_words_correct(train_pairs, eval_pairs, seed=seed)
    return per_pair
