"""The pairwise (Bradley-Terry) reward model: training step, scorer and metadata.

Public API (imported lazily: ``import preftune.reward`` does not import torch):

- :func:`train_reward` (``preftune.reward.step``): the train-reward step.
- :class:`RewardScorer` (``preftune.reward.model``): load a published reward model and score
  prompt/response pairs (what PPO uses).
- :class:`RewardModelMeta`, :func:`read_metadata` (``preftune.reward.metadata``): ``reward_model.json``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from preftune.reward.metadata import RewardModelMeta, read_metadata
    from preftune.reward.model import RewardScorer
    from preftune.reward.step import RewardResult, train_reward

__all__ = ["RewardModelMeta", "RewardResult", "RewardScorer", "read_metadata", "train_reward"]

_WHERE = {
    "RewardModelMeta": "preftune.reward.metadata",
    "read_metadata": "preftune.reward.metadata",
    "RewardScorer": "preftune.reward.model",
    "RewardResult": "preftune.reward.step",
    "train_reward": "preftune.reward.step",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'preftune.reward' has no attribute {name!r}")
