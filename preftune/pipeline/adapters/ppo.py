"""ppo as a pipeline step: train the policy against the reward model, in this pod or in a TrainJob.

Both ways give one :class:`PPOStepResult`, built by :meth:`PPOStepResult.from_run` from the first
and last update's metrics: the derived figures (reward before/after and its gain, KL within the
budget) are computed there and nowhere else in the pipeline layer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from preftune.pipeline.parameters import load
from preftune.pipeline.records import OMIT_NONE, StepResult, finite_metrics, step_run

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import RunConfig

REWARD = "ppo/reward_mean"


@dataclass(kw_only=True)
class PPOStepResult(StepResult):
    """The trained policy's figures; the TrainJob fields only when ``kubernetes.trainer.enabled``."""

    updates: int
    resumed_from: int | None
    kl: float
    """KL to the reference at the last update (nats per response)."""
    kl_budget: float
    kl_within_budget: bool
    reward_gain: float
    reward_first: float | None
    reward_final: float | None
    policy_dir: str
    input_dataset_hash: str
    trainjob: str | None = field(default=None, metadata=OMIT_NONE)
    trainjob_namespace: str | None = field(default=None, metadata=OMIT_NONE)
    policy_uri: str | None = field(default=None, metadata=OMIT_NONE)

    @classmethod
    def from_run(
        cls,
        *,
        first: Mapping[str, float],
        final: Mapping[str, float],
        kl: float,
        kl_budget: float,
        kl_within_budget: bool,
        **fields: Any,
    ) -> PPOStepResult:
        """The result from the first and last update's metrics (the derived figures, once)."""
        return cls(
            kl=kl,
            kl_budget=kl_budget,
            kl_within_budget=kl_within_budget,
            reward_first=first.get(REWARD),
            reward_final=final.get(REWARD),
            reward_gain=float(final.get(REWARD, 0.0) - first.get(REWARD, 0.0)),
            metrics=finite_metrics({k.replace("/", "."): v for k, v in final.items()}),
            **fields,
        )

    def to_markdown(self, trainer_nodes: int) -> str:
        where = (
            f" in TrainJob {self.trainjob_namespace}/{self.trainjob} ({trainer_nodes} nodes)" if self.trainjob else ""
        )
        nan = float("nan")
        first = nan if self.reward_first is None else self.reward_first
        final = nan if self.reward_final is None else self.reward_final
        return (
            "# ppo\n\n"
            f"{self.updates} updates{where}; mean reward {first:.3f} -> {final:.3f}; KL to the reference "
            f"{self.kl:.3f} nats (budget {self.kl_budget:.1f}: {'within' if self.kl_within_budget else 'OVER'}).\n"
        )


def ppo(
    config: Mapping[str, Any] | RunConfig,
    reward_model: str,
    output: str,
    *,
    snapshot: str,
    dataset_hash: str,
    dataset: str | None = None,
    started_at: float | None = None,
    trainer_api: Any = None,
) -> PPOStepResult:
    """ppo: train the policy against the reward model; publishes the policy at ``output``.

    Checkpoints go to ``ppo.checkpoint_dir``, else (when ``storage.root`` is set) to
    ``<storage.root>/checkpoints/<run name>/<pipeline run id>/ppo`` so that a retried task, in a
    new pod, resumes where the evicted one stopped; else next to the output.

    With ``kubernetes.trainer.enabled`` the training runs in a Kubeflow Trainer TrainJob instead
    of this process (:mod:`preftune.kube.handoff`; ``trainer_api`` stands in for the Kubernetes
    API in tests); the result is the same, plus the TrainJob's name, namespace and policy URI.

    ``dataset`` (check-fit's fit dataset) holds the raters' written answers that ``ppo.demonstration_coef``
    trains on; a TrainJob does not receive them yet (a config error when the term is on).
    """
    from preftune.storage import Storage

    cfg = load(config)
    with step_run("ppo", cfg, snapshot, started_at) as run:
        if not cfg.ppo.checkpoint_dir and cfg.storage.root:
            cfg = cfg.model_copy(deep=True)
            cfg.ppo.checkpoint_dir = Storage.join(
                cfg.storage.root, "checkpoints", cfg.run.name, run.pipeline_run_id, "ppo"
            )
        common = {"policy_dir": output, "input_dataset_hash": dataset_hash}
        if cfg.kubernetes.trainer.enabled:
            from preftune.kube.handoff import check_supported

            check_supported(cfg)  # before anything is submitted
            res = _ppo_in_trainjob(cfg, reward_model, output, run.pipeline_run_id, trainer_api, common)
        else:
            res = _ppo_in_process(cfg, reward_model, output, run.pipeline_run_id, common, dataset)
        res.report_md = res.to_markdown(cfg.kubernetes.trainer.nodes)
        run.finish(res)
    return res


def _ppo_in_process(
    cfg: RunConfig,
    reward_model: str,
    output: str,
    pipeline_run_id: str,
    common: dict[str, Any],
    dataset: str | None = None,
) -> PPOStepResult:
    """PPO in this pod (torchrun inside it for several GPUs)."""
    from preftune.ppo.step import run_ppo

    res = run_ppo(cfg, reward_model, output, pipeline_run_id=pipeline_run_id, dataset=dataset)
    return PPOStepResult.from_run(
        first=res.first,
        final=res.final,
        kl=res.kl,
        kl_budget=res.kl_budget,
        kl_within_budget=res.kl_within_budget,
        updates=res.updates,
        resumed_from=res.resumed_from,
        mlflow_run_id=res.mlflow_run_id,
        **common,
    )


def _ppo_in_trainjob(
    cfg: RunConfig, reward_model: str, output: str, pipeline_run_id: str, api: Any, common: dict[str, Any]
) -> PPOStepResult:
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
    meta, final = res.metadata, res.final
    kl = float(meta.get("kl", final.get("ppo/kl", 0.0)))
    return PPOStepResult.from_run(
        first=res.first,
        final=final,
        kl=kl,
        kl_budget=float(meta.get("kl_budget", cfg.ppo.kl_budget)),
        kl_within_budget=bool(meta.get("kl_within_budget", kl <= cfg.ppo.kl_budget)),
        updates=int(meta.get("updates", len(res.history))),
        resumed_from=meta.get("resumed_from"),
        mlflow_run_id=meta.get("mlflow_run_id"),
        trainjob=res.trainjob,
        trainjob_namespace=res.namespace,
        policy_uri=res.policy_uri,
        **common,
    )
