"""The steps of one retraining run as plain functions: paths, strings and the config dict in, a dict out.

This is what the Kubeflow components call (``preftune.components``): each component is a few
lines that pass its artifact paths here and copy the returned dict to its typed outputs. Nothing
here imports kfp, so every step can be run and tested without it.

Why each function returns its gate as a boolean instead of raising: a failed fit check, reward
gate or evaluation is an *outcome* of a retraining run, not a failure of it. The component
returns the boolean and the pipeline stops cleanly with ``dsl.If``; real errors (bad input,
unreachable services, a diverged PPO run) still raise and fail the task.

Tracking (one MLflow tree per pipeline run)
-------------------------------------------
:func:`open_pipeline_run` creates the parent run, tagged with the pipeline run id, and
:func:`close_pipeline_run` ends it (the pipeline's exit handler, so it runs even after a
failure). Steps find their parent by that tag: the pipeline run id reaches every step as the
environment variable ``$PREFTUNE_PIPELINE_RUN_ID`` (set by ``preftune run`` for the local runner,
and from the pod's ``pipeline/runid`` label on a cluster), *not* as a component input: an input
that changes on every run would make Kubeflow's step cache miss every time.

Caching without stale results
-----------------------------
:func:`data_snapshot` fingerprints everything outside the config that a cacheable step reads
(prompt set, judgement export, policy, reward base; a content hash, a storage completion marker
or, for local model folders, file names, sizes and modification times), together with the
effective config's hash and the code's version. The snapshot is an input of collect, check-fit,
train-reward and ppo, and the dataset hash of every step after collect, so new judgements, a
replaced model or a preftune upgrade always re-run the steps that read them.

Every step records a summary (``pipeline/summary.json``) in its own MLflow run, tagged with the
snapshot and config hash; :func:`close_pipeline_run` gathers them into the parent's
``pipeline/outcome.json`` (looking up the run that produced a cached step's result), which is
what ``preftune run`` and ``preftune demo`` print.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.errors import ConfigError, ExitCode, InputError, PreftuneError

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import RunConfig

log = logging.getLogger(__name__)

STEPS = ("collect", "check-fit", "train-reward", "ppo", "evaluate", "promote")
CACHEABLE_STEPS = ("collect", "check-fit", "train-reward", "ppo")
"""evaluate reads the registry's champion and promote writes the registry: never served from a cache."""

SUMMARY_ARTIFACT = "pipeline/summary.json"
OUTCOME_ARTIFACT = "pipeline/outcome.json"
TAG_SNAPSHOT = "preftune.snapshot"
TAG_STEP_STATUS = "preftune.step_status"
TAG_PIPELINE_CONFIG_HASH = "preftune.pipeline_config_hash"
"""The run config's hash as the pipeline got it (a step may adjust its own copy, e.g. ppo's checkpoint folder)."""
TAG_OUTCOME = "preftune.outcome"
TAG_OUTCOME_MESSAGE = "preftune.outcome.message"
TAG_KUBERNETES_HASH = "preftune.kubernetes_hash"
GATE_FILE = "GATE_FAILED.md"

SUCCESS_STATES = ("SUCCEEDED", "SUCCESS", "COMPLETE")
"""Final states of the exit handler's ``PipelineTaskFinalStatus`` that mean the run succeeded."""


# ---------------------------------------------------------------------------------------------
# Config and tracking context


NULLS_KEY = "null_fields"
"""Key of the ``config`` parameter listing fields set to null (kfp parameters cannot hold a null)."""


