"""Drift measures shared by the PPO run's guards and the pilot's red flags (no torch at import).

The field's three quiet failure modes of a PPO run, each measured from the per-update history:

- **length drift**: the mean response length moves far from where it started (a reward model
  that likes long or short answers is being exploited);
- **repetition drift**: the share of repeated n-grams inside responses rises (degenerate loops
  that a reward model scores well);
- **reward-up, eval-flat divergence**: the reward keeps rising while an independent judge of the
  same behaviour does not follow (reward hacking).

Every measure compares the mean of the *first* ``window`` updates with the mean of the *last*
``window`` updates, so one noisy batch neither raises nor hides a flag.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def window_means(values: Sequence[float | None], window: int) -> tuple[float, float] | None:
    """(mean of the first ``window`` values, mean of the last ``window``); None with fewer than 2 windows."""
    xs = _finite(values)
    if window < 1 or len(xs) < 2 * window:
        return None
    return sum(xs[:window]) / window, sum(xs[-window:]) / window


def change(values: Sequence[float | None], window: int) -> float | None:
    """Last window's mean minus the first window's mean (None: too few updates to tell)."""
    w = window_means(values, window)
    return None if w is None else w[1] - w[0]


def relative_change(values: Sequence[float | None], window: int) -> float | None:
    """:func:`change` as a share of the first window's mean (None when that mean is 0)."""
    w = window_means(values, window)
    if w is None or w[0] == 0:
        return None
    return (w[1] - w[0]) / abs(w[0])


def repetition_rate(token_rows: Sequence[Sequence[int]], n: int) -> float:
    """Share of a response's n-grams that repeat an earlier n-gram of the same response, averaged over rows.

    0 for varied text, towards 1 for a loop ("the the the ..."). Rows shorter than ``n + 1`` tokens
    count as 0 (nothing can repeat).
    """
    rates = []
    for row in token_rows:
        grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
        rates.append(1.0 - len(set(grams)) / len(grams) if len(grams) > 1 else 0.0)
    return sum(rates) / len(rates) if rates else 0.0


def length_drift(lengths: Sequence[float | None], window: int, limit: float) -> str | None:
    """A one-line problem when the mean response length changed by more than ``limit`` (relative)."""
    rel = relative_change(lengths, window)
    if rel is None or abs(rel) <= limit:
        return None
    w = window_means(lengths, window)
    assert w is not None
    return (
        f"mean response length drifted {rel:+.0%} ({w[0]:.1f} -> {w[1]:.1f} tokens, limit {limit:.0%}): the reward "
        "model may be rewarding length rather than behaviour"
    )


def repetition_drift(rates: Sequence[float | None], window: int, limit: float) -> str | None:
    """A one-line problem when the repeated n-gram share rose by more than ``limit`` (absolute)."""
    d = change(rates, window)
    if d is None or d <= limit:
        return None
    w = window_means(rates, window)
    assert w is not None
    return (
        f"repeated n-gram share rose {d:+.2f} ({w[0]:.2f} -> {w[1]:.2f}, limit {limit:.2f}): responses are "
        "degenerating into loops the reward model scores well"
    )


def reward_divergence(
    rewards: Sequence[float | None],
    judged: Sequence[float | None],
    window: int,
    min_reward_rise: float,
    min_judged_rise: float,
) -> str | None:
    """A one-line problem when the reward rose by at least ``min_reward_rise`` while the judged share did not
    rise by ``min_judged_rise`` (reward hacking)."""
    dr, dj = change(rewards, window), change(judged, window)
    if dr is None or dj is None or dr < min_reward_rise or dj >= min_judged_rise:
        return None
    return (
        f"reward rose {dr:+.2f} while the independently judged preferred share moved {dj:+.2f} (needs "
        f"+{min_judged_rise:.2f}): the policy is learning what the reward model likes, not the behaviour (reward "
        "hacking)"
    )
