"""The ``preference-retraining`` pipeline: collect -> check-fit -> train-reward -> ppo -> evaluate -> promote.

One definition for every target. :func:`build_pipeline` returns the pipeline for a run config:

- ``target="cluster"``: the Kubernetes settings of ``cfg.kubernetes`` are applied with the kfp
  task API and kfp-kubernetes (image, CPU/memory per step, GPUs/accelerator/node selector/
  tolerations, Secrets as environment variables, the model-cache PVC, retries with back-off);
- ``target="local"``: the same graph and components for kfp's local runner, which ignores
  Kubernetes settings; retries are left out too (a local step that fails for a real reason
  should fail at once, not after minutes of back-off).

The shared part (open-run to evaluate) is :func:`preftune.pipelines.graph.add_shared_steps`;
this pipeline adds promote behind the evaluation gate. Shape (task names in brackets)::

    exit handler [close-run]: ends the MLflow run with the outcome, whatever happened
    └─ [open-run] config + inputs checked, data snapshot, MLflow parent run
       [collect] (snapshot) -> dataset, hash
       [check-fit] (snapshot, dataset hash) -> fit? + dataset of the fit families
       if fit:
         [train-reward] (snapshot, fit dataset hash) -> gate passed? + reward model
         if gate passed:
           [ppo] (snapshot, fit dataset and its hash, reward model) -> policy
           [evaluate] (policy vs champion, uncached) -> passed? + report
           if passed:
             [promote] (uncached) -> promoted? + registry version

The run config is the pipeline's one parameter (``config``, a dict); its ``kubernetes``
section is baked into the compiled platform spec, and ``open-run`` refuses a config whose
section differs from the compiled one.

(No ``from __future__ import annotations``: kfp reads the pipeline function's real annotations.)
"""

from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import RunConfig
    from preftune.kube.config import KubernetesSection, StepResources

PIPELINE_NAME = "preference-retraining"
PIPELINE_DESCRIPTION = (
    "preftune: collect preferences, test their fit, train a reward model, PPO, evaluate against the "
    "champion and promote only when every gate passes. The one parameter is the run config."
)
PIPELINE_RUN_ID_LABEL = "metadata.labels['pipeline/runid']"
"""Kubeflow labels every pod of a run with its run id; the Downward API turns it into an env var."""

CONDITIONS = {
    "fit-for-ppo": "check-fit",
    "reward-gate-passed": "train-reward",
    "evaluation-passed": "evaluate",
}
"""``dsl.If`` groups and the task whose boolean output they test."""

Target = Literal["cluster", "local"]


def _resources_key(task_name: str) -> str:
    return {"open-run": "tracking", "close-run": "tracking"}.get(task_name, task_name.replace("-", "_"))


def task_resources(task_name: str, k: "KubernetesSection") -> "StepResources":
    """The resources of one task's pod: its step's, except ppo handed to Kubeflow Trainer.

    With ``kubernetes.trainer.enabled`` the ppo task only publishes the reward model, waits for the
    TrainJob and copies the policy back: ``steps.ppo`` (GPUs, node selector, tolerations, timeout)
    becomes the TrainJob's per-node resources and the task gets the small ``steps.tracking`` pod
    (CPU and memory only; the TrainJob's own deadline bounds the wait).
    """
    if task_name == "ppo" and k.trainer.enabled:
        small = k.steps.tracking
        return small.model_copy(update={"gpus": 0, "node_selector": {}, "tolerations": [], "timeout_s": None})
    return k.steps.for_step(_resources_key(task_name))


