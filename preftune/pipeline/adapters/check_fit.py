"""check-fit as a pipeline step: agreement and coverage per family; ``fit`` says whether the run goes on.

``fit_status`` is also tagged (``preftune.fit``) on the pipeline's run by check-fit itself, so every later
step's run carries it (:func:`preftune.tracking.start_step_run`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from preftune.pipeline.parameters import load
from preftune.pipeline.records import StepResult, finite_metrics, step_run

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import RunConfig


@dataclass(kw_only=True)
class CheckFitStepResult(StepResult):
    """The verdict per family and the dataset of the fit families (``dataset_hash``; empty when not fit)."""

    fit: bool
    input_dataset_hash: str
    dataset_hash: str
    fit_families: list[str] = field(default_factory=list)
    unfit_families: list[str] = field(default_factory=list)
    excluded_families: list[str] = field(default_factory=list)
    stop_reason: str | None = None
    verdicts: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per family: verdict, reason, action, alpha (Krippendorff) and coverage share."""
    fit_status: str = "measured"
    """``measured`` (repeated ratings), ``audited`` (an agreement audit) or ``unaudited`` (fit.accept_unaudited)."""
    unaudited_reason: str | None = None
    quality_breaches: list[str] = field(default_factory=list)
    """Data-quality checks over their fit.quality limit (warned, or the reason of a stop)."""


def check_fit(
    config: Mapping[str, Any] | RunConfig,
    dataset: str,
    output: str,
    *,
    snapshot: str,
    dataset_hash: str,
    started_at: float | None = None,
) -> CheckFitStepResult:
    """check-fit: agreement and coverage per family; ``fit`` is False when the run must stop (clean stop)."""
    from preftune.fit.check import NotFitError, run_check_fit

    cfg = load(config)
    with step_run("check-fit", cfg, snapshot, started_at) as run:
        try:
            report = run_check_fit(dataset, cfg, output, pipeline_run_id=run.pipeline_run_id)
            fit = True
        except NotFitError as err:
            report, fit = err.report, False
        verdicts = {
            f: {
                "verdict": r.verdict,
                "reason": r.reason,
                "action": r.action,
                "alpha": (r.agreement or {}).get("alpha"),
                "coverage": (r.coverage or {}).get("share"),
            }
            for f, r in report.families.items()
        }
        metrics = finite_metrics({f"fit.{f}.alpha": v["alpha"] for f, v in verdicts.items() if v["alpha"] is not None})
        metrics["fit.fit_families"] = float(len(report.fit_families))
        result = run.finish(
            CheckFitStepResult(
                status="ok" if fit else "stopped",
                fit=fit,
                input_dataset_hash=dataset_hash,
                dataset_hash=report.output_hash if fit else "",
                fit_families=report.fit_families,
                unfit_families=report.unfit_families,
                excluded_families=report.excluded_families,
                stop_reason=report.stop_reason,
                verdicts=verdicts,
                fit_status=report.fit_status,
                unaudited_reason=report.unaudited_reason if report.fit_status == "unaudited" else None,
                quality_breaches=list((report.quality or {}).get("breaches") or []),
                mlflow_run_id=report.mlflow_run_id,
                metrics=metrics,
                report_md=report.to_markdown(),
            )
        )
    return result
