"""The ppo step as a Kubeflow Trainer ``TrainJob``: training across nodes without a launcher of our own.

:func:`trainjob_manifest` turns the run config into a ``trainer.kubeflow.org/v1alpha1`` TrainJob
(Kubeflow Trainer v2): ``runtimeRef`` names a (Cluster)TrainingRuntime such as
``torch-distributed``; ``trainer`` sets the image, ``numNodes``, ``numProcPerNode`` and
``resourcesPerNode`` (``kubernetes.steps.ppo``: CPU, memory, GPUs), the command and its
environment; a ``runtimePatches`` entry adds the pod settings the runtime cannot know (node
selector, tolerations, service account, pull secrets, the model-cache volume).

Every node runs ``torchrun -m preftune.cli ppo --config ... --reward-model ... --output ...``:
the Trainer's torch plugin gives each pod ``PET_NNODES``, ``PET_NPROC_PER_NODE``,
``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT``, which torchrun reads as its
own flags, so the command carries no rendezvous settings. The run config travels in the
``PREFTUNE_RUN_CONFIG`` variable (JSON, which is YAML) and is written to a file before torchrun
starts; it holds no credentials (those come from ``kubernetes.secrets`` as Secret references).

:func:`submit_and_wait` creates the TrainJob with the Kubernetes Python client and polls it until
it completes or fails; a TrainJob of the same name that already exists (a retried pipeline task)
is waited for, not created twice. A failed TrainJob exits 12 when its failure says training
diverged, else 1; no verdict before the timeout exits 4. :mod:`preftune.kube.handoff` uses both
for the pipeline's ppo task (``kubernetes.trainer.enabled``). No kfp import here.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from preftune import __version__
from preftune.errors import ConfigError, ExitCode, PreftuneError
from preftune.home import ENV_HOME
from preftune.kube.names import dns1035_label
from preftune.tracking import ENV_PARENT_RUN_ID, ENV_PIPELINE_RUN_ID

if TYPE_CHECKING:
    from preftune.config import RunConfig

TRAINER_MIN_VERSION = (2, 2)
"""Kubeflow Trainer release the TrainJob needs: ``runtimePatches`` and ``activeDeadlineSeconds``
arrived in v2.2 (``preftune kube doctor`` checks a cluster's TrainJob CRD for both)."""
REQUIRED_SPEC_FIELDS = ("runtimePatches", "activeDeadlineSeconds", "runtimeRef", "trainer")

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TrainJob"
PLURAL = "trainjobs"
PATCH_MANAGER = "preftune.io/run-config"
"""Owner of the runtime patch the manifest carries (the Trainer keys patches by manager)."""

ENV_RUN_CONFIG = "PREFTUNE_RUN_CONFIG"
ENV_REWARD_MODEL = "PREFTUNE_REWARD_MODEL"
ENV_OUTPUT = "PREFTUNE_OUTPUT"
CONFIG_FILE = "/tmp/preftune-run-config.json"
CACHE_VOLUME = "preftune-cache"
TMP_VOLUME = "preftune-tmp"
HOME_VOLUME = "preftune-home"
SHM_VOLUME = "preftune-shm"
IMAGE_HOME = "/var/lib/preftune"
"""$HOME and $PREFTUNE_HOME of the image (the Dockerfile); an emptyDir when no model-cache claim is mounted."""

# The command of every node: the config from the environment to a file, then torchrun (which takes
# --nnodes, --nproc-per-node, --node-rank and the master address from the PET_* variables).
NODE_SCRIPT = (
    f"printenv {ENV_RUN_CONFIG} > {CONFIG_FILE} && exec torchrun -m preftune.cli ppo --config {CONFIG_FILE} "
    f'--reward-model "${ENV_REWARD_MODEL}" --output "${ENV_OUTPUT}" --no-progress'
)

_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _label_value(text: str) -> str:
    value = _LABEL_UNSAFE.sub("-", text)[:63].strip("-_.")
    return value or "unnamed"


def _shared(uri: str, what: str, cfg: RunConfig) -> None:
    """Every node must reach ``uri``: remote storage, or a path on the shared model-cache claim."""
    if "://" in uri and not uri.startswith("file://"):
        return
    cache = cfg.kubernetes.model_cache
    path = PurePosixPath(uri.removeprefix("file://"))
    if cache.pvc and path.is_absolute() and path.is_relative_to(cache.mount_path):
        return
    raise ConfigError(
        f"{what} {uri!r} is a local path that the TrainJob's nodes cannot see: give an s3:// URI (see "
        f"storage.root) or a path under kubernetes.model_cache.mount_path ({cache.mount_path}) with "
        "kubernetes.model_cache.pvc set"
    )


def processes_per_node(cfg: RunConfig) -> int:
    """``kubernetes.trainer.processes_per_node``, else one per GPU of the ppo step, else 1."""
    t = cfg.kubernetes.trainer
    return t.processes_per_node or max(1, cfg.kubernetes.steps.ppo.gpus)


def pod_security_context(cfg: RunConfig) -> dict[str, Any]:
    """Pod-level securityContext of the TrainJob's nodes: the restricted Pod Security Standard."""
    sc: dict[str, Any] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    uid = cfg.kubernetes.run_as_user
    if uid is not None:  # None: the platform picks one (OpenShift's restricted SCC)
        sc.update({"runAsUser": uid, "runAsGroup": uid, "fsGroup": uid, "fsGroupChangePolicy": "OnRootMismatch"})
    return sc


def container_security_context(cfg: RunConfig) -> dict[str, Any]:
    """Container-level securityContext of the node container: restricted, read-only root filesystem."""
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def trainjob_name(cfg: RunConfig, reward_model: str, output: str, pipeline_run_id: str | None = None) -> str:
    """``<name_prefix>-<8 hex digits>``: the same run and inputs give the same name (retries find it)."""
    key = json.dumps([cfg.run.name, reward_model, output, pipeline_run_id, cfg.config_hash()])
    return f"{cfg.kubernetes.trainer.name_prefix}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def trainjob_manifest(
    cfg: RunConfig,
    reward_model: str,
    output: str,
    *,
    name: str | None = None,
    namespace: str | None = None,
    pipeline_run_id: str | None = None,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """The TrainJob (a plain dict, camelCase as the API wants it) that runs the ppo step across nodes.

    ``reward_model`` and ``output`` must be reachable from every node (``s3://``, or a path on the
    shared model-cache claim); ConfigError otherwise, and when the batch cannot be split over the
    processes (ppo.batch_size and ppo.mini_batch_size must be multiples of nodes x processes).
    """
    k = cfg.kubernetes
    t = k.trainer
    res = k.steps.ppo
    _shared(reward_model, "the reward model", cfg)
    _shared(output, "the output", cfg)
    nproc = processes_per_node(cfg)
    world = t.nodes * nproc
    for field in ("batch_size", "mini_batch_size"):
        value = getattr(cfg.ppo, field)
        if value % world:
            raise ConfigError(
                f"ppo.{field} ({value}) must be a multiple of the TrainJob's processes ({t.nodes} nodes x {nproc} "
                f"per node = {world}): each process takes an equal share"
            )

    requests: dict[str, str] = {"cpu": res.cpu, "memory": res.memory}
    limits: dict[str, str] = {"memory": res.effective_memory_limit}
    if res.cpu_limit:
        limits["cpu"] = res.cpu_limit
    if res.gpus:
        limits[res.accelerator] = str(res.gpus)  # extended resources: the limit is the request

    run_config = cfg.model_dump(mode="json")
    env: list[dict[str, Any]] = [
        {"name": ENV_RUN_CONFIG, "value": json.dumps(run_config, sort_keys=True, separators=(",", ":"))},
        {"name": ENV_REWARD_MODEL, "value": reward_model},
        {"name": ENV_OUTPUT, "value": output},
        {"name": "OMP_WAIT_POLICY", "value": "PASSIVE"},
    ]
    if pipeline_run_id:
        env.append({"name": ENV_PIPELINE_RUN_ID, "value": pipeline_run_id})
    if parent_run_id:
        env.append({"name": ENV_PARENT_RUN_ID, "value": parent_run_id})
    if k.model_cache.pvc:
        env.append({"name": ENV_HOME, "value": k.model_cache.mount_path})
    for s in k.secrets:
        ref: dict[str, Any] = {"name": s.secret_name, "key": s.key}
        if s.optional:
            ref["optional"] = True
        env.append({"name": s.env, "valueFrom": {"secretKeyRef": ref}})

    pod: dict[str, Any] = {"securityContext": pod_security_context(cfg)}
    if res.node_selector:
        pod["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod["tolerations"] = [tol.to_kubernetes() for tol in res.tolerations]
    if k.service_account:
        pod["serviceAccountName"] = k.service_account
    if k.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in k.image_pull_secrets]
    # The restricted Pod Security Standard with a read-only root filesystem: the writable places are
    # emptyDirs (/tmp for the run config file and torch, the home when no claim is mounted) and a
    # memory-backed /dev/shm for NCCL and the data loaders.
    volumes: list[dict[str, Any]] = [
        {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": "2Gi"}},
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": TMP_VOLUME, "mountPath": "/tmp"},
        {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
    ]
    if k.model_cache.pvc:
        volumes.append({"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": k.model_cache.pvc}})
        mounts.append({"name": CACHE_VOLUME, "mountPath": k.model_cache.mount_path})
    if not k.model_cache.pvc or k.model_cache.mount_path != IMAGE_HOME:
        volumes.append({"name": HOME_VOLUME, "emptyDir": {"sizeLimit": "4Gi"}})
        mounts.append({"name": HOME_VOLUME, "mountPath": IMAGE_HOME})
    pod["volumes"] = volumes
    pod["containers"] = [
        {"name": t.container, "securityContext": container_security_context(cfg), "volumeMounts": mounts}
    ]

    labels = {
        "app.kubernetes.io/name": "preftune",
        "app.kubernetes.io/component": "ppo",
        "app.kubernetes.io/version": _label_value(__version__),
        "preftune.io/run": _label_value(cfg.run.name),
    }
    if name is not None:
        try:
            dns1035_label(name, "TrainJob name")
        except ValueError as err:
            raise ConfigError(str(err)) from None
    metadata: dict[str, Any] = {"name": name or trainjob_name(cfg, reward_model, output, pipeline_run_id)}
    if namespace or t.namespace:
        metadata["namespace"] = namespace or t.namespace
    metadata["labels"] = labels

    spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": GROUP, "kind": t.runtime_kind, "name": t.runtime},
        "trainer": {
            "image": k.image,
            "command": ["/bin/sh", "-c", NODE_SCRIPT],
            "env": env,
            "numNodes": t.nodes,
            "numProcPerNode": nproc,
            "resourcesPerNode": {"requests": requests, "limits": limits},
        },
    }
    if res.timeout_s:
        spec["activeDeadlineSeconds"] = res.timeout_s
    spec["runtimePatches"] = [
        {
            "manager": PATCH_MANAGER,
            "trainingRuntimeSpec": {
                "template": {
                    "spec": {
                        "replicatedJobs": [{"name": t.container, "template": {"spec": {"template": {"spec": pod}}}}]
                    }
                }
            },
        }
    ]
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}


