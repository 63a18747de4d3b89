"""MLflow tracking: one naming and tagging scheme for every step of every run.

Every step opens its run through :func:`start_step_run`, so that runs carry the same tags
(the contract in ``docs/architecture.md``) and a pipeline run appears in the MLflow UI as
one tree: a parent run per pipeline run and a nested run per step.

The default store is a SQLite file under the preftune home, with artifacts beside it, so
a laptop needs no server; any tracking URI works from the config or ``MLFLOW_TRACKING_URI``.
``mlflow`` is imported inside the functions: importing it costs seconds.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune import __version__
from preftune.common.environment import environ
from preftune.errors import UnreachableError
from preftune.home import preftune_home

if TYPE_CHECKING:  # pragma: no cover
    import mlflow

    from preftune.config import RunConfig, TrackingSection

ENV_PIPELINE_RUN_ID = "PREFTUNE_PIPELINE_RUN_ID"
ENV_PARENT_RUN_ID = "PREFTUNE_PARENT_RUN_ID"
ENV_GIT_SHA = "PREFTUNE_GIT_SHA"

TAG_STEP = "preftune.step"
TAG_PIPELINE_RUN_ID = "preftune.pipeline_run_id"
TAG_GIT_SHA = "preftune.git_sha"
TAG_CONFIG_HASH = "preftune.config_hash"
TAG_VERSION = "preftune.version"
TAG_RUN_NAME = "preftune.run_name"
TAG_ERROR = "preftune.error"
TAG_FIT = "preftune.fit"
TAG_FIT_REASON = "preftune.fit.reason"
INHERITED_TAGS = (TAG_FIT, TAG_FIT_REASON)
"""Tags a step run copies from the pipeline's run: check-fit sets them there (``preftune.fit``:
``measured`` / ``audited`` / ``unaudited``), so every later step's run carries the fit status."""

_PROCESS_PIPELINE_RUN_ID = uuid.uuid4().hex[:12]


def resolve_tracking_uri(section: TrackingSection | None = None) -> str:
    """The tracking URI: config, then ``$MLFLOW_TRACKING_URI``, then SQLite under the preftune home."""
    if section is not None and section.uri:
        return section.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{preftune_home() / 'mlflow.db'}"


def default_artifact_root() -> str:
    """Artifact root for experiments created on a local (file or SQLite) store."""
    root = preftune_home() / "mlartifacts"
    root.mkdir(parents=True, exist_ok=True)
    return root.as_uri()


