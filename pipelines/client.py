"""Submit the pipeline and manage its recurring runs, with the kfp client only.

Requests sent to the Kubeflow Pipelines API (``/apis/v2beta1``), all through ``kfp.Client``:

- ``GET healthz`` first, with a short timeout: an unreachable host fails in seconds, before
  anything is compiled or sent;
- experiments: ``GET experiments?filter=display_name=...`` then ``POST experiments`` when missing;
- a run: ``POST runs`` with the compiled pipeline spec and ``{"config": <run config>}``;
- a schedule (:func:`schedule`): ``GET recurringruns?filter=display_name=<name>&experiment_id=...``,
  then either nothing (the one recurring run of that name already has the same spec, parameters
  and trigger: its description carries their fingerprint), or ``POST recurringruns`` for the new
  one followed by ``DELETE recurringruns/<id>`` of every older one of the same name (create
  first, so a failure never leaves the pipeline unscheduled).

Kubeflow's cron has a seconds field first; ``0 3 * * 1`` (5 fields) is sent as ``0 0 3 * * 1``.
Recurring runs are created with ``max_concurrency=1`` (one retraining at a time) and
``no_catchup=True`` (a paused schedule does not backfill missed weeks).

Authentication: inside a cluster the projected ServiceAccount token at
``$KF_PIPELINES_SA_TOKEN_PATH`` (what the Helm chart mounts) is sent as a bearer token.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.errors import ConfigError, CredentialsError, InputError, PreftuneError, UnreachableError

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import RunConfig

DEFAULT_EXPERIMENT = "preftune"
SPEC_MARKER = "preftune-spec:"
HTTP_TIMEOUT_S = 15.0


@contextlib.contextmanager
def _timeouts(seconds: float) -> Iterator[None]:
    """Bound every socket operation of the kfp client (it sets no timeout of its own)."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _reason(err: BaseException) -> str:
    reason = getattr(err, "reason", None) or err
    text = str(reason).strip().splitlines()[0] if str(reason).strip() else type(err).__name__
    return text[:300]


def _translate(err: BaseException, host: str, action: str) -> PreftuneError:
    """A kfp/urllib3 error as a one-line preftune error."""
    from kfp_server_api.exceptions import ApiException

    if isinstance(err, ApiException):
        status = getattr(err, "status", None)
        body = (getattr(err, "body", None) or "").strip()
        try:
            body = json.loads(body).get("message") or json.loads(body).get("error") or body
        except (ValueError, AttributeError):
            pass
        detail = f"HTTP {status}" + (f": {str(body)[:300]}" if body else "")
        if status in (401, 403):
            return CredentialsError(
                f"Kubeflow Pipelines at {host} refused to {action} ({detail}): check the ServiceAccount token "
                "($KF_PIPELINES_SA_TOKEN_PATH) and its RBAC, or --namespace"
            )
        if status is not None and int(status) >= 500:
            return UnreachableError(f"Kubeflow Pipelines at {host} failed to {action} ({detail}); retry later")
        return PreftuneError(f"Kubeflow Pipelines at {host} rejected the request to {action} ({detail})")
    return UnreachableError(
        f"Kubeflow Pipelines at {host} is unreachable ({_reason(err)}): check --host, e.g. "
        "http://ml-pipeline.kubeflow.svc.cluster.local:8888, or a port-forward to ml-pipeline's port 8888"
    )


@contextlib.contextmanager
def _errors(host: str, action: str) -> Iterator[None]:
    import urllib3
    from kfp_server_api.exceptions import ApiException

    try:
        yield
    except PreftuneError:
        raise
    except (ApiException, urllib3.exceptions.HTTPError, OSError, TimeoutError) as err:
        raise _translate(err, host, action) from None


def check_host(host: str) -> None:
    """Raise ConfigError for a malformed host (before any network use)."""
    from urllib.parse import urlparse

    u = urlparse(host)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise ConfigError(
            f"--host {host!r}: give the Kubeflow Pipelines API URL, e.g. http://ml-pipeline.kubeflow:8888"
        )