# -- submit and wait ---------------------------------------------------------------------------


def current_namespace(default: str = "default") -> str:
    """The namespace this pod runs in (its service-account mount), else ``default``."""
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace", encoding="utf-8") as fh:
            return fh.read().strip() or default
    except OSError:
        return default


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and str(c.get("status")) == "True":
            return c
    return None


_DIVERGED = re.compile(
    rf"\bdiverged\b|\bexit(?:ed)?[ _]?(?:with )?(?:code|status)?[:= ]*{ExitCode.TRAINING_DIVERGED}\b", re.IGNORECASE
)


def failure_exit_code(condition: dict[str, Any]) -> int:
    """Exit code of a failed TrainJob: 12 when its Failed condition says training diverged, else 1.

    The Trainer reports why the JobSet failed, which names the nodes' exit code only when the
    runtime passes it on (a pod failure policy, a termination message): ``exit code 12``,
    ``exited 12``, ``exitCode: 12`` or ``diverged`` in the reason or message mean divergence (the
    nodes' ``preftune ppo`` exits 12 then). Anything else is 1: a failed TrainJob is not retried
    (the retried task would find the same failed TrainJob); the nodes' logs hold their own codes.
    """
    text = f"{condition.get('reason', '')} {condition.get('message', '')}"
    return ExitCode.TRAINING_DIVERGED if _DIVERGED.search(text) else ExitCode.INTERNAL


