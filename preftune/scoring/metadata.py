"""``reward_model.json``: what PPO and evaluate need to know about a published reward model.

The file sits next to the weights so that the folder is self-describing: which base it came
from, which dataset (by content hash) and config trained it, how good it was on held-out
pairs, and the reward mean and std over held-out responses that PPO uses to normalise
rewards. It is deliberately small and dependency-free (no torch) so any step can read it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from preftune.common.metadata import read_metadata_json
from preftune.errors import InputError
from preftune.scoring.text_view import TextView

METADATA_FILE = "reward_model.json"
ARTIFACT_KEY = "reward_model"  # the folder's artifact name in the reward model's MLflow pyfunc (reward.mlflow_model)
FORMAT = "preftune.reward_model"
VERSION = 1


class RewardModelMeta(BaseModel):
    """Contents of ``reward_model.json`` (format ``preftune.reward_model``, version 1)."""

    model_config = ConfigDict(extra="allow")

    format: str = Field(FORMAT, description="Always 'preftune.reward_model'.")
    version: int = Field(VERSION, description="Schema version of this file.")
    base: str = Field(..., description="Model reference the reward model started from (as given in the config).")
    dataset_hash: str = Field(..., description="Content hash of the preference dataset it was trained on.")
    eval_accuracy: float = Field(..., ge=0.0, le=1.0, description="Held-out pairwise accuracy (ties count 1/2).")
    per_family: dict[str, float] = Field(default_factory=dict, description="Held-out accuracy per behaviour family.")
    reward_mean: float = Field(..., description="Mean reward over held-out responses (for PPO normalisation).")
    reward_std: float = Field(..., gt=0.0, description="Std of the reward over held-out responses.")
    config_hash: str = Field(..., description="Hash of the run config that trained it.")
    max_length: int = Field(..., ge=1, description="Tokens scored per prompt+response (longer: left-truncated).")
    mode: str = Field("full", description="'full' or 'lora' (the weights in the folder are merged either way).")
    adapter: str | None = Field(None, description="Sub-folder with the LoRA adapter, when trained with LoRA.")
    pooling: Literal["auto", "last_token", "cls", "mean"] = Field(
        "auto",
        description="How a row's hidden states become the reward (reward.pooling at training time): 'auto' = the "
        "architecture's own classification head; 'last_token', 'cls', 'mean' = that pooling of the last hidden "
        "states, then the head's linear layer. Files without it were all trained with 'auto'.",
    )
    text_view: TextView = Field(
        "full",
        description="Which part of the prompt the model reads (reward.text_view at training time): 'full' = the "
        "whole prompt + the response; 'last_turn' = only the last user turn of a multi-turn prompt + the response. "
        "RewardScorer applies it before rendering. Files without it were all trained with 'full'.",
    )
    created_at: str | None = Field(None, description="ISO 8601 UTC time of publication.")

    @field_validator("reward_mean", "reward_std", "eval_accuracy")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def read_metadata(folder: str | Path) -> RewardModelMeta:
    """Read and validate ``reward_model.json`` from a local reward-model folder."""
    path = Path(folder) / METADATA_FILE
    data = read_metadata_json(
        path,
        fmt=FORMAT,
        version=VERSION,
        missing=f"{path}: not a preftune reward model (no {METADATA_FILE}; train one with `preftune train-reward`)",
        what="reward-model metadata",
    )
    try:
        return RewardModelMeta.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise InputError(f"{path}: {loc}: {first['msg']}") from None
