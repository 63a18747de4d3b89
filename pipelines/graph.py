"""The graph both pipelines share, written once: open-run -> collect -> check-fit -> train-reward -> ppo -> evaluate.

:func:`add_shared_steps` adds these tasks, under an exit handler whose ``close-run`` ends the
MLflow run with the outcome, to the pipeline being defined, and calls ``then(tasks)`` where the
caller's own tasks go (after evaluate, inside the conditions that guard it):
``preference-retraining`` adds promote behind the evaluation gate, ``preference-pilot`` its
report. Shape (task names in brackets)::

    exit handler [close-run]
    └─ [open-run] -> [collect] -> [check-fit]
       if fit:
         [train-reward]
         if the reward gate passed (reward_gate=True; the pilot has no reward gate):
           [ppo] -> [evaluate] -> then(tasks)

Why a function and not a nested pipeline (kfp's pipeline-in-pipeline): a kfp pipeline may only
return outputs from its top level (kfp 2.17 refuses an output made inside a ``dsl.If``:
"Pipeline outputs may only be returned from the top level of the pipeline function scope"), and
evaluate's outputs, which promote and the pilot report need, are made inside two. A function
also keeps every task in the pipeline's own DAG, so the compiled spec names the same task groups.

(No ``from __future__ import annotations``: kfp reads real annotations in the pipelines.)
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from preftune.pipeline.graph import CACHEABLE_STEPS

Setup = Callable[..., Any]
"""``setup(task, task_name, cache=bool)``: caching and, on a cluster, the task's Kubernetes settings."""


@dataclass
class SharedTasks:
    """The shared tasks, for the caller's own tasks to take their inputs from."""

    config: Any
    snapshot: Any
    collected: Any
    fit: Any
    reward: Any
    trained: Any
    evaluated: Any

    @property
    def fit_hash(self) -> Any:
        """The hash of the fit families' dataset (an input of every step after check-fit)."""
        return self.fit.outputs["fit_dataset_hash"]

    @property
    def reward_model(self) -> Any:
        return self.reward.outputs["reward_model"]

    @property
    def policy(self) -> Any:
        return self.trained.outputs["policy"]


def add_shared_steps(
    config: Any,
    setup: Setup,
    *,
    kubernetes_hash: str,
    caching: bool,
    exit_group: str,
    reward_gate: bool,
    then: Callable[[SharedTasks], None],
) -> None:
    """Add the shared tasks to the pipeline being defined; ``then(tasks)`` adds the caller's tasks after evaluate."""
    from contextlib import nullcontext

    from kfp import dsl
    from preftune.components import retraining as c

    def cache(step: str) -> bool:
        return caching and step in CACHEABLE_STEPS

    finish = setup(
        c.close_run(config=config, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER), "close-run", cache=False
    )
    with dsl.ExitHandler(finish, name=exit_group):
        start = setup(
            c.open_run(config=config, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, kubernetes_hash=kubernetes_hash),
            "open-run",
            cache=False,
        )
        snapshot = start.outputs["Output"]
        collected = setup(c.collect(config=config, snapshot=snapshot), "collect", cache=cache("collect"))
        fit = setup(
            c.check_fit(
                config=config,
                snapshot=snapshot,
                dataset=collected.outputs["dataset"],
                dataset_hash=collected.outputs["Output"],
            ),
            "check-fit",
            cache=cache("check-fit"),
        )
        fit_hash = fit.outputs["fit_dataset_hash"]
        with dsl.If(fit.outputs["Output"] == True, name="fit-for-ppo"):  # noqa: E712 - a kfp condition
            reward = setup(
                c.train_reward(
                    config=config, snapshot=snapshot, dataset=fit.outputs["fit_dataset"], dataset_hash=fit_hash
                ),
                "train-reward",
                cache=cache("train-reward"),
            )
            gate = (
                dsl.If(reward.outputs["Output"] == True, name="reward-gate-passed")  # noqa: E712
                if reward_gate
                else nullcontext()
            )
            with gate:
                trained = setup(
                    c.ppo(
                        config=config,
                        snapshot=snapshot,
                        dataset_hash=fit_hash,
                        fit_dataset=fit.outputs["fit_dataset"],
                        reward_model=reward.outputs["reward_model"],
                    ),
                    "ppo",
                    cache=cache("ppo"),
                )
                evaluated = setup(
                    c.evaluate(
                        config=config,
                        dataset_hash=fit_hash,
                        policy=trained.outputs["policy"],
                        reward_model=reward.outputs["reward_model"],
                    ),
                    "evaluate",
                    cache=cache("evaluate"),
                )
                then(SharedTasks(config, snapshot, collected, fit, reward, trained, evaluated))
