"""The ``kubernetes`` section of the run config: how the pipeline's steps run on a cluster.

Why a config section and not pipeline parameters: Kubernetes settings (image, resources, GPUs,
node placement, secrets, volumes) are part of the compiled pipeline's platform spec, fixed when
the pipeline is compiled (``preftune compile --config``, ``preftune run --host``, ``preftune
schedule``); the run config travels with the run as its one structured parameter, and the
pipeline's first task checks that both agree (see ``preftune.pipeline.lifecycle.open_pipeline_run``).

No kfp import here: the library builds plain values; ``preftune.pipelines`` applies them with
kfp-kubernetes.

Rules kept here so a bad value fails when the config is loaded, with the field's path:

- the image must be pinned: a tag other than ``latest``, or a digest (``@sha256:...``);
- credentials reach the steps only as Kubernetes Secret references turned into environment
  variables (``secrets``), never as values in the config;
- every step has CPU and memory requests (defaults below, per step), ppo may ask for GPUs with
  an accelerator type, node selector and tolerations.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from preftune import __version__
from preftune.configbase import Section
from preftune.kube.names import dns1035_label, dns1123_label, dns1123_subdomain

DEFAULT_IMAGE = f"preftune:{__version__}"
"""The image built from the repo's Dockerfile for this version (push it to your registry and set ``image``)."""

STEP_NAMES = ("collect", "check_fit", "train_reward", "ppo", "evaluate", "promote")
"""Config keys of the pipeline's six steps (``tracking`` is the small first and last task)."""

_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$")  # Kubernetes resource.Quantity
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# [registry[:port]/]path[:tag][@digest]; the path is lowercase (the OCI distribution spec).
_IMAGE = re.compile(
    r"^(?P<name>(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[a-f0-9]{64}))?$"
)


def check_image(ref: str) -> str:
    """``ref`` if it is a pinned image reference, else ValueError saying what to change."""
    m = _IMAGE.match(ref or "")
    if not m:
        raise ValueError(
            f"{ref!r} is not an image reference; expected [registry/]repository:tag or repository@sha256:<digest> "
            "(lowercase repository)"
        )
    tag, digest = m.group("tag"), m.group("digest")
    if digest:
        return ref
    if not tag:
        raise ValueError(f"{ref!r} has no tag: pin the image, e.g. {m.group('name')}:{__version__} or @sha256:<digest>")
    if tag == "latest":
        raise ValueError(
            f"{ref!r}: the 'latest' tag is not pinned (every pull may get another image); use a version tag such as "
            f"{m.group('name')}:{__version__} or a digest"
        )
    return ref


