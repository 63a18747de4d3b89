"""collect as a pipeline step: candidates from the policy, judgements, the preference dataset."""

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
class CollectStepResult(StepResult):
    """The published dataset: its content hash (an input of every later step), URI and counts."""

    dataset_hash: str
    dataset_uri: str
    counts: dict[str, int] = field(default_factory=dict)
    families: dict[str, dict[str, int]] = field(default_factory=dict)
    sources: dict[str, Any] = field(default_factory=dict)
    format: str | None = None


def _report(res: Any, output: str) -> str:
    lines = [
        "# collect",
        "",
        f"Dataset `{res.hash[:16]}`: {res.counts.get('train_pairs', 0)} training pairs, "
        f"{res.counts.get('eval_pairs', 0)} held-out pairs, {res.counts.get('judgements', 0)} judgements.",
        "",
        "| family | train pairs | eval pairs | prompts |",
        "| --- | ---: | ---: | ---: |",
    ]
    for fam, c in res.families.items():
        lines.append(f"| {fam} | {c.get('train_pairs', 0)} | {c.get('eval_pairs', 0)} | {c.get('prompts', 0)} |")
    validation = Path(output) / "validation.md"
    if validation.is_file():
        lines += ["", validation.read_text(encoding="utf-8")]
    return "\n".join(lines) + "\n"


def collect(
    config: Mapping[str, Any] | RunConfig, output: str, *, snapshot: str, started_at: float | None = None
) -> CollectStepResult:
    """collect: candidates from the policy, judgements, the preference dataset (published at ``output``)."""
    from preftune.collect.step import collect_from_config

    cfg = load(config)
    with step_run("collect", cfg, snapshot, started_at) as run:
        res = collect_from_config(cfg, output, pipeline_run_id=run.pipeline_run_id, progress=False)
        result = run.finish(
            CollectStepResult(
                dataset_hash=res.hash,
                dataset_uri=res.uri,
                counts=res.counts,
                families=res.families,
                sources=res.sources,
                format=res.format,
                mlflow_run_id=res.mlflow_run_id,
                metrics=finite_metrics({f"dataset.{k}": v for k, v in res.counts.items()}),
                report_md=_report(res, output),
            )
        )
    return result
