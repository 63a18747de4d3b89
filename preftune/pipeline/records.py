"""Step records: what every step returns and what MLflow keeps of it.

Every step adapter (:mod:`preftune.pipeline.adapters`) runs inside :func:`step_run` and returns
a typed result, a subclass of :class:`StepResult`: the fields every step has (status, seconds,
MLflow run, metrics, Markdown report) plus the step's own figures (``dataset_hash``, ``kl``, ...).
The summary of a step (``pipeline/summary.json`` on its own MLflow run, ``steps/<step>.json`` on
the pipeline's run) is :meth:`StepResult.summary`: the common fields, and the step's own fields
under ``outputs``. A step that raises is recorded as ``failed`` with its error and exit code,
whatever it raised, and the error is raised on.

Why a gate is a field and not an exception: a failed fit check, reward gate or evaluation is an
*outcome* of a retraining run, not a failure of it. The component returns the boolean and the
pipeline stops cleanly with ``dsl.If``; real errors still fail the task.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from preftune.errors import ExitCode, PreftuneError
from preftune.pipeline.context import environ, find_pipeline_run, find_runs, mlflow_client, pipeline_id

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import RunConfig

log = logging.getLogger(__name__)

SUMMARY_ARTIFACT = "pipeline/summary.json"
TAG_SNAPSHOT = "preftune.snapshot"
TAG_STEP_STATUS = "preftune.step_status"
TAG_PIPELINE_CONFIG_HASH = "preftune.pipeline_config_hash"
"""The run config's hash as the pipeline got it (a step may adjust its own copy, e.g. ppo's checkpoint folder)."""
TAG_INPUT_DATASET_HASH = "preftune.input_dataset_hash"
GATE_FILE = "GATE_FAILED.md"

OMIT_NONE = {"omit_none": True}
"""``field(metadata=OMIT_NONE)``: an output that only one path of a step has (left out of ``outputs`` when None)."""


@dataclass(kw_only=True)
class StepResult:
    """What every step returns. Subclasses add the step's own figures as fields (its ``outputs``).

    ``pipeline_run_id``, ``snapshot`` and ``seconds`` are filled in by :func:`step_run`; the adapter
    sets ``status`` ("ok", or "stopped" when a gate said no), ``mlflow_run_id``, ``metrics`` and
    ``report_md``.
    """

    step: str = ""
    status: str = "ok"  # ok | stopped (a gate said no) | failed
    pipeline_run_id: str = ""
    snapshot: str | None = None
    mlflow_run_id: str | None = None
    seconds: float | None = None
    error: str | None = None
    exit_code: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    report_md: str = ""

    def outputs(self) -> dict[str, Any]:
        """The step's own figures: every field a subclass adds, in declaration order."""
        common = {f.name for f in fields(StepResult)}
        out = {}
        for f in fields(self):
            if f.name in common:
                continue
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = value
        return out

    def summary(self) -> dict[str, Any]:
        """What MLflow keeps of the step (``pipeline/summary.json``, ``steps/<step>.json``)."""
        return {
            "step": self.step,
            "status": self.status,
            "seconds": self.seconds,
            "pipeline_run_id": self.pipeline_run_id,
            "snapshot": self.snapshot,
            "mlflow_run_id": self.mlflow_run_id,
            "error": self.error,
            "exit_code": self.exit_code,
            "outputs": self.outputs(),
            "metrics": self.metrics,
        }


R = TypeVar("R", bound=StepResult)


@dataclass
class StepRun:
    """A step while it runs: where it runs (pipeline run, parent MLflow run) and, once done, its result."""

    step: str
    pipeline_run_id: str
    snapshot: str | None
    started_at: float
    config_hash: str
    parent_run_id: str | None
    result: StepResult | None = None

    def finish(self, result: R) -> R:
        """Hand over the step's result (returned as it is; :func:`step_run` completes and records it)."""
        self.result = result
        return result


