"""The ``preference-pilot`` pipeline: the retraining pipeline's components on a slice, then a go / no-go report.

Same graph as ``preference-retraining`` up to evaluate (:func:`preftune.pipelines.graph.add_shared_steps`),
run with the pilot's config (:func:`preftune.pilot.run.pilot_config`: a slice of the prompts, a
short PPO, no reward gate), plus one thin ``pilot-report`` task that calls :func:`preftune.pilot.run.build_report`.
Nothing is promoted. Shape::

    exit handler [close-run]
    └─ [open-run] -> [collect] -> [check-fit]
       if fit:
         [train-reward] -> [ppo] -> [evaluate] (candidate vs champion or base policy)
         [pilot-report] (pilot.json/.md/.html as kfp artifacts and in MLflow)

Two parameters: ``config``, the pilot's step config, and ``full_config``, the user's run config
(the full run the report's cost estimate is about); both are compiled from one run config.

(No ``from __future__ import annotations``: kfp reads the pipeline function's real annotations.)
"""

from typing import TYPE_CHECKING, Any

from preftune.pipelines.retraining import Target, apply_kubernetes, default_parameter

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import RunConfig

PIPELINE_NAME = "preference-pilot"
PIPELINE_DESCRIPTION = (
    "preftune pilot: the retraining steps on a slice of the data with a short PPO, then a one-page go / no-go "
    "report per behaviour family with red flags and the cost of the full run. Nothing is promoted."
)
RESOURCES = {"pilot-report": "close-run"}
"""Tasks without their own ``kubernetes.steps`` entry take the resources of a light task."""


def build_pilot_pipeline(cfg: "RunConfig | None" = None, *, target: Target = "cluster") -> Any:
    """The ``preference-pilot`` pipeline for ``cfg`` (default: the default run config)."""
    from kfp import dsl
    from preftune.components import retraining as c
    from preftune.pipelines.graph import SharedTasks, add_shared_steps

    from preftune.config import RunConfig
    from preftune.pilot.run import pilot_config

    cfg = cfg or RunConfig()
    pcfg = pilot_config(cfg)
    k = pcfg.kubernetes
    step_config = default_parameter(pcfg)
    full_config_default = default_parameter(cfg)
    kubernetes_hash = k.platform_hash()
    caching = bool(k.caching)

    def setup(task: Any, name: str, *, cache: bool) -> Any:
        task.set_caching_options(enable_caching=cache)
        if target == "cluster":
            apply_kubernetes(task, RESOURCES.get(name, name), k)
        return task

    # kubernetes.pipeline_root is baked in (defaultPipelineRoot); the local runner keeps its own folder.
    root = k.pipeline_root if target == "cluster" else None

    @dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION, pipeline_root=root)
    def preference_pilot(config: dict = step_config, full_config: dict = full_config_default):  # noqa: B006
        def report(t: SharedTasks) -> None:
            setup(
                c.pilot_report(
                    full_config=full_config,
                    fit_dataset=t.fit.outputs["fit_dataset"],
                    reward_model=t.reward_model,
                    policy=t.policy,
                    evaluation=t.evaluated.outputs["evaluation"],
                ),
                "pilot-report",
                cache=False,
            )

        # the pilot's config has no reward gate (min_accuracy 0): the report judges the reward model
        add_shared_steps(
            config,
            setup,
            kubernetes_hash=kubernetes_hash,
            caching=caching,
            exit_group="pilot",
            reward_gate=False,
            then=report,
        )

    return preference_pilot


def compile_pilot_pipeline(cfg: "RunConfig | None", package_path: str) -> str:
    """Compile the cluster ``preference-pilot`` pipeline for ``cfg`` to ``package_path`` (YAML)."""
    from kfp import compiler

    compiler.Compiler().compile(build_pilot_pipeline(cfg, target="cluster"), package_path=str(package_path))
    return str(package_path)