def config_parameter(cfg: RunConfig) -> dict[str, Any]:
    """The run config as the pipeline's ``config`` parameter: the fields that differ from the defaults.

    Short (the default config is ``{}``) and free of nulls, which neither a compiled default nor
    the local runner can carry: a field set to null where its default is not (``ppo.reward_clip:
    null``) is listed under ``null_fields`` instead. :func:`load` reverses it exactly.
    """
    from preftune.kube.config import StepsSection

    data = cfg.model_dump(mode="json", exclude_defaults=True)
    # Steps have per-step defaults that differ from StepResources' own: compare whole steps instead.
    kube = data.get("kubernetes", {})
    kube.pop("steps", None)
    default_steps = StepsSection()
    changed = {
        name: getattr(cfg.kubernetes.steps, name).model_dump(mode="json", exclude_none=True)
        for name in StepsSection.model_fields
        if getattr(cfg.kubernetes.steps, name) != getattr(default_steps, name)
    }
    if changed:
        kube["steps"] = changed
    if kube:
        data["kubernetes"] = kube
    else:
        data.pop("kubernetes", None)
    nulls: list[str] = []

    def strip(node: Any, prefix: str) -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if v is None:
                    nulls.append(f"{prefix}{k}")
                    continue
                value = strip(v, f"{prefix}{k}.")
                if isinstance(v, dict) and v and not value:
                    continue  # a section left empty once its nulls moved to null_fields
                out[k] = value
            return out
        if isinstance(node, list):
            return [strip(v, prefix) for v in node if v is not None]
        return node

    data = strip(data, "")
    if nulls:
        data[NULLS_KEY] = sorted(nulls)
    return data


def load(config: Mapping[str, Any] | RunConfig) -> RunConfig:
    """The run config from the pipeline's ``config`` parameter (a dict), validated."""
    import copy

    from preftune.config import RunConfig, parse_config

    if isinstance(config, RunConfig):
        return config
    data = copy.deepcopy(dict(config or {}))
    nulls = data.pop(NULLS_KEY, None) or []
    if not isinstance(nulls, list):
        raise ConfigError(f"pipeline parameter 'config': {NULLS_KEY} must be a list of field paths")
    for path in nulls:
        node = data
        *parents, leaf = str(path).split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"pipeline parameter 'config': {NULLS_KEY} names {path!r}, which is not a field")
        node[leaf] = None
    return parse_config(data, "pipeline parameter 'config'")


def pipeline_id(given: str | None = None) -> str:
    """The pipeline run id: ``$PREFTUNE_PIPELINE_RUN_ID`` (set for every task), else ``given``."""
    from preftune import tracking

    return os.environ.get(tracking.ENV_PIPELINE_RUN_ID) or given or tracking.pipeline_run_id()


def _client(cfg: RunConfig) -> tuple[Any, str]:
    """An MLflow client on the configured store and the experiment id (created when missing)."""
    from mlflow import MlflowClient

    from preftune import tracking

    exp_id = tracking.configure(cfg)
    return MlflowClient(tracking.resolve_tracking_uri(cfg.tracking)), exp_id


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def find_runs(cfg: RunConfig, step: str, *, max_results: int = 1, **tags: str) -> list[Any]:
    """Runs of ``step`` with the given tag values (keys as in ``preftune.<key>``), newest first."""
    client, exp_id = _client(cfg)
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