def finite_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of ``values`` as floats (MLflow and Kubeflow refuse NaN/inf and non-numbers)."""
    out = {}
    for k, v in values.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if f == f and f not in (float("inf"), float("-inf")):
            out[k] = f
    return out


def write_gate_file(output: str, text: str) -> None:
    """A stopped step's output folder holds a note saying why (so the artifact exists and explains itself)."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / GATE_FILE).write_text(text.rstrip() + "\n", encoding="utf-8")


def _record(cfg: RunConfig, run: StepRun, res: StepResult) -> None:
    """Attach the step's summary to the pipeline's run (``steps/<step>.json``) and to the step's own run,
    tagged for cache look-ups (best effort: a tracking hiccup must not fail a step)."""
    try:
        client, _ = mlflow_client(cfg)
        if run.parent_run_id:
            client.log_dict(run.parent_run_id, res.summary(), f"steps/{res.step}.json")
        run_id = res.mlflow_run_id
        if run_id is None:
            runs = find_runs(cfg, res.step, pipeline_run_id=res.pipeline_run_id)
            if not runs:
                return
            run_id = res.mlflow_run_id = runs[0].info.run_id
        tags = {TAG_STEP_STATUS: res.status, TAG_PIPELINE_CONFIG_HASH: run.config_hash}
        if res.snapshot:
            tags[TAG_SNAPSHOT] = res.snapshot
        input_hash = getattr(res, "input_dataset_hash", None)
        if input_hash:
            tags[TAG_INPUT_DATASET_HASH] = str(input_hash)
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
        client.log_dict(run_id, res.summary(), SUMMARY_ARTIFACT)
    except Exception as err:  # noqa: BLE001 - the step's own results are already safe
        log.warning("could not record the %s summary in MLflow: %s", res.step, err)


@contextlib.contextmanager
def step_run(step: str, cfg: RunConfig, snapshot: str | None, started_at: float | None) -> Iterator[StepRun]:
    """Run one step under the pipeline's tracking context; record its summary whatever happens.

    The body hands its result to :meth:`StepRun.finish`; on the way out the result gets the run's
    id, snapshot and time, and is recorded. An exception is recorded as a failed step and raised on.
    """
    from preftune import tracking

    pid = pipeline_id()
    parent = os.environ.get(tracking.ENV_PARENT_RUN_ID) or None
    if parent is None:
        try:
            parent = find_pipeline_run(cfg, pid)
        except PreftuneError:
            raise
        except Exception as err:  # noqa: BLE001 - the step opens its own run and reports the server
            log.warning("could not look up the pipeline's MLflow run: %s", err)
    config_hash = cfg.config_hash()
    if parent is not None:  # the hash the pipeline run started with, for the cache look-up of close-run
        with contextlib.suppress(Exception):
            client, _ = mlflow_client(cfg)
            config_hash = client.get_run(parent).data.tags.get(tracking.TAG_CONFIG_HASH) or config_hash
    run = StepRun(
        step=step,
        pipeline_run_id=pid,
        snapshot=snapshot,
        started_at=started_at or time.time(),
        config_hash=config_hash,
        parent_run_id=parent,
    )
    with environ(**{tracking.ENV_PIPELINE_RUN_ID: pid, tracking.ENV_PARENT_RUN_ID: parent}):
        try:
            yield run
        except Exception as err:
            failed = StepResult(status="failed")
            if isinstance(err, PreftuneError):
                failed.error, failed.exit_code = err.message, err.exit_code
            else:
                failed.error, failed.exit_code = f"{type(err).__name__}: {err}", ExitCode.INTERNAL
            _complete(cfg, run, failed)
            raise
        if run.result is None:  # pragma: no cover - a programming error in an adapter
            raise RuntimeError(f"the {step} step returned no result")
        _complete(cfg, run, run.result)


def _complete(cfg: RunConfig, run: StepRun, res: StepResult) -> None:
    res.step = run.step
    res.pipeline_run_id = run.pipeline_run_id
    res.snapshot = run.snapshot
    res.seconds = round(time.time() - run.started_at, 3)
    _record(cfg, run, res)