def pipeline_run_id() -> str:
    """The id shared by every step of one pipeline run (kfp sets it; else one per process)."""
    return os.environ.get(ENV_PIPELINE_RUN_ID) or _PROCESS_PIPELINE_RUN_ID


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    """The code's git sha: baked into the image as ``$PREFTUNE_GIT_SHA``, else read from a checkout."""
    env = os.environ.get(ENV_GIT_SHA)
    if env:
        return env
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, with one line, when the tracking store cannot be reached."""
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (URI from config)
                if resp.status != 200:
                    raise UnreachableError(f"MLflow tracking server {uri} answered {resp.status} on /health")
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            reason = getattr(err, "reason", err)
            raise UnreachableError(
                f"MLflow tracking server {uri} is unreachable ({reason}): start it, or set tracking.uri / "
                "MLFLOW_TRACKING_URI to a reachable server"
            ) from None
    elif uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    elif "://" in uri and not uri.startswith("file:"):
        # a database-backed store (postgresql+psycopg2://, mysql+pymysql://, ...)
        from sqlalchemy import create_engine, text
        from sqlalchemy.exc import SQLAlchemyError

        connect_args = {"connect_timeout": int(max(1, timeout_s))} if uri.startswith("postgres") else {}
        try:
            engine = create_engine(uri, connect_args=connect_args)
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            engine.dispose()
        except (SQLAlchemyError, ImportError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UnreachableError(f"MLflow tracking store {uri} is unreachable: {first}") from None


# The MLflow UI opens an experiment by its kind: a model-training experiment opens on its runs and
# models, not on the GenAI "Overview" of traces.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def configure(cfg: RunConfig) -> str:
    """Point mlflow at the configured store and experiment; returns the experiment id."""
    import mlflow

    uri = resolve_tracking_uri(cfg.tracking)
    check_reachable(uri, cfg.tracking.timeout_s)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
            mlflow.MlflowClient(uri).set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        mlflow.set_experiment(experiment_id=exp.experiment_id)
        return exp.experiment_id
    local_store = not uri.startswith(("http://", "https://", "databricks"))
    try:
        exp_id = mlflow.create_experiment(
            cfg.tracking.experiment,
            artifact_location=default_artifact_root() if local_store else None,
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
        )
    except mlflow.exceptions.MlflowException:  # created concurrently by another step
        exp_id = mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def step_tags(step: str, cfg: RunConfig, pipeline_id: str | None = None) -> dict[str, str]:
    return {
        TAG_STEP: step,
        TAG_PIPELINE_RUN_ID: pipeline_id or pipeline_run_id(),
        TAG_GIT_SHA: git_sha(),
        TAG_CONFIG_HASH: cfg.config_hash(),
        TAG_VERSION: __version__,
        TAG_RUN_NAME: cfg.run.name,
    }


def _picked(tags: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in tags.items() if k in INHERITED_TAGS}


def _from_cached_check_fit(client: Any, run: Any) -> dict[str, str]:
    """A pipeline run whose check-fit was served from the step cache has no fit tags of its own: take
    them from the check-fit run that computed it (same data snapshot and pipeline config hash)."""
    tags = run.data.tags
    snapshot, config_hash = tags.get("preftune.snapshot"), tags.get(TAG_CONFIG_HASH)
    if tags.get(TAG_STEP) != "pipeline" or not snapshot or not config_hash:
        return {}
    query = (
        f"tags.`{TAG_STEP}` = 'check-fit' and tags.`preftune.snapshot` = '{snapshot}' "
        f"and tags.`preftune.pipeline_config_hash` = '{config_hash}'"
    )
    for found in client.search_runs(
        [run.info.experiment_id], query, max_results=5, order_by=["attributes.start_time DESC"]
    ):
        picked = _picked(found.data.tags)
        if picked:
            return picked
    return {}


def inherited_tags(*run_ids: str | None) -> dict[str, str]:
    """The :data:`INHERITED_TAGS` of the first of ``run_ids`` that has any (empty when none has); for a
    pipeline run whose check-fit came from the step cache, those of the check-fit run that computed it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    for run_id in run_ids:
        if not run_id:
            continue
        try:
            run = client.get_run(run_id)
            picked = _picked(run.data.tags) or _from_cached_check_fit(client, run)
        except MlflowException:
            continue
        if picked:
            return picked
    return {}


@contextlib.contextmanager
def start_step_run(
    step: str,
    cfg: RunConfig,
    *,
    pipeline_run_id: str | None = None,
    parent_run_id: str | None = None,
    params: Mapping[str, Any] | None = None,
    log_config: bool = True,
    tags: Mapping[str, str] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Open the MLflow run of one step: consistent name and tags, nested under the pipeline's run.

    The parent is ``parent_run_id`` or ``$PREFTUNE_PARENT_RUN_ID`` (set by the pipeline). On an
    exception the run ends FAILED with the error in the ``preftune.error`` tag.
    """
    import mlflow

    from preftune.config import RunConfig  # noqa: F401 (runtime import for type users)

    configure(cfg)
    parent = parent_run_id or os.environ.get(ENV_PARENT_RUN_ID) or None
    all_tags = step_tags(step, cfg, pipeline_run_id)
    all_tags.update(inherited_tags(parent))
    all_tags.update(tags or {})
    run = mlflow.start_run(
        run_name=f"{cfg.run.name}/{step}", tags=all_tags, parent_run_id=parent, nested=parent is not None
    )
    try:
        if log_config:
            import yaml

            flat = {k: ("" if v is None else v) for k, v in flatten(cfg.model_dump(mode="json")).items()}
            items = list(flat.items())
            for i in range(0, len(items), 100):  # log_params takes at most 100 params a call
                mlflow.log_params(dict(items[i : i + 100]))
            mlflow.log_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config/run.yaml")
        if params:
            mlflow.log_params(dict(params))
        yield run
    except BaseException as err:
        with contextlib.suppress(Exception):
            mlflow.set_tag(TAG_ERROR, f"{type(err).__name__}: {err}"[:4000])
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        mlflow.end_run(status=status)
        raise
    else:
        mlflow.end_run(status="FINISHED")


@contextlib.contextmanager
def start_pipeline_run(cfg: RunConfig, *, pipeline_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """The parent run of one pipeline run; steps started inside it (or given its id) nest under it."""
    pid = pipeline_id or pipeline_run_id()
    with (
        start_step_run("pipeline", cfg, pipeline_run_id=pid) as run,
        environ(**{ENV_PARENT_RUN_ID: run.info.run_id, ENV_PIPELINE_RUN_ID: pid}),
    ):
        yield run
