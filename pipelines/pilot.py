"""The ``preference-pilot`` pipeline: the retraining pipeline's components on a slice, then a go / no-go report.

Same components as ``preference-retraining`` (:mod:`preftune.components.retraining`), run with the
pilot's config (:func:`preftune.pilot.run.pilot_config`: a slice of the prompts, a short PPO, no
reward gate), plus one thin ``pilot-report`` task that calls :func:`preftune.pilot.run.build_report`.
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

    @dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)
    def preference_pilot(config: dict = step_config, full_config: dict = full_config_default):  # noqa: B006
        finish = setup(
            c.close_run(config=config, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER), "close-run", cache=False
        )
        with dsl.ExitHandler(finish, name="pilot"):
            start = setup(
                c.open_run(
                    config=config, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, kubernetes_hash=kubernetes_hash
                ),
                "open-run",
                cache=False,
            )
            snapshot = start.outputs["Output"]
            collected = setup(c.collect(config=config, snapshot=snapshot), "collect", cache=caching)
            fit = setup(
                c.check_fit(
                    config=config,
                    snapshot=snapshot,
                    dataset=collected.outputs["dataset"],
                    dataset_hash=collected.outputs["Output"],
                ),
                "check-fit",
                cache=caching,
            )
            fit_hash = fit.outputs["fit_dataset_hash"]
            with dsl.If(fit.outputs["Output"] == True, name="fit-for-ppo"):  # noqa: E712 - a kfp condition
                # the pilot's config has no reward gate (min_accuracy 0): the report judges the reward model
                reward = setup(
                    c.train_reward(
                        config=config, snapshot=snapshot, dataset=fit.outputs["fit_dataset"], dataset_hash=fit_hash
                    ),
                    "train-reward",
                    cache=caching,
                )
                trained = setup(
                    c.ppo(
                        config=config,
                        snapshot=snapshot,
                        dataset_hash=fit_hash,
                        reward_model=reward.outputs["reward_model"],
                    ),
                    "ppo",
                    cache=caching,
                )
                evaluated = setup(
                    c.evaluate(
                        config=config,
                        dataset_hash=fit_hash,
                        policy=trained.outputs["policy"],
                        reward_model=reward.outputs["reward_model"],
                    ),
                    "evaluate",
                    cache=False,
                )
                setup(
                    c.pilot_report(
                        full_config=full_config,
                        fit_dataset=fit.outputs["fit_dataset"],
                        reward_model=reward.outputs["reward_model"],
                        policy=trained.outputs["policy"],
                        evaluation=evaluated.outputs["evaluation"],
                    ),
                    "pilot-report",
                    cache=False,
                )

    return preference_pilot


def compile_pilot_pipeline(cfg: "RunConfig | None", package_path: str) -> str:
    """Compile the cluster ``preference-pilot`` pipeline for ``cfg`` to ``package_path`` (YAML)."""
    from kfp import compiler

    compiler.Compiler().compile(build_pilot_pipeline(cfg, target="cluster"), package_path=str(package_path))
    return str(package_path)