def _quantity(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{field}: expected a Kubernetes quantity such as '2', '500m' or '8Gi', got {value!r}")
    text = str(value).strip()
    if not _QUANTITY.match(text):
        raise ValueError(f"{field}: {value!r} is not a Kubernetes quantity (e.g. '2', '500m', '8Gi')")
    return text


class Toleration(Section):
    """A Kubernetes toleration (the pod may run on nodes with a matching taint)."""

    key: str | None = Field(None, description="Taint key; empty matches every key (operator must be Exists).")
    operator: Literal["Equal", "Exists"] = Field("Equal", description="'Equal' (key and value) or 'Exists' (key only).")
    value: str | None = Field(None, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty matches every effect."
    )
    toleration_seconds: int | None = Field(
        None, ge=0, description="For NoExecute: how long the pod stays on a node after the taint appears."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.key is None and self.operator != "Exists":
            raise ValueError("a toleration without a key must use operator Exists")
        if self.operator == "Exists" and self.value not in (None, ""):
            raise ValueError("operator Exists takes no value")
        if self.key is not None and not _LABEL_KEY.match(self.key):
            raise ValueError(f"key {self.key!r} is not a valid taint key")
        return self

    def to_kubernetes(self) -> dict[str, Any]:
        """The toleration as in a Pod spec (camelCase, unset fields left out)."""
        out = {
            "key": self.key,
            "operator": self.operator,
            "value": self.value,
            "effect": self.effect,
            "tolerationSeconds": self.toleration_seconds,
        }
        return {k: v for k, v in out.items() if v is not None}


class StepResources(Section):
    """Resources and placement of one step's pod."""

    cpu: str = Field("1", description="CPU request (a Kubernetes quantity: '2', '500m').")
    memory: str = Field("2Gi", description="Memory request (a Kubernetes quantity: '8Gi', '512Mi').")
    cpu_limit: str | None = Field(None, description="CPU limit. Empty: none (the step may use idle CPU).")
    memory_limit: str | None = Field(
        None, description="Memory limit. Empty: the memory request (a step never grows past what it asked for)."
    )
    gpus: int = Field(
        0, ge=0, le=64, description="GPUs (accelerators) for the step; only on a cluster (the local runner refuses it)."
    )
    accelerator: str = Field(
        "nvidia.com/gpu", min_length=1, description="Extended resource name of the accelerator (used when gpus > 0)."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the step's pod must run on, e.g. {nvidia.com/gpu.product: ...}."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Taints the step's pod tolerates (e.g. dedicated GPU nodes)."
    )
    timeout_s: int | None = Field(
        None, ge=1, description="Kill the step's pod after this many seconds (activeDeadlineSeconds). Empty: never."
    )

    @field_validator("cpu", "memory", "cpu_limit", "memory_limit", mode="before")
    @classmethod
    def _quantities(cls, v: Any, info: Any) -> str | None:
        return _quantity(v, info.field_name)

    @field_validator("node_selector")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not _LABEL_KEY.match(key):
                raise ValueError(f"node_selector: {key!r} is not a valid label key")
            if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
                raise ValueError(f"node_selector.{key}: {value!r} is not a valid label value")
        return v

    @property
    def effective_memory_limit(self) -> str:
        return self.memory_limit or self.memory


def _step_defaults() -> dict[str, dict[str, Any]]:
    """Per-step defaults, sized for the demo world and small models; raise them for real models."""
    return {
        "tracking": {"cpu": "250m", "memory": "1Gi"},
        "collect": {"cpu": "2", "memory": "8Gi"},
        "check_fit": {"cpu": "1", "memory": "2Gi"},
        "train_reward": {"cpu": "4", "memory": "16Gi"},
        "ppo": {"cpu": "4", "memory": "16Gi"},
        "evaluate": {"cpu": "2", "memory": "8Gi"},
        "promote": {"cpu": "1", "memory": "4Gi"},
    }


class StepsSection(Section):
    """Per-step resources; a step given here keeps the defaults of the fields it does not set."""

    tracking: StepResources = Field(
        default_factory=lambda: StepResources(**_step_defaults()["tracking"]),
        description="The first and last tasks (open and close the MLflow run, fingerprint the data).",
    )
    collect: StepResources = Field(
        default_factory=lambda: StepResources(**_step_defaults()["collect"]),
        description="The collect step (samples candidates with the policy; a GPU speeds it up).",
    )
    check_fit: StepResources = Field(
        default_factory=lambda: StepResources(**_step_defaults()["check_fit"]),
        description="The check-fit step (agreement statistics; CPU only).",
    )
    train_reward: StepResources = Field(
        default_factory=lambda: StepResources(**_step_defaults()["train_reward"]),
        description="The train-reward step (trains the reward model).",
    )
    ppo: StepResources = Field(
        default_factory=lambda: StepResources(**_step_defaults()["ppo"]),
        description="The PPO step: the one that usually gets GPUs, a node selector and tolerations.",
    )
    evaluate: StepResources = Field(
        default_factory=lambda: StepResources(**_step_defaults()["evaluate"]),
        description="The evaluate step (samples the candidate and the champion on the suite).",
    )
    promote: StepResources = Field(
        default_factory=lambda: StepResources(**_step_defaults()["promote"]),
        description="The promote step (logs and registers the policy in MLflow).",
    )

    @model_validator(mode="before")
    @classmethod
    def _merge_defaults(cls, data: Any) -> Any:
        """``{ppo: {gpus: 4}}`` keeps ppo's default cpu and memory (not the generic ones)."""
        if not isinstance(data, dict):
            return data
        defaults = _step_defaults()
        out = dict(data)
        for name, given in data.items():
            if name in defaults and isinstance(given, dict):
                out[name] = {**defaults[name], **given}
        return out

    def for_step(self, step: str) -> StepResources:
        """Resources of a pipeline step by its name (``check-fit`` or ``check_fit``)."""
        return getattr(self, step.replace("-", "_"))

    def gpu_steps(self) -> list[str]:
        return [name for name in ("tracking", *STEP_NAMES) if getattr(self, name).gpus > 0]


class SecretEnv(Section):
    """One environment variable of every step, read from a key of an existing Kubernetes Secret."""

    secret_name: str = Field(..., description="Name of the Secret (in the namespace the pipeline runs in).")
    key: str = Field(..., description="Key inside the Secret.")
    env: str = Field(..., description="Environment variable it becomes, e.g. AWS_SECRET_ACCESS_KEY.")
    optional: bool = Field(False, description="Start the step even when the Secret or key is missing.")

    @field_validator("secret_name")
    @classmethod
    def _secret_name(cls, v: str) -> str:
        return dns1123_subdomain(v, "Secret name")

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        if not _SECRET_KEY.match(v):
            raise ValueError(f"{v!r} is not a valid Secret key (letters, digits, '-', '_', '.')")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: str) -> str:
        if not _ENV_NAME.match(v):
            raise ValueError(f"{v!r} is not a valid environment variable name")
        return v


class ModelCacheSection(Section):
    """A PersistentVolumeClaim shared by the steps: downloaded models, the demo world, caches."""

    pvc: str | None = Field(
        None,
        description="Name of an existing PersistentVolumeClaim mounted in every step (ReadWriteMany, or "
        "ReadWriteOnce when the steps may share a node). Empty: each pod starts with an empty cache.",
    )
    mount_path: str = Field(
        "/var/lib/preftune",
        description="Where the claim is mounted; it becomes $PREFTUNE_HOME of the steps (cache/s3 holds the "
        "downloaded models, world/ the demo world).",
    )

    @field_validator("pvc")
    @classmethod
    def _pvc(cls, v: str | None) -> str | None:
        return None if v is None else dns1123_subdomain(v, "PersistentVolumeClaim name")

    @field_validator("mount_path")
    @classmethod
    def _abs(cls, v: str) -> str:
        if not v.startswith("/") or v.rstrip("/") == "":
            raise ValueError(f"{v!r}: give an absolute path other than /")
        return v.rstrip("/")


class RetrySection(Section):
    """Kubeflow retries of a failed step (pod evicted, node lost, storage or tracking briefly down)."""

    max_retries: int = Field(2, ge=0, le=10, description="Retries of a failed step on a cluster (0: none).")
    backoff_s: int = Field(60, ge=0, description="Seconds before the first retry.")
    backoff_factor: float = Field(2.0, ge=1.0, le=10.0, description="Each further retry waits this many times longer.")
    backoff_max_s: int = Field(3600, ge=1, description="Longest wait between two retries, in seconds.")


class TrainerSection(Section):
    """Hand the ppo step to Kubeflow Trainer (a ``TrainJob``) to train across several nodes.

    ``preftune kube trainjob`` (and :func:`preftune.kube.trainjob.trainjob_manifest`) turn the run
    config into a ``trainer.kubeflow.org/v1alpha1`` TrainJob whose every node runs ``torchrun -m
    preftune.cli ppo`` with the ppo step's resources (``steps.ppo``: CPU, memory, GPUs per node,
    node selector, tolerations); these fields shape it.

    ``enabled: false`` (the default): the pipeline's ppo task trains in its own pod (torchrun
    inside it for several GPUs). ``enabled: true``: the same ppo task hands the training to a
    TrainJob (:mod:`preftune.kube.handoff`): it publishes the reward model under ``storage.root``
    (which must be ``s3://`` or on the model-cache claim, so every node sees it), submits the
    TrainJob and waits for it, then copies the policy the nodes published back into its output.
    Its own pod then needs no GPU (it gets the small ``steps.tracking`` resources) and its
    ServiceAccount needs ``create`` and ``get`` on ``trainjobs.trainer.kubeflow.org``.
    """

    enabled: bool = Field(
        False,
        description="Hand the pipeline's ppo step to a Kubeflow Trainer TrainJob (needs storage.root on s3:// or "
        "the model-cache claim, and RBAC create/get on trainjobs.trainer.kubeflow.org). False: ppo trains in its "
        "own pod.",
    )

    runtime: str = Field(
        "torch-distributed",
        description="Name of the (Cluster)TrainingRuntime the TrainJob refers to (Kubeflow Trainer installs "
        "'torch-distributed'; one with your NCCL or DeepSpeed settings works too).",
    )
    runtime_kind: Literal["ClusterTrainingRuntime", "TrainingRuntime"] = Field(
        "ClusterTrainingRuntime",
        description="Kind of that runtime: cluster-wide, or a TrainingRuntime in the TrainJob's namespace.",
    )
    container: str = Field(
        "node",
        description="Name of the trainer's replicated job and of its container in the runtime (Kubeflow "
        "Trainer's torch runtimes call both 'node'); pod settings (volumes, node selector) are patched onto them.",
    )
    nodes: int = Field(1, ge=1, le=1024, description="Training nodes (pods); each gets steps.ppo's resources.")
    processes_per_node: int | None = Field(
        None,
        ge=1,
        le=64,
        description="torchrun processes per node. Empty: one per GPU of steps.ppo (gpus), or 1 without GPUs.",
    )
    namespace: str | None = Field(
        None, description="Namespace of the TrainJob. Empty: the namespace the pipeline's pod runs in."
    )
    name_prefix: str = Field(
        "preftune-ppo", description="TrainJob names are this prefix, '-' and a short hash of the run and inputs."
    )
    poll_s: int = Field(30, ge=1, le=3600, description="Seconds between two status checks while waiting.")

    @field_validator("runtime")
    @classmethod
    def _runtime(cls, v: str) -> str:
        return dns1123_subdomain(v, "runtime")

    @field_validator("container")
    @classmethod
    def _container(cls, v: str) -> str:
        return dns1123_label(v, "container")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str | None) -> str | None:
        return None if v is None else dns1123_label(v, "namespace")

    @field_validator("name_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        # TrainJob names become JobSet, Job, Pod and Service names: the Trainer's CRD requires a DNS-1035
        # label (a letter first) and keeps it short; prefix + '-' + 8 hex digits stays within 40.
        return dns1035_label(v, "name_prefix", max_len=31)


class KubernetesSection(Section):
    """How the pipeline's steps run on Kubernetes: image, resources, GPUs, secrets, volumes, retries, caching."""

    image: str = Field(
        DEFAULT_IMAGE,
        description="The preftune image every step runs, pinned by tag or digest ('latest' and untagged are "
        "rejected), e.g. registry.example.com/ml/preftune:0.1.0 (use the -cuda build for GPU steps).",
    )
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = Field(
        "IfNotPresent", description="Image pull policy of the step pods."
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Names of Secrets with registry credentials for pulling the image."
    )
    service_account: str | None = Field(
        None,
        description="Kubernetes ServiceAccount the pipeline's pods run as (e.g. one bound to a cloud role for "
        "S3). Empty: the Kubeflow Pipelines default.",
    )
    run_as_user: int | None = Field(
        10001,
        ge=1,
        description="UID (and GID, fsGroup) of the TrainJob's node pods; the image's user is 10001. Empty: the "
        "platform picks one (OpenShift's restricted SCC). The pods always run as non-root under the restricted "
        "Pod Security Standard.",
    )
    pipeline_root: str | None = Field(
        None,
        description="Where Kubeflow keeps the steps' artifacts (s3://, gs://, minio://). Empty: the Kubeflow "
        "Pipelines default. Kubeflow itself needs credentials for it.",
    )
    caching: bool = Field(
        True,
        description="Reuse a step's outputs when its inputs are unchanged (the data snapshot and dataset hash "
        "are inputs, so new data always re-runs). evaluate and promote never use the cache.",
    )
    retries: RetrySection = Field(default_factory=RetrySection)
    model_cache: ModelCacheSection = Field(default_factory=ModelCacheSection)
    secrets: list[SecretEnv] = Field(
        default_factory=list,
        description="Environment variables of every step from existing Secrets, e.g. {secret_name: s3-creds, "
        "key: access-key, env: AWS_ACCESS_KEY_ID}. Credentials never go into the run config.",
    )
    steps: StepsSection = Field(default_factory=StepsSection)
    trainer: TrainerSection = Field(
        default_factory=TrainerSection,
        description="The Kubeflow Trainer TrainJob that runs the ppo step across nodes (preftune kube trainjob).",
    )

    @field_validator("image")
    @classmethod
    def _pinned(cls, v: str) -> str:
        return check_image(v)

    @field_validator("image_pull_secrets")
    @classmethod
    def _pull_secrets(cls, v: list[str]) -> list[str]:
        for name in v:
            dns1123_subdomain(name, "image pull Secret name")
        return v

    @field_validator("service_account")
    @classmethod
    def _sa(cls, v: str | None) -> str | None:
        return None if v is None else dns1123_subdomain(v, "ServiceAccount name")

    @field_validator("pipeline_root")
    @classmethod
    def _root(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(s3|gs|minio)://[^/]+", v):
            raise ValueError(f"{v!r}: expected an s3://, gs:// or minio:// URI")
        return v

    @model_validator(mode="after")
    def _unique_env(self) -> KubernetesSection:
        seen: dict[str, str] = {}
        for s in self.secrets:
            if s.env in seen:
                raise ValueError(f"secrets: {s.env} is set twice ({seen[s.env]} and {s.secret_name}/{s.key})")
            seen[s.env] = f"{s.secret_name}/{s.key}"
        return self

    def platform_hash(self) -> str:
        """Hash of everything the compiled pipeline bakes in (the whole section), 16 hex digits."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def cron_for_kubeflow(expr: str) -> str:
    """A cron expression in the 6-field form Kubeflow's scheduler expects (seconds first).

    Kubeflow Pipelines parses recurring-run crons with seconds as the first field, so the usual
    5-field ``0 3 * * 1`` would mean "second 0 of minute 3 of every hour on Mondays"-like surprises;
    5 fields get a leading ``0`` (at second 0), 6 fields pass unchanged. Raises ValueError otherwise.
    """
    fields = expr.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise ValueError(
            f"cron {expr!r}: expected 5 fields (minute hour day-of-month month day-of-week), e.g. '0 3 * * 1', "
            "or 6 with seconds first"
        )
    allowed = re.compile(r"^[0-9A-Za-z*?/,\-LW#]+$")
    for f in fields:
        if not allowed.match(f):
            raise ValueError(f"cron {expr!r}: field {f!r} has characters cron does not allow")
    return " ".join(fields)