def trainjob_state(obj: dict[str, Any]) -> str:
    """``complete``, ``failed`` or ``running`` from a TrainJob's status conditions."""
    if _condition(obj, "Complete"):
        return "complete"
    if _condition(obj, "Failed"):
        return "failed"
    return "running"


def submit_and_wait(
    manifest: dict[str, Any],
    *,
    namespace: str,
    poll_s: float,
    timeout_s: float | None = None,
    api: Any = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Create the TrainJob (or find the one of that name), wait until it completes; its last state.

    ``api`` is a ``kubernetes.client.CustomObjectsApi`` (built from the in-cluster or local
    kubeconfig when None). A failed TrainJob, or one still running after ``timeout_s``, raises a
    PreftuneError with the Trainer's reason and message.
    """
    if api is None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api = client.CustomObjectsApi()
    name = manifest["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    except Exception as err:  # the kubernetes client's ApiException; 409: a retried task finds its TrainJob
        status = getattr(err, "status", None)
        if status == 404:  # no TrainJob resource at all on this API server
            raise ConfigError(
                f"the cluster has no {PLURAL}.{GROUP}/{VERSION}: install Kubeflow Trainer >= v%d.%d (check with "
                "`preftune kube doctor`)" % TRAINER_MIN_VERSION
            ) from err
        if status != 409:
            raise
    started = clock()
    while True:
        obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        state = trainjob_state(obj)
        if state == "complete":
            return obj
        if state == "failed":
            c = _condition(obj, "Failed") or {}
            raise PreftuneError(
                f"TrainJob {namespace}/{name} failed: {c.get('reason', 'unknown reason')}: {c.get('message', '')} "
                f"(kubectl -n {namespace} logs -l jobset.sigs.k8s.io/jobset-name={name})",
                failure_exit_code(c),
            )
        if timeout_s is not None and clock() - started > timeout_s:
            raise PreftuneError(
                f"TrainJob {namespace}/{name} still running after {timeout_s:g} s; giving up (a retried task waits "
                "for the same TrainJob again)",
                ExitCode.UNREACHABLE,
            )
        sleep(poll_s)
