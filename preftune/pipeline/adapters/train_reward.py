"""train-reward as a pipeline step: the pairwise reward model and its held-out accuracy gate."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from preftune.errors import ExitCode, PreftuneError
from preftune.pipeline.context import find_runs
from preftune.pipeline.parameters import load
from preftune.pipeline.records import OMIT_NONE, StepResult, finite_metrics, step_run, write_gate_file

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import RunConfig


@dataclass(kw_only=True)
class RewardStepResult(StepResult):
    """The gate's verdict and figures; ``per_family`` and ``model_uri`` when it passed, ``message`` when not."""

    gate_passed: bool
    accuracy: float | None
    min_accuracy: float
    input_dataset_hash: str
    per_family: dict[str, float] | None = field(default=None, metadata=OMIT_NONE)
    gate_reason: str | None = field(default=None, metadata=OMIT_NONE)  # the calibrated gate's figures, one line
    baselines: dict[str, float] | None = field(default=None, metadata=OMIT_NONE)
    model_uri: str | None = field(default=None, metadata=OMIT_NONE)
    message: str | None = field(default=None, metadata=OMIT_NONE)


def _failed_run_metric(cfg: RunConfig, step: str, pid: str, key: str) -> float | None:
    try:
        runs = find_runs(cfg, step, pipeline_run_id=pid)
        return runs[0].data.metrics.get(key) if runs else None
    except Exception:  # noqa: BLE001 - a figure for the message only
        return None


def train_reward(
    config: Mapping[str, Any] | RunConfig,
    dataset: str,
    output: str,
    *,
    snapshot: str,
    dataset_hash: str,
    started_at: float | None = None,
) -> RewardStepResult:
    """train-reward: the pairwise reward model; ``gate_passed`` is False when the calibrated gate fails (clean stop)."""
    from preftune.reward.step import train_reward as _train

    cfg = load(config)
    with step_run("train-reward", cfg, snapshot, started_at) as run:
        try:
            res = _train(cfg, dataset, output, pipeline_run_id=run.pipeline_run_id, progress=False)
        except PreftuneError as err:
            if err.exit_code != ExitCode.REWARD_GATE:
                raise
            report = f"# train-reward: gate failed\n\n{err.message}\n"
            write_gate_file(output, report)
            result = run.finish(
                RewardStepResult(
                    status="stopped",
                    gate_passed=False,
                    accuracy=_failed_run_metric(cfg, "train-reward", run.pipeline_run_id, "reward.eval_accuracy"),
                    message=err.message,
                    gate_reason=err.message,
                    min_accuracy=cfg.reward.min_accuracy,
                    input_dataset_hash=dataset_hash,
                    report_md=report,
                )
            )
        else:
            ev = res.evaluation
            lines = [
                "# train-reward",
                "",
                f"Held-out pairwise accuracy **{ev.accuracy:.3f}** on {ev.n_pairs} pairs.",
                "",
                (res.gate.reason if res.gate is not None else "reward gate passed") + ".",
                "",
                "| family | accuracy |",
                "| --- | ---: |",
                *[f"| {f} | {a:.3f} |" for f, a in res.per_family.items()],
            ]
            result = run.finish(
                RewardStepResult(
                    gate_passed=True,
                    accuracy=res.eval_accuracy,
                    per_family=res.per_family,
                    gate_reason=res.gate.reason if res.gate is not None else None,
                    baselines=res.gate.baselines if res.gate is not None and res.gate.baselines else None,
                    min_accuracy=cfg.reward.min_accuracy,
                    model_uri=res.model_uri,
                    input_dataset_hash=dataset_hash,
                    mlflow_run_id=res.mlflow_run_id,
                    metrics=finite_metrics(res.metrics),
                    report_md="\n".join(lines) + "\n",
                )
            )
    return result
