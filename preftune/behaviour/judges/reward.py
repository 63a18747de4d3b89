"""``reward``: the reward model's score against a threshold (above -> one behaviour, below -> another)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from preftune.behaviour.judges.registry import (
    UNKNOWN,
    BuildContext,
    CheckContext,
    Problem,
    StrictSpec,
    check_model_path,
    local_model_path,
    register_judge,
    resolve_judge_path,
)
from preftune.errors import ConfigError, PreftuneError


class RewardJudgeSpec(StrictSpec):
    type: Literal["reward"]
    path: str | None = Field(None, description="Reward-model folder; empty: the run's evaluation.reward_model.")
    threshold: float = 0.0
    margin: float = Field(0.0, ge=0.0, description="Scores within threshold +- margin are 'unknown'.")
    above: str = Field(..., min_length=1, description="Behaviour of responses scoring above the threshold.")
    below: str = Field(..., min_length=1, description="Behaviour of responses scoring below the threshold.")
    normalize: bool = Field(False, description="Compare normalised rewards (train-reward's held-out mean/std).")


class RewardJudge:
    """The reward model's score against a threshold: above -> one behaviour, below -> another."""

    def __init__(self, name: str, spec: RewardJudgeSpec, path: str, device: Any):
        from preftune.scoring.model import RewardScorer

        self.name = name
        self.spec = spec
        try:
            self.scorer = RewardScorer.load(path, device=device)
        except PreftuneError as err:
            raise ConfigError(f"judge {name!r}: {err.message}") from None

    def judge(self, family: str, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        scores = self.scorer.score(list(prompts), list(responses), normalize=self.spec.normalize).tolist()
        out = []
        for r in scores:
            if not math.isfinite(r) or abs(r - self.spec.threshold) < self.spec.margin:
                out.append(UNKNOWN)
            elif r >= self.spec.threshold:
                out.append(self.spec.above)
            else:
                out.append(self.spec.below)
        return out


def _check(jname: str, j: RewardJudgeSpec, ctx: CheckContext) -> list[Problem]:
    out: list[Problem] = []
    path = j.path or ctx.reward_model
    if not path:
        out.append(
            (
                ("judges", jname),
                f"judge {jname!r}: a reward judge needs a path, or evaluation.reward_model in the run config",
            )
        )
    elif check_model_path(path, ctx.base_dir) is None:
        out.append((("judges", jname, "path"), f"judge {jname!r}: reward model path {path!r} does not exist"))
    if j.above == j.below:
        out.append((("judges", jname), f"judge {jname!r}: 'above' and 'below' must be different behaviours"))
    return out


@register_judge("reward", spec=RewardJudgeSpec, labels=lambda s, f, js: {s.above, s.below}, check=_check)
def build_reward(name: str, spec: RewardJudgeSpec, ctx: BuildContext) -> RewardJudge:
    raw = spec.path or ctx.reward_model
    if not raw:
        raise ConfigError(f"{ctx.suite.source}: judge {name!r} needs a path or evaluation.reward_model")
    path = local_model_path(resolve_judge_path(raw, ctx.suite) if spec.path else raw, ctx.storage)
    return RewardJudge(name, spec, path, ctx.device)
