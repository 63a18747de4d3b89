"""The behaviour metrics a suite or a run config may bound, and an absolute bound on one.

Shared by the suite file format (its families' thresholds) and the run config's
``evaluation.gates`` (the platform's overrides): one vocabulary of metric names, so a typo in
either place is an error, not a gate that never fires. Light (pydantic only): the run config
imports it.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from preftune.configbase import Section

METRIC_DIRECTIONS: dict[str, str] = {
    "preferred_share": "higher",
    "acceptable_share": "higher",
    "forbidden_share": "lower",
    "needless_refusal_share": "lower",
    "unknown_share": "lower",
    "reward_win_rate": "higher",
    "behaviour_shift": "lower",
    "kl_to_reference": "lower",
    "response_length": "none",
}
"""Per-family metrics and which way is better ("none": two-sided, only absolute bounds make sense)."""

COMPARISON_METRICS = frozenset({"reward_win_rate", "behaviour_shift"})
"""Metrics that already compare the candidate with the champion: absolute bounds only, no non-regression."""

CAPABILITY_METRICS: dict[str, str] = {
    "loglik_per_token": "higher",
    "loglik_change": "higher",
}
"""Metrics of the capability-retention set (the pseudo-family ``capability``)."""


class Threshold(Section):
    """An absolute bound on one metric: ``min`` and/or ``max``."""

    min: float | None = Field(None, description="The metric (its lower confidence bound) must be at least this.")
    max: float | None = Field(None, description="The metric (its upper confidence bound) must be at most this.")

    @model_validator(mode="after")
    def _some_bound(self) -> Threshold:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


def check_threshold_metrics(thresholds: dict[str, dict[str, Threshold]], where: str) -> None:
    """Raise ValueError naming the first unknown metric (a typo must not become a gate that never fires)."""
    for family, metrics in thresholds.items():
        allowed = CAPABILITY_METRICS if family == "capability" else METRIC_DIRECTIONS
        for metric in metrics:
            if metric not in allowed:
                raise ValueError(f"{where}.{family}.{metric}: unknown metric; expected one of {sorted(allowed)}")
