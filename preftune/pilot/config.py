"""The ``pilot`` section of the run config: the slice, the budget and the red-flag thresholds of a pilot.

A pilot (``preftune pilot``) is a small, fixed-budget rehearsal of a retraining run. Everything it
does not set here comes from the rest of the run config (the same models, prompts, suite and
PPO settings), so that its figures say something about the full run that config describes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from preftune.configbase import Section


class PilotCostSection(Section):
    """What the cost estimate assumes about the full run's hardware."""

    hardware: str = Field(
        "the machine the pilot ran on",
        min_length=1,
        description="Name of the hardware the full run will use (printed with the estimate).",
    )
    speedup: float = Field(
        1.0,
        gt=0.0,
        description="Throughput of that hardware relative to where the pilot ran (e.g. 20 for a GPU node when the "
        "pilot ran on a laptop CPU). Every measured time is divided by it.",
    )
    price_per_hour: float | None = Field(
        None, ge=0.0, description="Price of one hour of that hardware; empty: the estimate gives hours only."
    )
    currency: str = Field("USD", min_length=1, description="Currency of price_per_hour.")


class PilotSection(Section):
    """The pilot: a cheap go / no-go experiment before a team commits to PPO."""

    fraction: float = Field(
        0.2,
        gt=0.0,
        le=1.0,
        description="Share of the prompts (and so of the judgements) the pilot uses, on top of data.prompt_fraction. "
        "Too small a slice leaves families with fewer than fit.min_items multiply-rated items ('needs data').",
    )
    ppo_updates: int = Field(12, ge=1, description="PPO budget of the pilot, in updates.")
    ppo_minutes: float | None = Field(
        None, gt=0.0, description="PPO budget of the pilot, in minutes (stops at whichever budget comes first)."
    )
    ppo_batch_size: int | None = Field(
        32, ge=1, description="Prompts per PPO rollout in the pilot; empty: ppo.batch_size."
    )
    baseline: Literal["champion", "policy"] = Field(
        "policy",
        description="What the pilot's candidate is compared with: 'policy' (models.policy, where the pilot's PPO "
        "starts: measures what PPO moved) or 'champion' (the registry's champion, models.policy when there is "
        "none: whether a short PPO already beats it; reward hacking is then not judged, as the reward curve and "
        "the share change start from different models).",
    )
    trend_window: int = Field(
        3,
        ge=1,
        description="Updates per window of the trend and drift figures: the last window against the one before "
        "(trend) and against the first (drift).",
    )
    trend_flat: float = Field(
        0.1,
        ge=0.0,
        description="A family's mean (normalised) reward changing less than this between the last two windows is "
        "'flat'; more is 'still moving', less than minus this is 'reversing'.",
    )
    reward_near_chance: float = Field(
        0.6,
        ge=0.5,
        le=1.0,
        description="Red flag: reward-model held-out pairwise accuracy (overall or for a family) below this is "
        "near chance (0.5).",
    )
    min_share_gain: float = Field(
        0.0,
        ge=-1.0,
        le=1.0,
        description="'go' needs the lower confidence bound of the preferred-share change (candidate minus baseline) "
        "above this.",
    )
    max_refusal_rise: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Red flag: the needless-refusal share on benign prompts rising by more than this.",
    )
    best_of_n: list[int] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16],
        description="Best-of-n baseline (preftune.ppo.best_of_n): n values at which the starting policy's best of n "
        "responses, picked by the reward model, is measured at its closed-form KL log n - (n-1)/n; the report says "
        "whether the pilot's PPO policy beats it at the KL it spends. Empty: not measured.",
    )
    best_of_n_prompts: int = Field(
        32, ge=1, description="Best-of-n baseline: PPO prompts it is measured on (a seeded sample)."
    )
    best_of_n_policy_samples: int = Field(
        4, ge=1, description="Best-of-n baseline: responses per prompt of the trained policy (its reward and KL)."
    )
    cost: PilotCostSection = Field(default_factory=PilotCostSection)

    @field_validator("best_of_n")
    @classmethod
    def _positive_ns(cls, ns: list[int]) -> list[int]:
        if any(n < 1 for n in ns):
            raise ValueError(f"best_of_n values must be at least 1, got {ns}")
        return sorted(set(ns))
