"""The six steps as pipeline steps: one small module each (what the Kubeflow components call).

Each adapter loads the run config (a ``RunConfig`` or the pipeline's ``config`` dict), runs the
step's library function inside :func:`preftune.pipeline.records.step_run` and returns its typed
result (``CollectStepResult``, ``CheckFitStepResult``, ``RewardStepResult``, ``PPOStepResult``,
``EvaluateStepResult``, ``PromoteStepResult``), whose extra fields are the step's ``outputs`` in
MLflow.
"""

from __future__ import annotations

from preftune.pipeline.adapters.check_fit import CheckFitStepResult, check_fit
from preftune.pipeline.adapters.collect import CollectStepResult, collect
from preftune.pipeline.adapters.evaluate import EvaluateStepResult, evaluate
from preftune.pipeline.adapters.ppo import PPOStepResult, ppo
from preftune.pipeline.adapters.promote import PromoteStepResult, promote
from preftune.pipeline.adapters.train_reward import RewardStepResult, train_reward

__all__ = [
    "CheckFitStepResult",
    "CollectStepResult",
    "EvaluateStepResult",
    "PPOStepResult",
    "PromoteStepResult",
    "RewardStepResult",
    "check_fit",
    "collect",
    "evaluate",
    "ppo",
    "promote",
    "train_reward",
]
