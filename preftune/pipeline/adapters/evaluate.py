"""evaluate as a pipeline step: the candidate (and the champion) on the behaviour suite, with gates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.pipeline.parameters import load
from preftune.pipeline.records import StepResult, finite_metrics, step_run

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import RunConfig


@dataclass(kw_only=True)
class EvaluateStepResult(StepResult):
    """The gates' verdict (``passed``), each gate, the behaviour shares and the evaluate MLflow run."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    eval_run_id: str | None = None
    first_promotion: bool = False
    champion_version: str | int | None = None
    gates: list[dict[str, Any]] = field(default_factory=list)
    behaviour_shares: dict[str, Any] = field(default_factory=dict)
    suite: str | None = None
    input_dataset_hash: str = ""


def evaluate(
    config: Mapping[str, Any] | RunConfig,
    policy: str,
    reward_model: str | None,
    output: str,
    *,
    dataset_hash: str,
    started_at: float | None = None,
) -> EvaluateStepResult:
    """evaluate: the candidate (and the champion) on the behaviour suite; ``passed`` is the gates' verdict."""
    from preftune.evaluate.step import evaluate as _evaluate

    cfg = load(config)
    with step_run("evaluate", cfg, None, started_at) as run:
        res = _evaluate(cfg, policy, reward_model=reward_model or None, output=output, progress=False)
        shares = res.results.get("behaviour_shares", {})
        metrics = finite_metrics(
            {f"behaviour_share.{f}.{b}": v for f, by in (shares.get("candidate") or {}).items() for b, v in by.items()}
        )
        metrics["eval.gates.passed"] = 1.0 if res.passed else 0.0
        report = Path(output) / "report.md"
        result = run.finish(
            EvaluateStepResult(
                status="ok" if res.passed else "stopped",
                passed=res.passed,
                reasons=res.reasons,
                eval_run_id=res.run_id,
                first_promotion=res.first_promotion,
                champion_version=res.champion_version,
                gates=[g.to_dict() for g in res.gates],
                behaviour_shares=shares,
                suite=res.results.get("suite", {}).get("id"),
                input_dataset_hash=dataset_hash,
                mlflow_run_id=res.run_id,
                metrics=metrics,
                report_md=report.read_text(encoding="utf-8") if report.is_file() else "",
            )
        )
    return result
