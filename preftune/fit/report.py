"""The fit report: one JSON summary (for machines and the pipeline) and one markdown page (for people)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from preftune.fit.verdict import COVERAGE_DEFINITION, NOT_MEASURED, PROCEED_VERDICTS, RULE, UNAUDITED

REPORT_FORMAT = "preftune.fit_report"


@dataclass
class FamilyFit:
    family: str
    verdict: str
    reason: str
    agreement: dict[str, Any] | None
    coverage: dict[str, Any] | None
    train_pairs: int = 0
    eval_pairs: int = 0
    action: str = "kept"  # kept | excluded | warned | stop
    rated_items: int = 0  # items with at least one judgement (of the audit, for an audited family)
    audit: dict[str, Any] | None = None  # audited family: the re-raters against the original label

    @property
    def fit(self) -> bool:
        """Does this family go on to train-reward (fit, or accepted unaudited)?"""
        return self.verdict in PROCEED_VERDICTS

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "verdict": self.verdict,
            "reason": self.reason,
            "action": self.action,
            "agreement": self.agreement,
            "coverage": self.coverage,
            "pairs": {"train": self.train_pairs, "eval": self.eval_pairs},
            "rated_items": self.rated_items,
            "audit": self.audit,
        }


@dataclass
class FitReport:
    dataset_uri: str
    dataset_hash: str
    thresholds: dict[str, Any]
    on_unfit: str
    families: dict[str, FamilyFit]
    tags: dict[str, dict[str, Any]] = field(default_factory=dict)
    created_at: str = ""
    output_uri: str | None = None
    output_hash: str | None = None
    mlflow_run_id: str | None = None
    quality: dict[str, Any] | None = None  # preftune.fit.quality figures (QualityFigures.to_dict)
    quality_stop: bool = False  # a quality check was breached with fit.quality.on_breach = stop
    audit: dict[str, Any] | None = None  # the audit export read: source, records, ignored
    unaudited_reason: str | None = None

    @property
    def fit_status(self) -> str:
        """``unaudited`` when a family goes on without measured agreement, ``audited`` when an audit
        measured it, ``not measured`` when nothing goes on because single-rated families were neither
        audited nor accepted, else ``measured`` (what goes on had repeated ratings)."""
        if any(r.verdict == UNAUDITED and r.action in ("kept", "warned") for r in self.families.values()):
            return "unaudited"
        if self.audit:
            return "audited"
        return "not measured" if self.not_measured_families and not self.fit_families else "measured"

    @property
    def not_measured_families(self) -> list[str]:
        return [f for f, r in self.families.items() if r.verdict == NOT_MEASURED]

    @property
    def fit_families(self) -> list[str]:
        return [f for f, r in self.families.items() if r.fit]

    @property
    def unfit_families(self) -> list[str]:
        return [f for f, r in self.families.items() if not r.fit]

    @property
    def excluded_families(self) -> list[str]:
        return [f for f, r in self.families.items() if r.action == "excluded"]

    @property
    def proceed(self) -> bool:
        """May the run go on to train-reward? Never without a fit family; not at all with on_unfit=stop."""
        if not self.fit_families or self.quality_stop:
            return False
        return not (self.on_unfit == "stop" and self.unfit_families)

    @property
    def stop_reason(self) -> str | None:
        if not self.fit_families and self.not_measured_families:
            n = len(self.not_measured_families)
            what = "1 family" if n == 1 else f"{n} families"
            return (
                f"no behaviour family is fit for PPO: agreement not measured (one rating per item) for {what} "
                f"({', '.join(self.not_measured_families)}); run an audit (`preftune audit create --dataset "
                f"{self.dataset_uri}`, then `preftune check-fit --audit EXPORT`) or go on with "
                "`--accept-unaudited REASON`"
            )
        if not self.fit_families:
            return "no behaviour family is fit for PPO"
        if self.quality_stop:
            names = ", ".join((self.quality or {}).get("breaches") or [])
            return f"a data-quality check failed with fit.quality.on_breach 'stop': {names}"
        if self.on_unfit == "stop" and self.unfit_families:
            n = len(self.unfit_families)
            what = "1 family is" if n == 1 else f"{n} families are"
            listed = ", ".join(f"{f} ({self.families[f].verdict})" for f in self.unfit_families)
            return f"fit.on_unfit is 'stop' and {what} not fit: {listed}"
        return None

    @property
    def warnings(self) -> list[str]:
        return [
            f"{f}: {r.verdict} but kept (fit.on_unfit=warn): {r.reason}"
            for f, r in self.families.items()
            if r.action == "warned"
        ]

    def summary(self) -> str:
        """One line for logs and error messages."""
        parts = [f"{f}: {r.verdict}" for f, r in self.families.items()]
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "version": 1,
            "created_at": self.created_at,
            "dataset": {"uri": self.dataset_uri, "hash": self.dataset_hash},
            "thresholds": dict(self.thresholds),
            "rule": RULE,
            "coverage_definition": COVERAGE_DEFINITION,
            "on_unfit": self.on_unfit,
            "families": {f: r.to_dict() for f, r in self.families.items()},
            "tags": self.tags,
            "fit_families": self.fit_families,
            "unfit_families": self.unfit_families,
            "excluded_families": self.excluded_families,
            "warnings": self.warnings,
            "proceed": self.proceed,
            "stop_reason": self.stop_reason,
            "output": {"uri": self.output_uri, "hash": self.output_hash} if self.output_uri else None,
            "mlflow_run_id": self.mlflow_run_id,
            "fit_status": self.fit_status,
            "unaudited_reason": self.unaudited_reason if self.fit_status == "unaudited" else None,
            "audit": self.audit,
            "quality": self.quality,
        }

    def _audit_markdown(self) -> list[str]:
        audited = {f: r for f, r in self.families.items() if r.audit is not None}
        if not self.audit:
            return []
        a = self.audit
        lines = [
            "",
            "## Agreement audit",
            "",
            f"From `{a.get('source')}`: {a.get('records')} re-ratings of this dataset's audit "
            f"({a.get('ignored')} other records ignored). alpha and pairwise above are the re-raters' agreement with "
            "each other; here, with the original label.",
            "",
            "| family | items | alpha with the original label (CI) | re-ratings picking the original's answer (CI) | "
            "re-rater majorities picking it (CI) |",
            "|---|---:|---|---|---|",
        ]
        for f, r in audited.items():
            w = r.audit or {}
            lines.append(
                f"| {f} | {w.get('items', 0)} | {_num(w.get('alpha'))} ({_ci(w.get('alpha_ci'))}) | "
                f"{_pct(w.get('match_share'))} ({_ci(w.get('match_share_ci'))}) | "
                f"{_pct(w.get('majority_match_share'))} ({_ci(w.get('majority_match_share_ci'))}) |"
            )
        return lines

    def to_markdown(self) -> str:
        t = self.thresholds
        lines = [
            "# Test of fit",
            "",
            f"Dataset `{self.dataset_uri}` (version `{self.dataset_hash[:16]}`).",
            "",
        ]
        if self.proceed:
            lines.append(
                f"**Go on**: {len(self.fit_families)} of {len(self.families)} families are fit for PPO "
                f"({', '.join(self.fit_families)})."
            )
        else:
            lines.append(
                f"**Stop**: {self.stop_reason}. Nothing downstream (reward model, PPO) should run on this data."
            )
        lines += [
            "",
            "| family | verdict | alpha (CI) | pairwise (CI) | coverage | items rated by 2+ | judgements | raters | "
            "pairs train/eval | action |",
            "|---|---|---|---|---|---:|---:|---:|---|---|",
        ]
        for f, r in self.families.items():
            a = r.agreement or {}
            cov = r.coverage or {}
            share = cov.get("share")
            cov_txt = (
                f"{share:.0%} ({cov.get('n_covered')}/{cov.get('n_prompts')})" if share is not None else "not measured"
            )
            lines.append(
                f"| {f} | **{r.verdict}** | {_num(a.get('alpha'))} ({_ci(a.get('alpha_ci'))}) | "
                f"{_num(a.get('pairwise'))} ({_ci(a.get('pairwise_ci'))}) | {cov_txt} | {a.get('n_items', 0)} | "
                f"{a.get('n_judgements', 0)} | {a.get('n_raters', 0)} | {r.train_pairs}/{r.eval_pairs} | {r.action} |"
            )
        lines += ["", "## Why", ""]
        for f, r in self.families.items():
            lines.append(f"- **{f}** ({r.verdict}): {r.reason}.")
        lines += self._audit_markdown()
        if self.fit_status == "unaudited":
            lines += [
                "",
                "**Unaudited**: agreement was not measured for "
                + ", ".join(f for f, r in self.families.items() if r.verdict == UNAUDITED)
                + f"; accepted because: {self.unaudited_reason}. Every later run and the registered model are "
                "tagged `preftune.fit=unaudited`.",
            ]
        if self.warnings:
            lines += ["", "## Warnings", ""] + [f"- {w}" for w in self.warnings]
        if self.quality:
            from preftune.fit.quality import quality_markdown

            lines += ["", *quality_markdown(self.quality)]
        lines += [
            "",
            "## What happens next",
            "",
        ]
        if not self.proceed and self.not_measured_families and not self.fit_families:
            lines += [
                "The run stops here (exit code 10): the data has one rating per item, so whether people reliably pick "
                "the better answer is not known. Two ways on:",
                "",
                f"1. Audit: `preftune audit create --dataset {self.dataset_uri} --output AUDIT --import` samples "
                "pairs per family as feedback-service tasks (original choice hidden, order randomised) for K raters; "
                "`preftune audit status --audit AUDIT` follows them; then `preftune check-fit --dataset "
                f"{self.dataset_uri} --audit EXPORT` with the service's export (`preftune serve export`) judges each "
                "family on the re-raters' agreement.",
                '2. Override: `preftune check-fit --accept-unaudited "REASON"` (or `fit.accept_unaudited: true` '
                "with `fit.unaudited_reason`) goes on; every later run and the registered model are tagged "
                "`preftune.fit=unaudited`.",
            ]
        elif not self.proceed:
            lines.append("The run stops here (exit code 10). Fix the data or the rubric, then collect again.")
        elif self.excluded_families:
            lines.append(
                "Families not fit are excluded (fit.on_unfit=exclude): their pairs and judgements are left out of "
                f"the dataset passed on: {', '.join(self.excluded_families)}."
            )
        elif self.unfit_families:
            lines.append("Families not fit are kept with a warning (fit.on_unfit=warn).")
        else:
            lines.append("Every family is fit; the dataset is passed on unchanged.")
        if self.output_uri:
            lines.append("")
            lines.append(f"Dataset passed on: `{self.output_uri}` (version `{(self.output_hash or '')[:16]}`).")
        if self.tags:
            lines += [
                "",
                "## By prompt tag (information only; verdicts are per family)",
                "",
                "| tag | alpha (CI) | pairwise | items rated by 2+ |",
                "|---|---|---|---:|",
            ]
            for tag, a in self.tags.items():
                lines.append(
                    f"| {tag} | {_num(a.get('alpha'))} ({_ci(a.get('alpha_ci'))}) | {_num(a.get('pairwise'))} | "
                    f"{a.get('n_items', 0)} |"
                )
        lines += [
            "",
            "## How to read this",
            "",
            f"- **alpha**: Krippendorff's alpha (nominal) over the picked candidate, among items rated by two or more "
            f"raters: 1 = perfect agreement, 0 = chance. Contested below **{t.get('min_alpha')}**.",
            "- **pairwise**: share of rater pairs on the same item that made the same pick.",
            f"- **coverage**: {COVERAGE_DEFINITION}. Capability gap below **{t.get('min_coverage')}**.",
            f"- **needs data**: fewer than **{t.get('min_items')}** items rated by two or more raters.",
            f"- Intervals: {t.get('confidence')} percentile bootstrap over items ({t.get('bootstrap_resamples')} "
            "resamples).",
            f"- Rule: {RULE}.",
        ]
        return "\n".join(lines) + "\n"


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.2f}"


def _ci(ci: Any) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return "n/a"
    lo, hi = ci[0], ci[1]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    return f"{lo:.2f}-{hi:.2f}"
