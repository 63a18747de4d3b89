"""The pairwise (Bradley-Terry) reward model: the train-reward step.

Public API (imported lazily: ``import preftune.reward`` does not import torch):

- :func:`train_reward` (``preftune.reward.step``): the train-reward step.

Scoring with a published reward model (``RewardScorer``), its ``reward_model.json`` and the trivial
baselines live in the shared package :mod:`preftune.scoring`, which ppo, evaluate and check-fit read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from preftune.reward.step import RewardResult, train_reward

__all__ = ["RewardResult", "train_reward"]

_WHERE = {
    "RewardResult": "preftune.reward.step",
    "train_reward": "preftune.reward.step",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'preftune.reward' has no attribute {name!r}")
