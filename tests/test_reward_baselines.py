"""The trivial baselines of the reward gate, on constructed data with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from preftune.reward.data import PreferencePair
from preftune.scoring.baselines import (
    as_triples,
    bag_of_words_accuracy,
    bag_of_words_correct,
    length_bias,
    length_rule_accuracy,
    length_rule_correct,
)


def _pairs_longer_chosen(n: int) -> list[tuple[str, str, str]]:
    return [(f"question {i}?", f"a long and careful answer number {i} " * 3, f"no {i}") for i in range(n)]


def test_chosen_always_longer_gives_bias_and_rule_accuracy_one() -> None:
    pairs = _pairs_longer_chosen(20)
    assert length_bias(pairs) == 1.0
    assert length_rule_accuracy(pairs) == 1.0


def test_length_rule_direction_is_fitted_on_train_pairs() -> None:
    shorter_wins = [(p, r, c) for p, c, r in _pairs_longer_chosen(20)]
    assert length_bias(shorter_wins) == 0.0
    assert length_rule_accuracy(shorter_wins) == 0.0  # "longer wins" as stated
    assert length_rule_accuracy(shorter_wins, train_pairs=shorter_wins[:10]) == 1.0


def test_equal_lengths_count_one_half() -> None:
    pairs = [("p", "abc", "xyz"), ("q", "abcd", "x")]
    assert list(length_rule_correct(pairs)) == [0.5, 1.0]
    assert length_rule_accuracy([]) != length_rule_accuracy([])  # NaN for no pairs


def test_accepts_pair_objects_mappings_and_tuples() -> None:
    obj = PreferencePair(pair_id="1", prompt_id="p", family="f", prompt="p", chosen="long answer", rejected="no")
    rec = {"prompt": "p", "chosen": "long answer", "rejected": "no"}
    assert as_triples([obj, rec, ("p", "long answer", "no")]) == [("p", "long answer", "no")] * 3
    with pytest.raises(ValueError, match="pair 0"):
        as_triples([("p", "only two")])
    with pytest.raises(ValueError, match="pair 1"):
        as_triples([rec, {"prompt": "p", "chosen": 3, "rejected": "x"}])


def _keyword_world(n: int, seed: int) -> list[tuple[str, str, str]]:
    """Chosen answers say 'sorry' (same length as the rejected ones): only words tell them apart."""
    rng = np.random.default_rng(seed)
    filler = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    out = []
    for i in range(n):
        words = list(rng.choice(filler, size=6))
        good = " ".join(words[:3] + ["sorry"] + words[3:5])
        bad = " ".join(words[:3] + ["sure!"] + words[3:5])
        out.append((f"prompt {i}", good, bad))
    return out


def test_bag_of_words_learns_a_keyword_and_length_rule_does_not() -> None:
    pairs = _keyword_world(120, seed=1)
    train, held = pairs[:80], pairs[80:]
    assert bag_of_words_accuracy(train, held, seed=0) == 1.0
    assert length_rule_accuracy(held, train) < 0.8  # the lengths carry almost no signal here


def test_bag_of_words_is_chance_on_label_noise_and_deterministic() -> None:
    rng = np.random.default_rng(3)
    pairs = _keyword_world(200, seed=2)
    noisy = [(p, c, r) if rng.random() < 0.5 else (p, r, c) for p, c, r in pairs]
    a = bag_of_words_correct(noisy[:150], noisy[150:], seed=5)
    b = bag_of_words_correct(noisy[:150], noisy[150:], seed=5)
    assert np.array_equal(a, b)
    assert 0.2 < a.mean() < 0.8


def test_bag_of_words_degenerate_inputs() -> None:
    held = _keyword_world(4, seed=0)
    assert list(bag_of_words_correct([], held)) == [0.5] * 4
    assert bag_of_words_correct(held, []).size == 0