def apply_kubernetes(task: Any, task_name: str, k: "KubernetesSection", *, retries: bool = True) -> Any:
    """Apply ``cfg.kubernetes`` to one task (the cluster target)."""
    from kfp import kubernetes

    r: StepResources = task_resources(task_name, k)
    task.set_container_image(k.image)
    task.set_cpu_request(r.cpu)
    if r.cpu_limit:
        task.set_cpu_limit(r.cpu_limit)
    task.set_memory_request(r.memory)
    task.set_memory_limit(r.effective_memory_limit)
    if r.gpus:
        task.set_accelerator_type(r.accelerator)
        task.set_accelerator_limit(r.gpus)
    for key, value in r.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for t in r.tolerations:
        kubernetes.add_toleration(
            task,
            key=t.key,
            operator=t.operator,
            value=t.value,
            effect=t.effect,
            toleration_seconds=t.toleration_seconds,
        )
    if r.timeout_s:
        kubernetes.set_timeout(task, r.timeout_s)
    by_secret: dict[tuple[str, bool], dict[str, str]] = {}
    for s in k.secrets:
        by_secret.setdefault((s.secret_name, s.optional), {})[s.key] = s.env
    for (name, optional), mapping in by_secret.items():
        kubernetes.use_secret_as_env(task, secret_name=name, secret_key_to_env=mapping, optional=optional)
    if k.model_cache.pvc:
        kubernetes.mount_pvc(task, pvc_name=k.model_cache.pvc, mount_path=k.model_cache.mount_path)
        task.set_env_variable("PREFTUNE_HOME", k.model_cache.mount_path)
    kubernetes.use_field_path_as_env(task, env_name="PREFTUNE_PIPELINE_RUN_ID", field_path=PIPELINE_RUN_ID_LABEL)
    kubernetes.set_image_pull_policy(task, k.image_pull_policy)
    if k.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(k.image_pull_secrets))
    if retries and k.retries.max_retries:
        task.set_retry(
            num_retries=k.retries.max_retries,
            backoff_duration=f"{k.retries.backoff_s}s",
            backoff_factor=k.retries.backoff_factor,
            backoff_max_duration=f"{k.retries.backoff_max_s}s",
        )
    return task


def build_pipeline(cfg: "RunConfig | None" = None, *, target: Target = "cluster") -> Any:
    """The ``preference-retraining`` pipeline for ``cfg`` (default: the default run config)."""
    from kfp import dsl
    from preftune.components import retraining as c
    from preftune.pipelines.graph import SharedTasks, add_shared_steps

    from preftune.config import RunConfig

    cfg = cfg or RunConfig()
    k = cfg.kubernetes
    default_config = default_parameter(cfg)
    kubernetes_hash = k.platform_hash()
    caching = bool(k.caching)

    def setup(task: Any, name: str, *, cache: bool) -> Any:
        task.set_caching_options(enable_caching=cache)
        if target == "cluster":
            apply_kubernetes(task, name, k)
        return task

    def promote_if_passed(t: SharedTasks) -> None:
        with dsl.If(t.evaluated.outputs["Output"] == True, name="evaluation-passed"):  # noqa: E712
            setup(
                c.promote(
                    config=t.config,
                    dataset_hash=t.fit_hash,
                    eval_run_id=t.evaluated.outputs["eval_run_id"],
                    policy=t.policy,
                    reward_model=t.reward_model,
                ),
                "promote",
                cache=False,
            )

    # kubernetes.pipeline_root is baked in (defaultPipelineRoot); the local runner keeps its own folder.
    root = k.pipeline_root if target == "cluster" else None

    @dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION, pipeline_root=root)
    def preference_retraining(config: dict = default_config):  # noqa: B006 - kfp reads the default
        add_shared_steps(
            config,
            setup,
            kubernetes_hash=kubernetes_hash,
            caching=caching,
            exit_group="retraining",
            reward_gate=True,
            then=promote_if_passed,
        )

    return preference_retraining


def compile_pipeline(cfg: "RunConfig | None", package_path: str) -> str:
    """Compile the cluster pipeline for ``cfg`` to ``package_path`` (YAML); returns the path."""
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(cfg, target="cluster"), package_path=str(package_path))
    return str(package_path)


def default_parameter(cfg: "RunConfig") -> dict[str, Any]:
    """The ``config`` parameter for ``cfg``: see :func:`preftune.pipeline.parameters.config_parameter`."""
    from preftune.pipeline.parameters import config_parameter

    return config_parameter(cfg)


def pipeline_parameters(cfg: "RunConfig") -> dict[str, Any]:
    """The run's parameters: the run config, and nothing else (credentials come from Secrets)."""
    return {"config": default_parameter(cfg)}
