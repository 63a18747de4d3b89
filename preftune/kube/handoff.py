"""The pipeline's ppo step handed to Kubeflow Trainer: publish the input, submit, wait, copy the policy back.

With ``kubernetes.trainer.enabled`` the ppo task of the pipeline does not train in its own pod;
:func:`preftune.pipeline.adapters.ppo.ppo` calls :func:`run_handoff` instead of ``run_ppo``:

1. ``storage.root`` must be reachable from every node: ``s3://``, or a path on the model-cache
   claim (``kubernetes.model_cache``); ConfigError (exit 2) otherwise.
2. The reward model (a local folder in the task's pod: Kubeflow downloaded the artifact there) is
   published with ``Storage.put_dir`` to ``<storage.root>/trainer/<run name>/<pipeline run id>/
   reward-model``; a reward model that is already shared is passed on as it is.
3. :func:`preftune.kube.trainjob.submit_and_wait` creates the TrainJob (named from the run, the
   inputs and the config, so a retried task waits for the one it created) whose nodes publish the
   policy to ``<storage.root>/trainer/<run name>/<pipeline run id>/policy``.
4. On ``Complete`` the published policy is copied into the task's output folder (``get_dir``,
   atomic) and its ``ppo_policy.json`` and ``metrics.json`` give the step's figures, the same the
   in-pod path returns. On ``Failed`` (exit 12 when the failure says training diverged, else 1)
   or no verdict within ``steps.ppo.timeout_s`` (exit 4) nothing is copied to the output.

No kfp import here.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.errors import ConfigError, CredentialsError, InputError, UnreachableError
from preftune.kube import trainjob as tj

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import RunConfig
    from preftune.storage import Storage

log = logging.getLogger(__name__)

PREFIX = "trainer"
"""Folder under ``storage.root`` holding each pipeline run's TrainJob input and output."""

WAIT_GRACE_S = 600
"""Seconds the task waits past ``steps.ppo.timeout_s`` (the TrainJob's own deadline) for the verdict."""


@dataclass
class HandoffResult:
    """What the TrainJob produced, read back from the policy its nodes published."""

    trainjob: str
    namespace: str
    reward_model: str
    """The reward model as the nodes read it (a URI under ``storage.root``, or the shared input)."""
    policy_uri: str
    """Where the nodes published the policy (copied to the task's output)."""
    output: str
    metadata: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list, repr=False)

    @property
    def final(self) -> dict[str, float]:
        return dict(self.metadata.get("final") or (self.history[-1] if self.history else {}))

    @property
    def first(self) -> dict[str, float]:
        return dict(self.history[0]) if self.history else {}


def run_prefix(cfg: RunConfig, pipeline_run_id: str) -> str:
    """``<storage.root>/trainer/<run name>/<pipeline run id>``: this run's TrainJob input and output."""
    from preftune.storage import Storage

    root = shared_root(cfg)
    return Storage.join(root, PREFIX, cfg.run.name, pipeline_run_id)


def shared_root(cfg: RunConfig) -> str:
    """``storage.root`` when every node can reach it; ConfigError naming the fields otherwise."""
    root = cfg.storage.root
    if not root:
        raise ConfigError(
            "kubernetes.trainer.enabled needs storage.root: an s3:// URI (or a path under "
            "kubernetes.model_cache.mount_path with kubernetes.model_cache.pvc set) where the ppo task publishes "
            "the reward model and the TrainJob's nodes publish the policy"
        )
    tj._shared(root, "storage.root (kubernetes.trainer.enabled)", cfg)
    return root


def check_supported(cfg: RunConfig) -> None:
    """ConfigError for settings a TrainJob cannot honour yet (named, with what to do instead)."""
    if cfg.ppo.demonstration_coef > 0:
        raise ConfigError(
            "ppo.demonstration_coef is not supported with kubernetes.trainer.enabled yet (the TrainJob does not "
            "receive the dataset's written answers): set it to 0, or run PPO in the pipeline's own pod"
        )


def _is_shared(uri: str, cfg: RunConfig) -> bool:
    try:
        tj._shared(uri, "", cfg)
    except ConfigError:
        return False
    return True


