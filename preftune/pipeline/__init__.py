"""The steps of one retraining run as plain functions, and everything around them (kfp-free).

This is what the Kubeflow components call (``preftune.components``) and what the pilot runs
in-process: each component is a few lines that pass its artifact paths to a step adapter and copy
the attributes of the typed result to its outputs. Nothing here imports kfp, so every step can
be run and tested without it. (``preftune.pipelines``, plural, holds the kfp graphs.)

| module | owns |
| --- | --- |
| :mod:`~preftune.pipeline.parameters` | the run config as the pipeline's ``config`` parameter and back |
| :mod:`~preftune.pipeline.context` | pipeline run id, MLflow client and run look-ups, step environment |
| :mod:`~preftune.pipeline.preflight` | checks before any step runs (one line naming the field) |
| :mod:`~preftune.pipeline.snapshots` | the data snapshot that keys the step cache |
| :mod:`~preftune.pipeline.records` | ``StepResult``, ``step_run`` (a step's summary in MLflow) |
| :mod:`~preftune.pipeline.adapters` | the six steps, one module each, each with its typed result |
| :mod:`~preftune.pipeline.lifecycle` | open-run and close-run (the parent MLflow run) |
| :mod:`~preftune.pipeline.outcome` | gathering the steps' summaries, the run's outcome and exit code |
| :mod:`~preftune.pipeline.graph` | the step order and which steps are cacheable |
| :mod:`~preftune.pipeline.artifacts` | files the components write (metrics, copies) |
"""

from __future__ import annotations

from preftune.pipeline.adapters import (
    CheckFitStepResult,
    CollectStepResult,
    EvaluateStepResult,
    PPOStepResult,
    PromoteStepResult,
    RewardStepResult,
    check_fit,
    collect,
    evaluate,
    ppo,
    promote,
    train_reward,
)
from preftune.pipeline.context import environ, find_pipeline_run, find_runs, pipeline_id
from preftune.pipeline.graph import CACHEABLE_STEPS, SHARED_STEPS, STEPS
from preftune.pipeline.lifecycle import OpenedRun, close_pipeline_run, open_pipeline_run, read_outcome
from preftune.pipeline.outcome import decide_outcome, gather_steps
from preftune.pipeline.parameters import config_parameter, load
from preftune.pipeline.preflight import preflight
from preftune.pipeline.records import StepResult
from preftune.pipeline.snapshots import data_snapshot, snapshot_sources

__all__ = [
    "CACHEABLE_STEPS",
    "SHARED_STEPS",
    "STEPS",
    "CheckFitStepResult",
    "CollectStepResult",
    "EvaluateStepResult",
    "OpenedRun",
    "PPOStepResult",
    "PromoteStepResult",
    "RewardStepResult",
    "StepResult",
    "check_fit",
    "close_pipeline_run",
    "collect",
    "config_parameter",
    "data_snapshot",
    "decide_outcome",
    "environ",
    "evaluate",
    "find_pipeline_run",
    "find_runs",
    "gather_steps",
    "load",
    "open_pipeline_run",
    "pipeline_id",
    "ppo",
    "preflight",
    "promote",
    "read_outcome",
    "snapshot_sources",
    "train_reward",
]