@contextlib.contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    """Set environment variables for the duration of a step (restored afterwards: tests call steps in-process)."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# Pre-flight: everything that can be checked before any step runs


def _is_mlflow_ref(ref: str) -> bool:
    return ref.startswith(("models:/", "runs:/"))


def _check_ref(cfg: RunConfig, field_name: str, ref: str | None, *, kind: str, storage: Any, local_paths: bool) -> None:
    """Raise InputError when the model/file reference ``ref`` of ``field_name`` cannot be there."""
    from preftune.storage import is_s3_uri, parse_uri

    if not ref or _is_mlflow_ref(ref):
        return
    if ref.startswith("demo:"):
        known = {"model": ("demo:policy", "demo:reward-base"), "prompts": ("demo:prompts",)}[kind]
        if ref not in known:
            raise InputError(f"{field_name}: unknown demo reference {ref!r}; use one of {', '.join(known)}")
        return
    try:
        parsed = parse_uri(ref)
    except PreftuneError as err:
        raise InputError(f"{field_name}: {err.message}") from None
    if is_s3_uri(ref):
        if not storage.exists(ref):
            what = "a folder published with save_pretrained" if kind == "model" else "a file"
            raise InputError(f"{field_name}: {ref} does not exist (expected {what} at that S3 URI)")
        return
    if not local_paths:
        return
    path = Path(parsed.key)
    if kind == "model":
        if not path.is_dir():
            raise InputError(
                f"{field_name}: {ref} is not a folder; give a model saved with save_pretrained (local folder or "
                f"s3:// URI){' or demo:policy' if 'policy' in field_name else ''}"
            )
    elif not path.is_file():
        raise InputError(f"{field_name}: {ref} does not exist")


def preflight(
    cfg: RunConfig,
    *,
    local: bool,
    check_tracking: bool = True,
    check_storage: bool = True,
    check_paths: bool | None = None,
) -> None:
    """Fail before any step runs, with one line naming the field to change.

    ``local``: the run is about to start with the local runner on this machine (Kubernetes GPU
    requests are refused, ``cuda`` devices must exist here). ``check_paths`` (default: ``local``):
    local model folders and files must exist. On a cluster the same checks run inside the
    pipeline's first task, where the run's paths (e.g. on the model-cache claim), buckets and
    tracking server are visible; ``preftune run --host`` and ``preftune schedule`` check only
    what needs no access to them (``check_tracking=False, check_storage=False``).
    """
    check_paths = local if check_paths is None else check_paths
    from preftune.storage import Storage

    if local:
        gpu_steps = cfg.kubernetes.steps.gpu_steps()
        if gpu_steps:
            first = gpu_steps[0]
            n = getattr(cfg.kubernetes.steps, first).gpus
            raise ConfigError(
                f"kubernetes.steps.{first}.gpus is {n}, but the local runner runs every step as a process on this "
                f"machine and cannot give it Kubernetes GPUs: set kubernetes.steps.{first}.gpus to 0 for a local run "
                "(ppo.device picks a local GPU when there is one), or submit the run to a cluster with --host URL"
            )
        for name, device in (("ppo.device", cfg.ppo.device), ("evaluation.device", cfg.evaluation.device)):
            if device and device.startswith("cuda"):
                import torch

                if not torch.cuda.is_available():
                    raise ConfigError(
                        f"{name} is {device!r} but this machine has no CUDA GPU: set it to cpu or leave it empty"
                    )
    if cfg.kubernetes.trainer.enabled:  # the TrainJob's nodes read and write under storage.root
        from preftune.kube.handoff import shared_root

        shared_root(cfg)
    storage = Storage.from_config(cfg.storage)
    checks: list[tuple[str, str | None, str]] = [
        ("models.policy", cfg.models.policy, "model"),
        ("models.reward_base", cfg.models.reward_base, "model"),
        ("data.prompts", cfg.data.prompts, "prompts"),
        ("ppo.prompts", cfg.ppo.prompts, "prompts"),
        ("evaluation.reference", cfg.evaluation.reference, "model"),
        ("evaluation.reward_model", cfg.evaluation.reward_model, "model"),
    ]
    if cfg.evaluation.champion not in ("registry", "none"):
        checks.append(("evaluation.champion", cfg.evaluation.champion, "model"))
    if cfg.data.judgements != "simulated":
        if not cfg.data.judgements_path:
            raise ConfigError(
                f"data.judgements is {cfg.data.judgements!r}: set data.judgements_path to the export or file to read"
            )
        checks.append(("data.judgements_path", cfg.data.judgements_path, "file"))
    deepspeed = getattr(cfg.ppo, "deepspeed_config", None)  # present when the ppo section has DeepSpeed
    if deepspeed:
        checks.append(("ppo.deepspeed_config", deepspeed, "file"))
    suite = cfg.evaluation.suite
    if "/" in suite or suite.endswith((".yaml", ".yml")):
        checks.append(("evaluation.suite", suite, "file"))
    else:
        from preftune.evaluate.suite import shipped_suites

        if suite not in shipped_suites():
            raise ConfigError(
                f"evaluation.suite: no shipped suite {suite!r} (shipped: {', '.join(shipped_suites()) or 'none'}); "
                "give a suite name or a YAML path"
            )
    for name, ref, kind in checks:
        if not check_storage and ref and not ref.startswith("demo:"):
            continue
        _check_ref(cfg, name, ref, kind=kind, storage=storage, local_paths=check_paths)
    if check_tracking:
        from preftune import tracking

        tracking.check_reachable(tracking.resolve_tracking_uri(cfg.tracking), cfg.tracking.timeout_s)


# ---------------------------------------------------------------------------------------------
# The data snapshot


def _local_fingerprint(path: Path) -> str:
    """A file: its content hash. A folder: names, sizes and mtimes (hashing GBs of weights each run costs minutes)."""
    h = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return "sha256:" + h.hexdigest()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "files:" + h.hexdigest()


def _fingerprint(ref: str, cfg: RunConfig, storage: Any) -> str:
    from preftune.storage import MARKER_NAME, Storage, is_s3_uri, parse_uri

    if ref.startswith("demo:"):
        from preftune.world import world_key

        return f"world:{world_key(cfg.world)}"
    if _is_mlflow_ref(ref):
        return f"mlflow:{ref}"
    if is_s3_uri(ref):
        if storage.list(ref):  # a folder: its completion marker lists every file's sha256
            return "marker:" + hashlib.sha256(storage.read_bytes(Storage.join(ref, MARKER_NAME))).hexdigest()
        return "sha256:" + hashlib.sha256(storage.read_bytes(ref)).hexdigest()
    path = Path(parse_uri(ref).key)
    if not path.exists():
        raise InputError(f"{ref} does not exist")
    return _local_fingerprint(path)


def snapshot_sources(cfg: RunConfig) -> dict[str, str]:
    """What outside the config the cacheable steps read, by config field."""
    out = {
        "data.prompts": cfg.data.prompts,
        "models.policy": cfg.models.policy,
        "models.reward_base": cfg.models.reward_base,
    }
    if cfg.ppo.prompts:
        out["ppo.prompts"] = cfg.ppo.prompts
    if cfg.data.judgements != "simulated" and cfg.data.judgements_path:
        out["data.judgements_path"] = cfg.data.judgements_path
    return out


def data_snapshot(cfg: RunConfig) -> tuple[str, dict[str, str]]:
    """The identity of what a run reads: ``snap-<16 hex>`` and its parts.

    The parts: the fingerprint of each data source, the effective config's hash (every field,
    defaults included: the ``config`` parameter only carries the fields that differ from the
    defaults, so a new preftune version with other defaults must not reuse old results) and the
    package version (on a cluster the pinned image is part of Kubeflow's cache key as well). Not
    the git sha: a commit that changes no behaviour must not throw the cache away.
    """
    from preftune import __version__
    from preftune.storage import Storage

    storage = Storage.from_config(cfg.storage)
    prints = {name: _fingerprint(ref, cfg, storage) for name, ref in snapshot_sources(cfg).items()}
    prints["config_hash"] = cfg.config_hash()
    prints["preftune"] = __version__
    digest = hashlib.sha256(json.dumps(prints, sort_keys=True).encode()).hexdigest()[:16]
    return f"snap-{digest}", prints


# ---------------------------------------------------------------------------------------------
# Step records


@dataclass
class StepRecord:
    """What a step did: its status, figures and where its MLflow run is (becomes summary.json)."""

    step: str
    pipeline_run_id: str
    snapshot: str | None
    started_at: float
    config_hash: str = ""
    status: str = "ok"  # ok | stopped (a gate said no) | failed
    outputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    report_md: str = ""
    mlflow_run_id: str | None = None
    error: str | None = None
    exit_code: int | None = None
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "status": self.status,
            "seconds": self.seconds,
            "pipeline_run_id": self.pipeline_run_id,
            "snapshot": self.snapshot,
            "mlflow_run_id": self.mlflow_run_id,
            "error": self.error,
            "exit_code": self.exit_code,
            "outputs": self.outputs,
            "metrics": self.metrics,
        }

    def result(self) -> dict[str, Any]:
        """The dict a component turns into its outputs."""
        return {**self.to_dict(), **self.outputs, "report_md": self.report_md}


def _finite_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in values.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if f == f and f not in (float("inf"), float("-inf")):
            out[k] = f
    return out


def _record(cfg: RunConfig, rec: StepRecord, parent: str | None) -> None:
    """Attach the step's summary to the pipeline's run (``steps/<step>.json``) and to the step's own run,
    tagged for cache look-ups (best effort: a tracking hiccup must not fail a step)."""
    try:
        client, _ = _client(cfg)
        if parent:
            client.log_dict(parent, rec.to_dict(), f"steps/{rec.step}.json")
        run_id = rec.mlflow_run_id
        if run_id is None:
            runs = find_runs(cfg, rec.step, pipeline_run_id=rec.pipeline_run_id)
            if not runs:
                return
            run_id = rec.mlflow_run_id = runs[0].info.run_id
        tags = {TAG_STEP_STATUS: rec.status, TAG_PIPELINE_CONFIG_HASH: rec.config_hash}
        if rec.snapshot:
            tags[TAG_SNAPSHOT] = rec.snapshot
        if rec.outputs.get("input_dataset_hash"):
            tags["preftune.input_dataset_hash"] = str(rec.outputs["input_dataset_hash"])
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
        client.log_dict(run_id, rec.to_dict(), SUMMARY_ARTIFACT)
    except Exception as err:  # noqa: BLE001 - the step's own results are already safe
        log.warning("could not record the %s summary in MLflow: %s", rec.step, err)


@contextlib.contextmanager
def _step(step: str, cfg: RunConfig, snapshot: str | None, started_at: float | None) -> Iterator[StepRecord]:
    """Run one step under the pipeline's tracking context; record its summary whatever happens."""
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
            client, _ = _client(cfg)
            config_hash = client.get_run(parent).data.tags.get(tracking.TAG_CONFIG_HASH) or config_hash
    rec = StepRecord(
        step=step, pipeline_run_id=pid, snapshot=snapshot, started_at=started_at or time.time(), config_hash=config_hash
    )
    with _environ(**{tracking.ENV_PIPELINE_RUN_ID: pid, tracking.ENV_PARENT_RUN_ID: parent}):
        try:
            yield rec
        except Exception as err:
            if isinstance(err, PreftuneError):
                rec.error, rec.exit_code = err.message, err.exit_code
            else:
                rec.error, rec.exit_code = f"{type(err).__name__}: {err}", ExitCode.INTERNAL
            rec.status = "failed"
            rec.seconds = round(time.time() - rec.started_at, 3)
            _record(cfg, rec, parent)
            raise
        rec.seconds = round(time.time() - rec.started_at, 3)
        _record(cfg, rec, parent)


def _write_gate_file(output: str, text: str) -> None:
    """A stopped step's output folder holds a note saying why (so the artifact exists and explains itself)."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / GATE_FILE).write_text(text.rstrip() + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# The pipeline's first and last task


def open_pipeline_run(
    config: Mapping[str, Any],
    pipeline_run_id: str | None = None,
    *,
    kubernetes_hash: str | None = None,
    local: bool = False,
    started_at: float | None = None,
) -> dict[str, Any]:
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
    client, exp_id = _client(cfg)
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
    return {
        "parent_run_id": parent,
        "pipeline_run_id": pid,
        "snapshot": snapshot,
        "sources": prints,
        "seconds": round(time.time() - t0, 3),
    }


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
    client, _ = _client(cfg)
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


def close_pipeline_run(
    config: Mapping[str, Any],
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
    client, _ = _client(cfg)
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


# ---------------------------------------------------------------------------------------------
# The six steps


def collect(
    config: Mapping[str, Any], output: str, *, snapshot: str, started_at: float | None = None
) -> dict[str, Any]:
    """collect: candidates from the policy, judgements, the preference dataset (published at ``output``)."""
    from preftune.collect.step import collect_from_config

    cfg = load(config)
    with _step("collect", cfg, snapshot, started_at) as rec:
        res = collect_from_config(cfg, output, pipeline_run_id=rec.pipeline_run_id, progress=False)
        rec.mlflow_run_id = res.mlflow_run_id
        rec.outputs = {
            "dataset_hash": res.hash,
            "dataset_uri": res.uri,
            "counts": res.counts,
            "families": res.families,
            "sources": res.sources,
            "format": res.format,
        }
        rec.metrics = _finite_metrics({f"dataset.{k}": v for k, v in res.counts.items()})
        validation = Path(output) / "validation.md"
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
        if validation.is_file():
            lines += ["", validation.read_text(encoding="utf-8")]
        rec.report_md = "\n".join(lines) + "\n"
    return rec.result()


def check_fit(
    config: Mapping[str, Any],
    dataset: str,
    output: str,
    *,
    snapshot: str,
    dataset_hash: str,
    started_at: float | None = None,
) -> dict[str, Any]:
    """check-fit: agreement and coverage per family; ``fit`` is False when the run must stop (clean stop)."""
    from preftune.fit.check import NotFitError, run_check_fit

    cfg = load(config)
    with _step("check-fit", cfg, snapshot, started_at) as rec:
        try:
            report = run_check_fit(dataset, cfg, output, pipeline_run_id=rec.pipeline_run_id)
            fit = True
        except NotFitError as err:
            report, fit = err.report, False
            rec.status = "stopped"
        rec.mlflow_run_id = report.mlflow_run_id
        rec.outputs = {
            "fit": fit,
            "input_dataset_hash": dataset_hash,
            "dataset_hash": report.output_hash if fit else "",
            "fit_families": report.fit_families,
            "unfit_families": report.unfit_families,
            "excluded_families": report.excluded_families,
            "stop_reason": report.stop_reason,
            "verdicts": {
                f: {
                    "verdict": r.verdict,
                    "reason": r.reason,
                    "action": r.action,
                    "alpha": (r.agreement or {}).get("alpha"),
                    "coverage": (r.coverage or {}).get("share"),
                }
                for f, r in report.families.items()
            },
        }
        rec.metrics = _finite_metrics(
            {f"fit.{f}.alpha": v["alpha"] for f, v in rec.outputs["verdicts"].items() if v["alpha"] is not None}
        )
        rec.metrics["fit.fit_families"] = float(len(report.fit_families))
        rec.report_md = report.to_markdown()
    return rec.result()


def _failed_run_metric(cfg: RunConfig, step: str, pid: str, key: str) -> float | None:
    try:
        runs = find_runs(cfg, step, pipeline_run_id=pid)
        return runs[0].data.metrics.get(key) if runs else None
    except Exception:  # noqa: BLE001 - a figure for the message only
        return None


def train_reward(
    config: Mapping[str, Any],
    dataset: str,
    output: str,
    *,
    snapshot: str,
    dataset_hash: str,
    started_at: float | None = None,
) -> dict[str, Any]:
    """train-reward: the pairwise reward model; ``gate_passed`` is False below ``reward.min_accuracy`` (clean stop)."""
    from preftune.reward.step import train_reward as _train

    cfg = load(config)
    with _step("train-reward", cfg, snapshot, started_at) as rec:
        try:
            res = _train(cfg, dataset, output, pipeline_run_id=rec.pipeline_run_id, progress=False)
        except PreftuneError as err:
            if err.exit_code != ExitCode.REWARD_GATE:
                raise
            rec.status = "stopped"
            acc = _failed_run_metric(cfg, "train-reward", rec.pipeline_run_id, "reward.eval_accuracy")
            rec.outputs = {
                "gate_passed": False,
                "accuracy": acc,
                "message": err.message,
                "min_accuracy": cfg.reward.min_accuracy,
                "input_dataset_hash": dataset_hash,
            }
            rec.report_md = f"# train-reward: gate failed\n\n{err.message}\n"
            _write_gate_file(output, rec.report_md)
            return rec.result()
        rec.mlflow_run_id = res.mlflow_run_id
        ev = res.evaluation
        rec.outputs = {
            "gate_passed": True,
            "accuracy": res.eval_accuracy,
            "per_family": res.per_family,
            "min_accuracy": cfg.reward.min_accuracy,
            "model_uri": res.model_uri,
            "input_dataset_hash": dataset_hash,
        }
        rec.metrics = _finite_metrics(res.metrics)
        lines = [
            "# train-reward",
            "",
            f"Held-out pairwise accuracy **{ev.accuracy:.3f}** on {ev.n_pairs} pairs "
            f"(gate: at least {cfg.reward.min_accuracy:.3f}): passed.",
            "",
            "| family | accuracy |",
            "| --- | ---: |",
            *[f"| {f} | {a:.3f} |" for f, a in res.per_family.items()],
        ]
        rec.report_md = "\n".join(lines) + "\n"
    return rec.result()


def ppo(
    config: Mapping[str, Any],
    reward_model: str,
    output: str,
    *,
    snapshot: str,
    dataset_hash: str,
    started_at: float | None = None,
    trainer_api: Any = None,
) -> dict[str, Any]:
    """ppo: train the policy against the reward model; publishes the policy at ``output``.

    Checkpoints go to ``ppo.checkpoint_dir``, else (when ``storage.root`` is set) to
    ``<storage.root>/checkpoints/<run name>/<pipeline run id>/ppo`` so that a retried task, in a
    new pod, resumes where the evicted one stopped; else next to the output.

    With ``kubernetes.trainer.enabled`` the training runs in a Kubeflow Trainer TrainJob instead
    of this process (:mod:`preftune.kube.handoff`; ``trainer_api`` stands in for the Kubernetes
    API in tests); the outputs are the same, plus the TrainJob's name, namespace and policy URI.
    """
    from preftune.storage import Storage

    cfg = load(config)
    with _step("ppo", cfg, snapshot, started_at) as rec:
        if not cfg.ppo.checkpoint_dir and cfg.storage.root:
            cfg = cfg.model_copy(deep=True)
            cfg.ppo.checkpoint_dir = Storage.join(
                cfg.storage.root, "checkpoints", cfg.run.name, rec.pipeline_run_id, "ppo"
            )
        if cfg.kubernetes.trainer.enabled:
            fig = _ppo_in_trainjob(cfg, reward_model, output, rec.pipeline_run_id, trainer_api)
        else:
            fig = _ppo_in_process(cfg, reward_model, output, rec.pipeline_run_id)
        rec.mlflow_run_id = fig.pop("mlflow_run_id")
        final, first = fig.pop("final"), fig.pop("first")
        rec.outputs = {
            **fig,
            "reward_first": first.get("ppo/reward_mean"),
            "reward_final": final.get("ppo/reward_mean"),
            "policy_dir": output,
            "input_dataset_hash": dataset_hash,
        }
        rec.metrics = _finite_metrics({k.replace("/", "."): v for k, v in final.items()})
        where = (
            f" in TrainJob {fig['trainjob_namespace']}/{fig['trainjob']} ({cfg.kubernetes.trainer.nodes} nodes)"
            if "trainjob" in fig
            else ""
        )
        rec.report_md = (
            "# ppo\n\n"
            f"{fig['updates']} updates{where}; mean reward {first.get('ppo/reward_mean', float('nan')):.3f} -> "
            f"{final.get('ppo/reward_mean', float('nan')):.3f}; KL to the reference {fig['kl']:.3f} nats "
            f"(budget {fig['kl_budget']:.1f}: {'within' if fig['kl_within_budget'] else 'OVER'}).\n"
        )
    return rec.result()


def _ppo_in_process(cfg: RunConfig, reward_model: str, output: str, pipeline_run_id: str) -> dict[str, Any]:
    """PPO in this pod (torchrun inside it for several GPUs); the step's figures."""
    from preftune.ppo.step import run_ppo

    res = run_ppo(cfg, reward_model, output, pipeline_run_id=pipeline_run_id)
    return {
        "mlflow_run_id": res.mlflow_run_id,
        "final": res.final,
        "first": res.first,
        "updates": res.updates,
        "resumed_from": res.resumed_from,
        "kl": res.kl,
        "kl_budget": res.kl_budget,
        "kl_within_budget": res.kl_within_budget,
        "reward_gain": res.reward_gain,
    }


def _ppo_in_trainjob(cfg: RunConfig, reward_model: str, output: str, pipeline_run_id: str, api: Any) -> dict[str, Any]:
    """PPO in a Kubeflow Trainer TrainJob; the same figures, read from the policy its nodes published."""
    from preftune import tracking
    from preftune.kube.handoff import run_handoff

    res = run_handoff(
        cfg,
        reward_model,
        output,
        pipeline_run_id=pipeline_run_id,
        parent_run_id=os.environ.get(tracking.ENV_PARENT_RUN_ID) or None,
        api=api,
    )
    meta, final, first = res.metadata, res.final, res.first
    kl = float(meta.get("kl", final.get("ppo/kl", 0.0)))
    return {
        "mlflow_run_id": meta.get("mlflow_run_id"),
        "final": final,
        "first": first,
        "updates": int(meta.get("updates", len(res.history))),
        "resumed_from": meta.get("resumed_from"),
        "kl": kl,
        "kl_budget": float(meta.get("kl_budget", cfg.ppo.kl_budget)),
        "kl_within_budget": bool(meta.get("kl_within_budget", kl <= cfg.ppo.kl_budget)),
        "reward_gain": float(final.get("ppo/reward_mean", 0.0) - first.get("ppo/reward_mean", 0.0)),
        "trainjob": res.trainjob,
        "trainjob_namespace": res.namespace,
        "policy_uri": res.policy_uri,
    }


def evaluate(
    config: Mapping[str, Any],
    policy: str,
    reward_model: str | None,
    output: str,
    *,
    dataset_hash: str,
    started_at: float | None = None,
) -> dict[str, Any]:
    """evaluate: the candidate (and the champion) on the behaviour suite; ``passed`` is the gates' verdict."""
    from preftune.evaluate.step import evaluate as _evaluate

    cfg = load(config)
    with _step("evaluate", cfg, None, started_at) as rec:
        res = _evaluate(cfg, policy, reward_model=reward_model or None, output=output, progress=False)
        rec.mlflow_run_id = res.run_id
        rec.status = "ok" if res.passed else "stopped"
        shares = res.results.get("behaviour_shares", {})
        rec.outputs = {
            "passed": res.passed,
            "reasons": res.reasons,
            "eval_run_id": res.run_id,
            "first_promotion": res.first_promotion,
            "champion_version": res.champion_version,
            "gates": [g.to_dict() for g in res.gates],
            "behaviour_shares": shares,
            "suite": res.results.get("suite", {}).get("id"),
            "input_dataset_hash": dataset_hash,
        }
        rec.metrics = _finite_metrics(
            {f"behaviour_share.{f}.{b}": v for f, by in (shares.get("candidate") or {}).items() for b, v in by.items()}
        )
        rec.metrics["eval.gates.passed"] = 1.0 if res.passed else 0.0
        report = Path(output) / "report.md"
        rec.report_md = report.read_text(encoding="utf-8") if report.is_file() else ""
    return rec.result()


def promote(
    config: Mapping[str, Any],
    policy: str,
    eval_run_id: str,
    *,
    dataset_hash: str,
    reward_model: str | None = None,
    started_at: float | None = None,
) -> dict[str, Any]:
    """promote: register the candidate and move the champion alias; ``promoted`` is False when rejected."""
    from preftune.evaluate import registry
    from preftune.evaluate.promote import promote as _promote

    cfg = load(config)
    with _step("promote", cfg, None, started_at) as rec:
        rm_version = None
        if reward_model and Path(reward_model).is_dir():
            rm_version = "sha256:" + registry.folder_hash(reward_model)
        res = _promote(
            cfg, policy, eval_run_id=eval_run_id, dataset_hash=dataset_hash or None, reward_model_version=rm_version
        )
        rec.mlflow_run_id = res.run_id
        rec.status = "ok" if res.promoted else "stopped"
        rec.outputs = {
            "promoted": res.promoted,
            "version": res.version,
            "previous": res.previous,
            "first_promotion": res.first_promotion,
            "registered_model": res.registered_model,
            "reasons": res.reasons,
            "notes": res.notes,
            "eval_run_id": eval_run_id,
            "input_dataset_hash": dataset_hash,
        }
        if res.promoted:
            rec.report_md = (
                f"# promote\n\nPromoted: `{res.registered_model}` version {res.version} is now "
                f"`{cfg.promotion.champion_alias}`"
                + (f" (replacing version {res.previous})" if res.previous else "")
                + ".\n"
            )
        else:
            rec.report_md = "# promote\n\nRejected, nothing registered, champion unchanged:\n\n" + "".join(
                f"- {r}\n" for r in res.reasons
            )
    return rec.result()


def write_metrics_file(path: str, metrics: Mapping[str, float]) -> None:
    """A Metrics artifact's file (the local step cache reuses an output only when its file exists)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(dict(metrics), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def copy_file(src: str | Path, dst: str) -> bool:
    """Copy ``src`` to an artifact path (False when ``src`` is missing)."""
    if not Path(src).is_file():
        return False
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return True


def metric_key(name: str) -> str:
    """A name Kubeflow's metrics UI accepts (letters, digits, '.', '_', '-')."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
