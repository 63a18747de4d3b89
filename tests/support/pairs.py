"""Constructed single-rated preference pairs (one judgement per item, no rater): the shape of an imported public set."""

from __future__ import annotations

from collections.abc import Callable

from preftune.data.records import Pair, short_hash


def single_rated_pairs(
    family: str,
    n: int,
    prompt: Callable[[int], str],
    chosen: Callable[[int], str],
    rejected: Callable[[int], str],
) -> list[Pair]:
    """``n`` pairs of ``family``, the i-th built from ``prompt(i)``, ``chosen(i)`` and ``rejected(i)``."""
    out = []
    for i in range(n):
        text, good, bad = prompt(i), chosen(i), rejected(i)
        out.append(
            Pair(
                pair_id=f"{family}-{i}",
                item_id=short_hash(text, sorted([good, bad])),
                prompt_id=f"{family}-q{i}",
                family=family,
                tags=[],
                prompt=text,
                chosen=good,
                rejected=bad,
                weight=1.0,
                source="hh",
                rater_id=None,
                created_at=None,
            )
        )
    return out
