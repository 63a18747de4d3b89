"""Held-out observed hard cases: is the candidate better than the champion where production found it wrong?

The suite is versioned and stable on purpose, so it does not contain the prompts production found
the champion answering badly (observe's hard cases, :mod:`preftune.observe.actions`). A retraining
run on those hard cases can pass every suite gate and still answer them worse than the champion
did -- nothing before promotion would see it. ``evaluation.observed_cases`` closes that gap:

- observe marks a stable share of its hard cases ``"split": "heldout"`` (``observe.hard_cases_heldout``);
  training (collect, the PPO rollouts) and the raters skip them;
- evaluate samples the candidate and the champion on the held-out ones (common random numbers, the
  suite's generation settings, ``evaluation.observed_samples_per_prompt`` samples), judges them with
  the suite's judge of each case's family, and reports the figures as the families
  ``observed.<family>`` (pooled: ``observed``): MLflow metrics ``eval.observed.<family>.<metric>``;
- gates: non-regression against the champion per family (``gates.observed_non_regression``, by
  default the suite's ``non_regression`` tolerances) and, optionally, a minimum improvement of pooled
  metrics (``gates.observed_min_gain``, e.g. ``{forbidden_share: 0.1}``). Hard cases are prompts the
  champion failed: it sits at the floor on them (measured on the demo world: forbidden share 1.0 on
  every held-out case), so non-regression alone cannot fail there -- a candidate as bad as the
  champion passes it. The gain gate asks the retraining to show it fixes them.

No absolute thresholds apply: a hard case is by definition one the champion failed, so only the
comparison with the champion is meaningful.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from preftune.behaviour.suite_model import Case, Suite
from preftune.behaviour.thresholds import METRIC_DIRECTIONS
from preftune.data.records import prompt_key, short_hash
from preftune.evaluate.config import GatesSection
from preftune.evaluate.gates import GateResult, judged_difference, non_regression_gates
from preftune.evaluate.metrics import CANDIDATE, CHAMPION, POOLED, Estimate, SampleRecord, compute_metrics

log = logging.getLogger(__name__)

OBSERVED = "observed"  # the pooled slice; its families are "observed.<family>"


def observed_family(family: str) -> str:
    return f"{OBSERVED}.{family}"


@dataclass
class ObservedCases:
    """The held-out observed hard cases evaluate judges, and what was left out."""

    cases: list[Case]
    sources: list[str]
    records: int  # prompt records read
    training_only: int  # records marked 'split: train' in a file that also marks held-out ones (or only train)
    unknown_family: int  # records of a family the suite does not have

    @property
    def families(self) -> list[str]:
        """The suite families the observed cases belong to."""
        return sorted({c.family for c in self.cases})

    def to_json(self) -> dict[str, Any]:
        by_family: dict[str, int] = {}
        for c in self.cases:
            by_family[c.family] = by_family.get(c.family, 0) + 1
        return {
            "sources": self.sources,
            "records": self.records,
            "cases": len(self.cases),
            "cases_per_family": by_family,
            "training_split_left_out": self.training_only,
            "unknown_family_left_out": self.unknown_family,
        }


def load_observed_cases(paths: Sequence[str], suite: Suite, cfg: Any, storage: Any) -> ObservedCases:
    """The cases of ``evaluation.observed_cases``: per file the records marked held out, or every record of a
    file that marks none (a hand-made evaluation file); the roles are the suite family's."""
    from preftune.data.validation import ValidationReport
    from preftune.generation.candidates import load_prompts

    cases: list[Case] = []
    seen: set[str] = set()
    seen_prompts: set[str] = set()
    read = training_only = unknown = 0
    for path in paths:
        records = load_prompts(path, cfg, storage, ValidationReport(max_chars=cfg.data.max_chars))
        read += len(records)
        marked = any(r.split for r in records)
        chosen = [r for r in records if r.split == "heldout"] if marked else records
        training_only += len(records) - len(chosen)
        if marked and not chosen:
            log.warning("%s: every record is marked 'split: train'; no held-out observed case in it", path)
        for r in chosen:
            fam = suite.families.get(r.family)
            if fam is None:
                unknown += 1
                continue
            key = prompt_key(r.prompt)
            if key in seen_prompts:  # the same hard case observed in several windows: judged once
                continue
            seen_prompts.add(key)
            cid = r.prompt_id if r.prompt_id not in seen else "observed-" + short_hash("observed-case", key, n=12)
            seen.add(cid)
            cases.append(
                Case(
                    id=cid,
                    family=fam.name,
                    prompt=r.prompt,
                    tags=r.tags,
                    preferred=fam.preferred,
                    acceptable=fam.acceptable,
                    forbidden=fam.forbidden,
                    needless_refusal=fam.needless_refusal,
                )
            )
    if unknown:
        log.warning(
            "evaluation.observed_cases: %d records of families the suite %s does not have left out", unknown, suite.id
        )
    return ObservedCases(cases, list(paths), read, training_only, unknown)


