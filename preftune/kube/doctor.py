"""``preftune kube doctor``: is this cluster ready for the TrainJob handoff (Kubeflow Trainer >= v2.2)?

The TrainJob preftune renders uses ``runtimePatches`` and ``activeDeadlineSeconds``, which Kubeflow
Trainer added in v2.2; an older Trainer's CRD has neither, and the API server would drop or refuse
them. The checks, read from the cluster's API:

1. the ``trainjobs.trainer.kubeflow.org`` CustomResourceDefinition exists and serves ``v1alpha1``;
2. its ``v1alpha1`` schema has every spec field the manifest uses (the feature test of v2.2);
3. the Trainer release, when the CRD says which (the ``app.kubernetes.io/version`` label or the
   controller-gen annotation the release manifests carry), is at least v2.2;
4. the (Cluster)TrainingRuntime ``kubernetes.trainer.runtime`` exists.

Every check is reported; a failed one raises ConfigError (exit 2) naming what to install, an
unreachable API server UnreachableError (exit 4). Tested against a fake client; no kfp import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from preftune.errors import ConfigError, UnreachableError
from preftune.kube import trainjob as tj

if TYPE_CHECKING:
    from preftune.config import RunConfig

CRD_NAME = f"{tj.PLURAL}.{tj.GROUP}"
_VERSION = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _get(obj: Any, *path: str) -> Any:
    """A field of a dict or of a kubernetes client model (snake_case attributes)."""
    for key in path:
        if obj is None:
            return None
        if isinstance(obj, dict):
            obj = obj.get(key)
        else:
            snake = re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower()
            obj = getattr(obj, snake, None)
    return obj


def trainer_version(crd: Any) -> tuple[int, int] | None:
    """The Trainer release a CRD object names (label or annotation), or None when it names none."""
    labels = _get(crd, "metadata", "labels") or {}
    annotations = _get(crd, "metadata", "annotations") or {}
    for text in (labels.get("app.kubernetes.io/version"), annotations.get("trainer.kubeflow.org/version")):
        m = _VERSION.fullmatch(str(text or "").strip())
        if m:
            return int(m.group(1)), int(m.group(2))
    return None


def spec_fields(crd: Any, version: str = tj.VERSION) -> set[str] | None:
    """The ``spec`` properties of one served version's schema (None when the version is not served)."""
    for v in _get(crd, "spec", "versions") or []:
        if _get(v, "name") == version and _get(v, "served"):
            schema = _get(v, "schema", "openAPIV3Schema")
            spec = _get(schema, "properties") or {}
            spec = spec.get("spec") if isinstance(spec, dict) else None
            props = _get(spec, "properties") or {}
            return set(props)
    return None


def check_cluster(cfg: RunConfig, *, apiext: Any, custom: Any, namespace: str) -> list[Check]:
    """Run the checks with ``ApiextensionsV1Api`` and ``CustomObjectsApi`` clients (or fakes)."""
    checks: list[Check] = []
    try:
        crd = apiext.read_custom_resource_definition(CRD_NAME)
    except Exception as err:  # the client's ApiException
        if getattr(err, "status", None) == 404:
            checks.append(
                Check("TrainJob CRD", False, f"{CRD_NAME} is not installed: install Kubeflow Trainer >= v2.2")
            )
            return checks
        if getattr(err, "status", None) in (401, 403):
            checks.append(Check("TrainJob CRD", False, f"not allowed to read {CRD_NAME}: {err}"))
            return checks
        raise UnreachableError(f"the Kubernetes API cannot be reached: {err}") from err
    checks.append(Check("TrainJob CRD", True, f"{CRD_NAME} is installed"))
    fields = spec_fields(crd)
    if fields is None:
        checks.append(Check("TrainJob version", False, f"{CRD_NAME} does not serve {tj.VERSION}"))
    else:
        missing = sorted(set(tj.REQUIRED_SPEC_FIELDS) - fields)
        need = "v{}.{}".format(*tj.TRAINER_MIN_VERSION)
        checks.append(
            Check(
                "TrainJob fields",
                not missing,
                f"spec lacks {missing}: the Trainer is older than {need}; upgrade it"
                if missing
                else f"spec has {', '.join(tj.REQUIRED_SPEC_FIELDS)}",
            )
        )
    release = trainer_version(crd)
    if release is not None:
        ok = release >= tj.TRAINER_MIN_VERSION
        checks.append(
            Check("Trainer release", ok, f"v{release[0]}.{release[1]} (needs >= v%d.%d)" % tj.TRAINER_MIN_VERSION)
        )
    t = cfg.kubernetes.trainer
    try:
        if t.runtime_kind == "ClusterTrainingRuntime":
            custom.get_cluster_custom_object(tj.GROUP, tj.VERSION, "clustertrainingruntimes", t.runtime)
        else:
            custom.get_namespaced_custom_object(tj.GROUP, tj.VERSION, namespace, "trainingruntimes", t.runtime)
        checks.append(Check("runtime", True, f"{t.runtime_kind} {t.runtime} exists"))
    except Exception as err:
        if getattr(err, "status", None) == 404:
            checks.append(Check("runtime", False, f"{t.runtime_kind} {t.runtime} does not exist"))
        else:
            checks.append(Check("runtime", False, f"{t.runtime_kind} {t.runtime} could not be read: {err}"))
    return checks


def require_ready(checks: list[Check]) -> None:
    """ConfigError listing the failed checks, if any."""
    failed = [c for c in checks if not c.ok]
    if failed:
        raise ConfigError(
            "the cluster is not ready for the TrainJob: " + "; ".join(f"{c.name}: {c.detail}" for c in failed)
        )


def clients() -> tuple[Any, Any]:
    """(ApiextensionsV1Api, CustomObjectsApi) from the in-cluster config or the local kubeconfig."""
    try:
        from kubernetes import client, config
    except ImportError as err:  # pragma: no cover - kubernetes ships with kfp
        raise ConfigError("the kubernetes Python client is not installed") from err
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except Exception as err:
            raise UnreachableError(f"no in-cluster config and no usable kubeconfig: {err}") from err
    return client.ApiextensionsV1Api(), client.CustomObjectsApi()
