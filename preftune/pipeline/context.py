"""Where a step runs: the pipeline run id, the MLflow client, the pipeline's parent run, the environment.

The pipeline run id reaches every step as ``$PREFTUNE_PIPELINE_RUN_ID`` (set by ``preftune run``
for the local runner, and from the pod's ``pipeline/runid`` label on a cluster), *not* as a
component input: an input that changes on every run would make Kubeflow's step cache miss every
time. Steps find the parent MLflow run by that id's tag.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from preftune.common.environment import environ  # noqa: F401 (steps set their run ids with it)

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import RunConfig


def pipeline_id(given: str | None = None) -> str:
    """The pipeline run id: ``$PREFTUNE_PIPELINE_RUN_ID`` (set for every task), else ``given``."""
    from preftune import tracking

    return os.environ.get(tracking.ENV_PIPELINE_RUN_ID) or given or tracking.pipeline_run_id()


def mlflow_client(cfg: RunConfig) -> tuple[Any, str]:
    """An MLflow client on the configured store and the experiment id (created when missing)."""
    from mlflow import MlflowClient

    from preftune import tracking

    exp_id = tracking.configure(cfg)
    return MlflowClient(tracking.resolve_tracking_uri(cfg.tracking)), exp_id


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def find_runs(cfg: RunConfig, step: str, *, max_results: int = 1, **tags: str) -> list[Any]:
    """Runs of ``step`` with the given tag values (keys as in ``preftune.<key>``), newest first."""
    client, exp_id = mlflow_client(cfg)
    filters = [f"tags.`preftune.step` = '{_quote(step)}'"]
    for key, value in tags.items():
        filters.append(f"tags.`preftune.{key}` = '{_quote(str(value))}'")
    return client.search_runs(
        [exp_id], " and ".join(filters), max_results=max_results, order_by=["attributes.start_time DESC"]
    )


def find_pipeline_run(cfg: RunConfig, pipeline_run_id: str) -> str | None:
    """The MLflow run id of the pipeline run's parent run, if it was opened."""
    runs = find_runs(cfg, "pipeline", pipeline_run_id=pipeline_run_id)
    return runs[0].info.run_id if runs else None