def publish_reward_model(cfg: RunConfig, reward_model: str, prefix: str, storage: Storage) -> str:
    """The reward model as a URI every node reads: published under ``prefix`` unless already shared."""
    from preftune.storage import Storage as _Storage

    if _is_shared(reward_model, cfg):
        return reward_model
    if not Path(reward_model).is_dir():
        raise InputError(f"reward model {reward_model}: not a folder (expected the train-reward step's output)")
    uri = _Storage.join(prefix, "reward-model")
    log.info("publishing the reward model %s to %s for the TrainJob", reward_model, uri)
    return storage.put_dir(reward_model, uri)


def _api_errors(err: Exception, namespace: str, name: str) -> Exception:
    """A Kubernetes API error as the contract's error (RBAC, no Trainer, no cluster); others unchanged."""
    status = getattr(err, "status", None)
    what = f"TrainJob {namespace}/{name}"
    if status in (401, 403):
        return CredentialsError(
            f"{what}: the Kubernetes API refused it ({status} {getattr(err, 'reason', '')}): the ppo task's "
            f"ServiceAccount needs create and get on trainjobs.trainer.kubeflow.org in namespace {namespace} "
            "(see docs/ppo.md)"
        )
    if status == 404:
        return ConfigError(
            f"{what}: the Kubernetes API has no trainjobs.trainer.kubeflow.org in namespace {namespace} (404): is "
            "Kubeflow Trainer v2 installed, and kubernetes.trainer.namespace right?"
        )
    if isinstance(err, OSError) or type(err).__name__ in ("MaxRetryError", "NewConnectionError", "ConfigException"):
        return UnreachableError(f"{what}: cannot reach the Kubernetes API: {err}")
    return err


def run_handoff(
    cfg: RunConfig,
    reward_model: str,
    output: str,
    *,
    pipeline_run_id: str,
    parent_run_id: str | None = None,
    api: Any = None,
    storage: Storage | None = None,
    sleep: Any = None,
) -> HandoffResult:
    """Train the policy in a TrainJob and copy it to ``output``; see the module docstring.

    ``api`` (a ``kubernetes.client.CustomObjectsApi``, built from the in-cluster config when None)
    and ``sleep`` are for tests.
    """
    from preftune.ppo import artifacts
    from preftune.storage import Storage as _Storage

    t = cfg.kubernetes.trainer
    storage = storage or _Storage.from_config(cfg.storage)
    prefix = run_prefix(cfg, pipeline_run_id)
    shared_reward = publish_reward_model(cfg, reward_model, prefix, storage)
    policy_uri = _Storage.join(prefix, "policy")
    namespace = t.namespace or tj.current_namespace()
    manifest = tj.trainjob_manifest(
        cfg,
        shared_reward,
        policy_uri,
        namespace=namespace,
        pipeline_run_id=pipeline_run_id,
        parent_run_id=parent_run_id,
    )
    name = manifest["metadata"]["name"]
    timeout = cfg.kubernetes.steps.ppo.timeout_s
    log.info("ppo handed to TrainJob %s/%s (%d nodes); waiting for it", namespace, name, t.nodes)
    kwargs: dict[str, Any] = {"sleep": sleep} if sleep is not None else {}
    try:
        tj.submit_and_wait(
            manifest,
            namespace=namespace,
            poll_s=t.poll_s,
            timeout_s=timeout + WAIT_GRACE_S if timeout else None,
            api=api,
            **kwargs,
        )
    except Exception as err:  # noqa: BLE001 - mapped to the contract's errors, else re-raised as it is
        mapped = _api_errors(err, namespace, name)
        if mapped is err:
            raise
        raise mapped from err
    if not storage.exists(policy_uri):
        raise InputError(
            f"TrainJob {namespace}/{name} completed but published no policy at {policy_uri} (nodes' logs: kubectl "
            f"-n {namespace} logs -l jobset.sigs.k8s.io/jobset-name={name})"
        )
    storage.get_dir(policy_uri, output)
    metadata = artifacts.read_metadata(output)
    history: list[dict[str, float]] = []
    metrics = Path(output) / "metrics.json"
    if metrics.is_file():
        try:
            history = json.loads(metrics.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            log.warning("%s: cannot read the update history: %s", metrics, err)
    return HandoffResult(
        trainjob=name,
        namespace=namespace,
        reward_model=shared_reward,
        policy_uri=policy_uri,
        output=os.fspath(output),
        metadata=metadata,
        history=history if isinstance(history, list) else [],
    )
