"""The pipeline's first and last task: open the parent MLflow run, close it with the outcome.

:func:`open_pipeline_run` checks the run (:mod:`preftune.pipeline.preflight`), fingerprints its
data (:mod:`preftune.pipeline.snapshots`) and creates the parent run, tagged with the pipeline
run id; :func:`close_pipeline_run` (the pipeline's exit handler, so it runs even after a
failure) gathers the steps' summaries into the parent's ``pipeline/outcome.json``
(:mod:`preftune.pipeline.outcome`), which is what ``preftune run`` and ``preftune demo`` print.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from preftune.errors import ConfigError, ExitCode
from preftune.pipeline.context import find_pipeline_run, mlflow_client, pipeline_id
from preftune.pipeline.outcome import decide_outcome, gather_steps
from preftune.pipeline.parameters import load
from preftune.pipeline.preflight import preflight
from preftune.pipeline.records import TAG_SNAPSHOT
from preftune.pipeline.snapshots import data_snapshot

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import RunConfig

OUTCOME_ARTIFACT = "pipeline/outcome.json"
TAG_OUTCOME = "preftune.outcome"
TAG_OUTCOME_MESSAGE = "preftune.outcome.message"
TAG_KUBERNETES_HASH = "preftune.kubernetes_hash"


@dataclass
class OpenedRun:
    """What open-run returns: the parent MLflow run and the data snapshot."""

    parent_run_id: str
    pipeline_run_id: str
    snapshot: str
    sources: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def open_pipeline_run(
    config: Mapping[str, Any] | RunConfig,
    pipeline_run_id: str | None = None,
    *,
    kubernetes_hash: str | None = None,
    local: bool = False,
    started_at: float | None = None,
) -> OpenedRun:
    """Check the run, fingerprint its data and open the parent MLflow run. Returns its id and the snapshot.

    ``kubernetes_hash``: the ``kubernetes`` section's hash the pipeline was compiled with; a run
    config whose section differs fails here (its GPUs, secrets and image would be silently ignored).
    A retried first task finds the parent it opened before and reuses it.
    """
    from preftune import tracking

    t0 = started_at or time.time()
    cfg = load(config)
    if kubernetes_hash and kubernetes_hash != cfg.kubernetes.platform_hash():
        raise ConfigError(
            "the run config's kubernetes section differs from the one this pipeline was compiled with (image, "
            "resources, GPUs and secrets are fixed at compile time): compile the pipeline from this run config "
            "with `preftune compile --config` or submit it with `preftune run --config ... --host URL`"
        )
    preflight(cfg, local=local, check_paths=True)
    snapshot, prints = data_snapshot(cfg)
    pid = pipeline_id(pipeline_run_id)
    client, exp_id = mlflow_client(cfg)
    parent = find_pipeline_run(cfg, pid)
    if parent is None:
        tags = tracking.step_tags("pipeline", cfg, pid)
        tags.update({TAG_SNAPSHOT: snapshot, TAG_KUBERNETES_HASH: cfg.kubernetes.platform_hash()})
        run = client.create_run(exp_id, run_name=f"{cfg.run.name}/pipeline", tags=tags)
        parent = run.info.run_id
        import yaml
        from mlflow.entities import Param

        flat = tracking.flatten(cfg.model_dump(mode="json"))
        params = [Param(k, str("" if v is None else v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(params), 100):
            client.log_batch(parent, params=params[i : i + 100])
        client.log_text(parent, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config/run.yaml")
        client.log_dict(parent, {"snapshot": snapshot, "sources": prints}, "pipeline/snapshot.json")
    return OpenedRun(
        parent_run_id=parent,
        pipeline_run_id=pid,
        snapshot=snapshot,
        sources=prints,
        seconds=round(time.time() - t0, 3),
    )


def close_pipeline_run(
    config: Mapping[str, Any] | RunConfig,
    pipeline_run_id: str | None = None,
    *,
    state: str = "SUCCEEDED",
    error: str | None = None,
) -> dict[str, Any]:
    """End the parent MLflow run with the pipeline's outcome (the exit handler: runs after a failure too)."""
    from preftune import tracking

    pid = pipeline_id(pipeline_run_id)
    try:
        cfg = load(config)
    except ConfigError as err:  # open-run failed on it already; nothing was opened to close
        return {
            "pipeline_run_id": pid,
            "outcome": "failed",
            "exit_code": err.exit_code,
            "parent_run_id": None,
            "message": err.message,
            "steps": {},
        }
    client, _ = mlflow_client(cfg)
    parent = find_pipeline_run(cfg, pid)
    if parent is None:
        return {
            "pipeline_run_id": pid,
            "outcome": "failed",
            "exit_code": ExitCode.INTERNAL,
            "parent_run_id": None,
            "message": error or "the pipeline failed before its MLflow run was opened",
            "steps": {},
        }
    parent_tags = client.get_run(parent).data.tags
    snapshot = parent_tags.get(TAG_SNAPSHOT)
    # the config hash the run started with (the code that reads the config may have changed since)
    steps = gather_steps(cfg, pid, snapshot, parent, parent_tags.get(tracking.TAG_CONFIG_HASH))
    outcome, message, code = decide_outcome(steps, state)
    if outcome == "failed" and error and not any(s.get("status") == "failed" for s in steps.values()):
        message = f"{message}: {error}"
    result = {
        "pipeline_run_id": pid,
        "parent_run_id": parent,
        "snapshot": snapshot,
        "state": state,
        "outcome": outcome,
        "message": message,
        "exit_code": code,
        "steps": steps,
        "tracking_uri": tracking.resolve_tracking_uri(cfg.tracking),
    }
    client.log_dict(parent, result, OUTCOME_ARTIFACT)
    client.set_tag(parent, TAG_OUTCOME, outcome)
    client.set_tag(parent, TAG_OUTCOME_MESSAGE, message[:5000])
    for step, s in steps.items():
        if s.get("seconds") is not None and not s.get("cached"):
            client.log_metric(parent, f"pipeline.seconds.{step}", float(s["seconds"]))
    status = {"SUCCEEDED": "FINISHED", "FAILED": "FAILED", "CANCELED": "KILLED", "CANCELLED": "KILLED"}.get(
        state.upper(), "FINISHED" if outcome != "failed" else "FAILED"
    )
    if outcome == "failed":
        status = "FAILED" if status == "FINISHED" else status
        client.set_tag(parent, tracking.TAG_ERROR, message[:4000])
    client.set_terminated(parent, status)
    return result


def read_outcome(config: Mapping[str, Any] | RunConfig, pipeline_run_id: str) -> dict[str, Any] | None:
    """The outcome a finished pipeline run recorded on its parent MLflow run (None when there is none)."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    cfg = load(config)
    parent = find_pipeline_run(cfg, pipeline_run_id)
    if parent is None:
        return None
    try:
        return mlflow.artifacts.load_dict(f"runs:/{parent}/{OUTCOME_ARTIFACT}")
    except Exception:  # noqa: BLE001 - the exit handler did not run
        return None