def connect(host: str, *, namespace: str | None = None, timeout_s: float = HTTP_TIMEOUT_S) -> Any:
    """A ``kfp.Client`` for ``host`` after a health check (UnreachableError within ``timeout_s``)."""
    import kfp
    from kfp.client import ServiceAccountTokenVolumeCredentials

    check_host(host)
    credentials = None
    token_path = os.environ.get("KF_PIPELINES_SA_TOKEN_PATH")
    if token_path:
        if not Path(token_path).is_file():
            raise CredentialsError(f"KF_PIPELINES_SA_TOKEN_PATH is {token_path}, but there is no token file there")
        credentials = ServiceAccountTokenVolumeCredentials(token_path)
    with _timeouts(timeout_s), _errors(host, "answer its health check"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        # Without a namespace the constructor itself probes healthz (and, in multi-user mode, reads the
        # pod's namespace); with one it does not, so probe here. Either way an unreachable host fails now.
        client = kfp.Client(host=host, namespace=namespace or "kubeflow", credentials=credentials)
        if namespace:
            client.get_kfp_healthz(sleep_duration=1)
    return client


def _quiet() -> contextlib.AbstractContextManager[Any]:
    """The kfp client prints experiment and run links; keep the CLI's output its own."""
    return contextlib.redirect_stdout(io.StringIO())


def _compiled(cfg: RunConfig, tmp: str) -> str:
    from preftune.pipelines.retraining import compile_pipeline

    return compile_pipeline(cfg, str(Path(tmp) / "preference-retraining.yaml"))


def _experiment_id(client: Any, host: str, name: str, namespace: str | None) -> str:
    with _errors(host, f"find or create the experiment {name!r}"), _quiet():
        return client.create_experiment(name=name, namespace=namespace or None).experiment_id


def submit_run(
    cfg: RunConfig,
    host: str,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    namespace: str | None = None,
    timeout_s: float = HTTP_TIMEOUT_S,
) -> dict[str, Any]:
    """Compile the pipeline for ``cfg`` and start one run on ``host``; returns the run id and its URL."""
    from preftune.pipelines.retraining import pipeline_parameters

    client = connect(host, namespace=namespace, timeout_s=timeout_s)
    with tempfile.TemporaryDirectory(prefix="preftune-compile-") as tmp, _timeouts(timeout_s):
        package = _compiled(cfg, tmp)
        exp_id = _experiment_id(client, host, experiment, namespace)
        with _errors(host, "create the run"), _quiet():
            result = client.create_run_from_pipeline_package(
                package,
                arguments=pipeline_parameters(cfg),
                run_name=run_name or cfg.run.name,
                experiment_id=exp_id,
                pipeline_root=cfg.kubernetes.pipeline_root,
                service_account=cfg.kubernetes.service_account,
            )
    url = f"{host.rstrip('/')}/#/runs/details/{result.run_id}"
    return {"run_id": result.run_id, "experiment_id": exp_id, "url": url}


def _name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def list_recurring_runs(
    client: Any, host: str, *, experiment_id: str | None, namespace: str | None, name: str | None = None
) -> list[Any]:
    """Every recurring run of the experiment (all pages), optionally only those called ``name``."""
    out: list[Any] = []
    token = ""
    with _errors(host, "list recurring runs"):
        while True:
            kwargs: dict[str, Any] = {"page_token": token, "page_size": 100}
            if experiment_id:
                kwargs["experiment_id"] = experiment_id
            elif namespace:
                kwargs["namespace"] = namespace
            if name is not None:
                kwargs["filter"] = _name_filter(name)
            resp = client.list_recurring_runs(**kwargs)
            out.extend(resp.recurring_runs or [])
            token = resp.next_page_token or ""
            if not token:
                break
    if name is not None:  # the server filters; never act on another schedule if one does not
        out = [r for r in out if r.display_name == name]
    return out


def _find_experiment(client: Any, host: str, name: str, namespace: str | None) -> str | None:
    with _errors(host, f"look up the experiment {name!r}"):
        try:
            return client.get_experiment(experiment_name=name, namespace=namespace or None).experiment_id
        except ValueError:  # "No experiment is found with name ..."
            return None


def spec_fingerprint(package_path: str, parameters: dict[str, Any], trigger: dict[str, Any]) -> str:
    """What makes two recurring runs the same: the compiled spec, the parameters and the trigger."""
    import yaml

    with open(package_path, encoding="utf-8") as fh:
        docs = list(yaml.safe_load_all(fh))
    canonical = json.dumps({"spec": docs, "parameters": parameters, "trigger": trigger}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def schedule(
    cfg: RunConfig,
    host: str,
    *,
    cron: str,
    name: str,
    experiment: str = DEFAULT_EXPERIMENT,
    namespace: str | None = None,
    enabled: bool = True,
    timeout_s: float = HTTP_TIMEOUT_S,
) -> dict[str, Any]:
    """Create or update (by name, idempotently) the recurring run of the pipeline for ``cfg``."""
    from preftune.pipelines.retraining import pipeline_parameters

    from preftune.kube.config import cron_for_kubeflow

    try:
        kcron = cron_for_kubeflow(cron)
    except ValueError as err:
        raise ConfigError(f"--cron: {err}") from None
    if not name.strip():
        raise ConfigError("--name: give the recurring run a name")
    client = connect(host, namespace=namespace, timeout_s=timeout_s)
    params = pipeline_parameters(cfg)
    trigger = {
        "cron": kcron,
        "max_concurrency": 1,
        "no_catchup": True,
        "enabled": enabled,
        "pipeline_root": cfg.kubernetes.pipeline_root,
        "service_account": cfg.kubernetes.service_account,
    }
    with tempfile.TemporaryDirectory(prefix="preftune-compile-") as tmp, _timeouts(timeout_s):
        package = _compiled(cfg, tmp)
        fingerprint = spec_fingerprint(package, params, trigger)
        description = (
            f"preftune preference-retraining of run config '{cfg.run.name}' (config {cfg.config_hash()}), "
            f"managed by `preftune schedule`. {SPEC_MARKER}{fingerprint}"
        )
        exp_id = _experiment_id(client, host, experiment, namespace)
        existing = list_recurring_runs(client, host, experiment_id=exp_id, namespace=namespace, name=name)
        if len(existing) == 1 and (existing[0].description or "").endswith(f"{SPEC_MARKER}{fingerprint}"):
            r = existing[0]
            return {
                "action": "unchanged",
                "name": name,
                "recurring_run_id": r.recurring_run_id,
                "cron": kcron,
                "experiment_id": exp_id,
                "replaced": [],
            }
        with _errors(host, f"create the recurring run {name!r}"):
            created = client.create_recurring_run(
                experiment_id=exp_id,
                job_name=name,
                description=description,
                cron_expression=kcron,
                max_concurrency=1,
                no_catchup=True,
                params=params,
                pipeline_package_path=package,
                enabled=enabled,
                pipeline_root=cfg.kubernetes.pipeline_root,
                service_account=cfg.kubernetes.service_account,
            )
        replaced = []
        for old in existing:
            with _errors(host, f"delete the replaced recurring run {old.recurring_run_id}"):
                client.delete_recurring_run(old.recurring_run_id)
            replaced.append(old.recurring_run_id)
    return {
        "action": "updated" if existing else "created",
        "name": name,
        "recurring_run_id": created.recurring_run_id,
        "cron": kcron,
        "experiment_id": exp_id,
        "replaced": replaced,
    }


def list_schedules(
    host: str,
    *,
    experiment: str | None = DEFAULT_EXPERIMENT,
    namespace: str | None = None,
    timeout_s: float = HTTP_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """The recurring runs of the experiment (``experiment=None``: of the namespace, or all)."""
    client = connect(host, namespace=namespace, timeout_s=timeout_s)
    with _timeouts(timeout_s):
        exp_id = _find_experiment(client, host, experiment, namespace) if experiment else None
        if experiment and exp_id is None:
            return []
        runs = list_recurring_runs(client, host, experiment_id=exp_id, namespace=namespace)
    out = []
    for r in runs:
        cron = getattr(getattr(getattr(r, "trigger", None), "cron_schedule", None), "cron", None)
        out.append(
            {
                "name": r.display_name,
                "recurring_run_id": r.recurring_run_id,
                "cron": cron,
                "mode": str(r.mode) if r.mode is not None else None,
                "status": str(r.status) if getattr(r, "status", None) is not None else None,
                "created_at": str(r.created_at) if getattr(r, "created_at", None) else None,
                "managed_by_preftune": SPEC_MARKER in (r.description or ""),
            }
        )
    return out


def delete_schedule(
    host: str,
    name: str,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    namespace: str | None = None,
    timeout_s: float = HTTP_TIMEOUT_S,
) -> list[str]:
    """Delete the recurring runs called ``name`` in the experiment; returns their ids (empty: none)."""
    if not name.strip():
        raise InputError("--name: which recurring run to delete")
    client = connect(host, namespace=namespace, timeout_s=timeout_s)
    with _timeouts(timeout_s):
        exp_id = _find_experiment(client, host, experiment, namespace)
        if exp_id is None:
            return []
        deleted = []
        for r in list_recurring_runs(client, host, experiment_id=exp_id, namespace=namespace, name=name):
            with _errors(host, f"delete the recurring run {r.recurring_run_id}"):
                client.delete_recurring_run(r.recurring_run_id)
            deleted.append(r.recurring_run_id)
    return deleted
