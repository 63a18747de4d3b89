"""The outcome of a pipeline run: each step's summary (cached steps included) and the verdict.

:func:`gather_steps` collects the summaries the steps recorded in this pipeline run; a step
served from Kubeflow's cache opened no MLflow run, so it gets the summary of the run that
computed it (same snapshot and config hash), marked ``cached``. :func:`decide_outcome` turns the
steps and the run's final state into ``promoted``, ``completed``, ``not-fit``,
``reward-gate-failed``, ``rejected`` or ``failed`` with the contract's exit code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from preftune.errors import ExitCode
from preftune.pipeline.context import find_runs, mlflow_client
from preftune.pipeline.graph import CACHEABLE_STEPS, STEPS
from preftune.pipeline.records import SUMMARY_ARTIFACT, TAG_STEP_STATUS

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import RunConfig

SUCCESS_STATES = ("SUCCEEDED", "SUCCESS", "COMPLETE")
"""Final states of the exit handler's ``PipelineTaskFinalStatus`` that mean the run succeeded."""


def _load_summary(client: Any, run_id: str, path: str = SUMMARY_ARTIFACT) -> dict[str, Any] | None:
    import mlflow

    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{path}")
    except Exception:  # noqa: BLE001 - a run without a summary (e.g. killed before it finished)
        return None


def gather_steps(
    cfg: RunConfig,
    pipeline_run_id: str,
    snapshot: str | None,
    parent: str | None = None,
    config_hash: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Each step's summary in this pipeline run; a step served from the cache gets the summary of the run
    that computed it (same snapshot and config hash, by default the pipeline's), marked ``cached``."""
    client, _ = mlflow_client(cfg)
    config_hash = config_hash or cfg.config_hash()
    recorded = set()
    if parent:
        recorded = {a.path.split("/")[-1].removesuffix(".json") for a in client.list_artifacts(parent, "steps")}
    out: dict[str, dict[str, Any]] = {}
    for step in STEPS:
        summary = _load_summary(client, parent, f"steps/{step}.json") if step in recorded else None
        runs = [] if summary is not None else find_runs(cfg, step, pipeline_run_id=pipeline_run_id)
        if summary is None and runs:
            summary = _load_summary(client, runs[0].info.run_id)
        if summary is None and runs:
            r = runs[0]
            summary = {
                "step": step,
                "status": "failed" if r.info.status == "FAILED" else "unknown",
                "error": r.data.tags.get("preftune.error"),
                "mlflow_run_id": r.info.run_id,
                "outputs": {},
            }
        if summary is not None:
            summary["cached"] = False
        elif step in CACHEABLE_STEPS and snapshot:
            for r in find_runs(cfg, step, max_results=20, snapshot=snapshot, pipeline_config_hash=config_hash):
                if r.data.tags.get(TAG_STEP_STATUS) not in ("ok", "stopped"):
                    continue
                summary = _load_summary(client, r.info.run_id)
                if summary is not None:
                    summary["cached"] = True
                    summary["computed_in"] = summary.get("pipeline_run_id")
                    break
        out[step] = summary or {"step": step, "status": "not run", "cached": False, "outputs": {}}
    return out


def decide_outcome(steps: Mapping[str, Mapping[str, Any]], state: str) -> tuple[str, str, int]:
    """(outcome, one-line message, exit code) of a pipeline run from its steps and final state."""
    failed = [s for s in STEPS if steps.get(s, {}).get("status") == "failed"]
    if failed or state.upper() not in SUCCESS_STATES:
        if failed:
            s = steps[failed[0]]
            return "failed", f"{failed[0]} failed: {s.get('error') or 'see its logs'}", int(s.get("exit_code") or 1)
        return "failed", f"the pipeline ended {state}", ExitCode.INTERNAL
    fit = steps.get("check-fit", {})
    if fit.get("status") == "stopped":
        return "not-fit", "stopped after check-fit: " + str(fit.get("outputs", {}).get("stop_reason")), ExitCode.NOT_FIT
    reward = steps.get("train-reward", {})
    if reward.get("status") == "stopped":
        return "reward-gate-failed", str(reward.get("outputs", {}).get("message")), ExitCode.REWARD_GATE
    ev = steps.get("evaluate", {})
    if ev.get("status") == "stopped":
        reasons = ev.get("outputs", {}).get("reasons") or []
        message = "evaluation gates failed, champion unchanged: " + "; ".join(reasons[:5])
        return "rejected", message, ExitCode.GATE_FAILED
    pr = steps.get("promote", {})
    if pr.get("status") == "stopped":
        reasons = pr.get("outputs", {}).get("reasons") or []
        return "rejected", "promotion rejected, champion unchanged: " + "; ".join(reasons[:5]), ExitCode.GATE_FAILED
    if pr.get("status") == "ok":
        o = pr.get("outputs", {})
        return "promoted", f"promoted as {o.get('registered_model')} version {o.get('version')}", ExitCode.OK
    return "completed", "the pipeline completed", ExitCode.OK