def observed_suite(suite: Suite, cases: Sequence[Case], samples_per_prompt: int | None) -> Suite:
    """The suite's families, judges and generation settings over the observed cases only (no capability texts,
    no calibration, no thresholds); its hash covers the cases, so stored champion samples are never reused."""
    gen = suite.generation
    if samples_per_prompt is not None:
        gen = gen.model_copy(update={"samples_per_prompt": samples_per_prompt})
    by_family: dict[str, list[Case]] = {}
    for c in cases:
        by_family.setdefault(c.family, []).append(c)
    return dataclasses.replace(
        suite,
        generation=gen,
        cases=list(cases),
        cases_by_family=by_family,
        capability=[],
        thresholds={},
        calibration=None,
        sha256=short_hash(suite.sha256, OBSERVED, gen.samples_per_prompt, [(c.id, c.prompt) for c in cases], n=64),
    )


def relabel(records: Sequence[SampleRecord]) -> list[SampleRecord]:
    """Records of the observed cases under their slice's family names (``observed.<family>``)."""
    return [dataclasses.replace(r, family=observed_family(r.family)) for r in records]


def observed_metrics(
    records: Sequence[SampleRecord], families: Sequence[str], cfg: Any, seed: int, with_reward: bool
) -> dict[str, dict[str, dict[str, Estimate]]]:
    """Per-family figures of the observed slice (relabelled records), and the pooled slice as ``observed``."""
    ev = cfg.evaluation
    fams = sorted({observed_family(f) for f in families})
    out = compute_metrics(
        records, fams, confidence=ev.confidence, n_resamples=ev.bootstrap_resamples, seed=seed, with_reward=with_reward
    )
    if POOLED in out:
        out[OBSERVED] = out.pop(POOLED)
    return out


def observed_gates(
    metrics: Mapping[str, Mapping[str, Mapping[str, Estimate]]],
    families: Sequence[str],
    gates: GatesSection,
    *,
    confidence: float,
    champion_label: str,
) -> list[GateResult]:
    """Non-regression per observed family and, when set, the minimum gain of the pooled preferred share."""
    fams = sorted({observed_family(f) for f in families})
    per_family = gates.model_copy(update={"non_regression": gates.observed_tolerances(), "capability_tolerance": None})
    out = [
        _not_judgeable_is_not_gated(g)
        for g in non_regression_gates(metrics, fams, per_family, confidence=confidence, champion_label=champion_label)
    ]
    for metric, gain in sorted(gates.observed_min_gain.items()):
        out.append(_min_gain_gate(metrics, metric, gain, gates.decision, confidence, champion_label))
    return out


def _not_judgeable_is_not_gated(gate: GateResult) -> GateResult:
    """A family with a single held-out hard case has no interval: reported, not gated (production decides how
    many hard cases a family gets; the suite's own families fail instead, their author decides)."""
    if gate.passed is False and (gate.judged is None or not math.isfinite(gate.judged)):
        why = f"{gate.reason}; too few held-out observed cases: reported, not gated"
        return dataclasses.replace(gate, passed=None, reason=why)
    return gate


def _min_gain_gate(
    metrics: Mapping[str, Mapping[str, Mapping[str, Estimate]]],
    metric: str,
    gain: float,
    decision: str,
    confidence: float,
    champion_label: str,
) -> GateResult:
    """The pooled ``metric`` on the observed cases must improve on the champion's by ``gain`` (on the bound)."""
    higher = METRIC_DIRECTIONS[metric] == "higher"
    limit = gain if higher else -gain
    name = f"{OBSERVED}.{metric}.min_gain"
    entry = metrics.get(OBSERVED, {}).get(metric, {})
    delta = entry.get("delta")
    if delta is None:
        why = "no champion to compare with" if entry else f"no observed case defines {metric}"
        return GateResult(name, OBSERVED, metric, "min_gain", False, None, None, limit, f"{name}: {why}")
    judged, what = judged_difference(delta, higher, decision, confidence, champion_label)
    if not math.isfinite(judged):
        return GateResult(
            name, OBSERVED, metric, "min_gain", False, None, delta.value, limit,
            f"{name}: cannot be judged on a confidence bound with {delta.n} case(s)",
        )  # fmt: skip
    passed = judged >= limit if higher else judged <= limit
    op = (">=" if passed else "<") if higher else ("<=" if passed else ">")
    cand, champ = entry.get(CANDIDATE), entry.get(CHAMPION)
    reason = (
        f"{OBSERVED}.{metric}: {what} {judged:+.4g} {op} {limit:+.4g} on the held-out observed hard cases "
        f"(candidate {cand.value if cand else float('nan'):.4g} vs {champion_label} "
        f"{champ.value if champ else float('nan'):.4g}, {delta.n} cases)"
    )
    if not passed:
        reason += " - the retraining does not fix what production found"
    return GateResult(name, OBSERVED, metric, "min_gain", passed, judged, delta.value, limit, reason)
