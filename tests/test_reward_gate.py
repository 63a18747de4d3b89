"""The calibrated reward gate: baselines with a paired bootstrap bound, the agreement ceiling, the optional floor."""

from __future__ import annotations

import numpy as np
import pytest

from preftune.config import parse_config
from preftune.reward.data import PreferencePair
from preftune.reward.gate import ceilings_from_fit_report, evaluate_gate, lift_lower_bound


def _pairs(n: int, family: str = "f", chosen_longer: bool = True, start: int = 0) -> list[PreferencePair]:
    """Chosen answers say 'please' and are longer (or shorter): both baselines can learn these."""
    out = []
    for i in range(start, start + n):
        good, bad = f"please consider option {i} with care and detail", f"no {i}"
        if not chosen_longer:
            good, bad = f"please {i}", f"no no no never option {i} at all"
        out.append(PreferencePair(f"p{i}", f"q{i}", family, f"question {i}?", good, bad))
    return out


def _gate(**kw):
    return parse_config({"reward": {"gate": kw}}).reward.gate


def test_a_model_no_better_than_the_length_rule_fails_and_the_reason_names_the_figures() -> None:
    train, held = _pairs(60), _pairs(40, start=100)
    rng = np.random.default_rng(0)
    credit = (rng.random(40) < 0.8).astype(float)  # 0.8 < length rule 1.0
    v = evaluate_gate(accuracy_per_pair=credit, train_pairs=train, eval_pairs=held, gate=_gate(baselines=["length"]))
    assert not v.passed and v.baselines == {"length": 1.0} and v.best_baseline == "length"
    # the baseline already reaches the ceiling 1.0: no headroom, so 85% of that ceiling is the bar; 0.8 is below
    assert v.rule == "no headroom" and v.accuracy < 0.85 and "must instead reach 85% of that ceiling" in v.reason
    assert "length rule 1.000" in v.reason and f"{v.accuracy:.3f}" in v.reason and "FAILED" in v.reason
    assert "agreement not measured" in v.reason


def test_beating_the_baselines_with_a_clear_bound_passes() -> None:
    # labels the baselines cannot see: chosen and rejected alternate in length and share every word
    train, held = [], []
    for i in range(200):
        a, b = f"alpha beta {i}", f"beta alpha {i} x"
        p = PreferencePair(f"p{i}", f"q{i}", "f", "q", *((a, b) if i % 2 else (b, a)))
        (train if i < 100 else held).append(p)
    credit = np.ones(100)
    credit[:10] = 0.0  # 0.9 accuracy
    v = evaluate_gate(accuracy_per_pair=credit, train_pairs=train, eval_pairs=held, gate=_gate(), seed=1)
    assert v.baselines["length"] == pytest.approx(0.5, abs=0.01) and v.baselines["bag_of_words"] < 0.7
    assert v.rule == "superiority" and v.lift_lower > 0.1 and v.passed, v.reason
    assert "baseline ok" in v.reason and v.metrics()["reward.gate_passed"] == 1.0
    assert set(v.metrics()) >= {"reward.gate.lift", "reward.gate.lift_lower", "reward.baseline.length"}


def test_lower_bound_is_paired_and_clustered_by_prompt() -> None:
    model = np.array([1.0, 1.0, 0.0, 0.0] * 25)
    base = np.array([0.0, 0.0, 1.0, 1.0] * 25)
    # pairs 2k and 2k+1 share a prompt: clusters of two identical results
    groups = [f"g{i // 2}" for i in range(100)]
    lo = lift_lower_bound(model, {"b": base}, groups, confidence=0.95, resamples=2000, seed=0)
    lo_pairs = lift_lower_bound(
        model, {"b": base}, [str(i) for i in range(100)], confidence=0.95, resamples=2000, seed=0
    )
    assert lo < 0 and lo < lo_pairs  # clustering widens the interval
    same = lift_lower_bound(base, {"b": base}, groups, confidence=0.95, resamples=500, seed=0)
    assert same == 0.0  # paired: identical per-pair results give a lift of exactly 0 in every resample


def test_the_ceiling_from_an_audit_or_repeated_ratings() -> None:
    report = {
        "families": {
            "a": {"verdict": "fit", "agreement": {"pairwise": 0.9}, "audit": None},
            "b": {"verdict": "fit", "agreement": {"pairwise": 0.7}, "audit": {"match_share": 0.66}},
            "c": {"verdict": "not measured", "agreement": {"pairwise": 1.0}, "audit": None},
            "d": {"verdict": "unaudited", "agreement": None, "audit": None},
        }
    }
    c = ceilings_from_fit_report(report)
    assert {k: (x.value, x.source) for k, x in c.items()} == {"a": (0.9, "repeated ratings"), "b": (0.66, "audit")}
    assert ceilings_from_fit_report(None) == {} and ceilings_from_fit_report({"families": {"x": 3}}) == {}


def test_reaching_a_share_of_the_ceiling_is_required_where_agreement_was_measured() -> None:
    train = _pairs(40, family="a") + _pairs(40, family="b", start=40)
    held = _pairs(20, family="a", start=100) + _pairs(20, family="b", start=200)
    credit = np.array([1.0] * 20 + [1.0] * 10 + [0.0] * 10)  # a: 1.0, b: 0.5
    report = {"families": {"b": {"verdict": "fit", "agreement": {"pairwise": 0.8}}}}
    v = evaluate_gate(
        accuracy_per_pair=credit, train_pairs=train, eval_pairs=held, gate=_gate(baselines=[]), fit_report=report
    )
    assert v.ceiling == pytest.approx(0.8) and v.ceiling_accuracy == 0.5 and v.ceiling_share == pytest.approx(0.625)
    assert not v.passed and "ceiling FAILED" in v.reason and "0.800 (repeated ratings)" in v.reason
    ok = evaluate_gate(
        accuracy_per_pair=credit,
        train_pairs=train,
        eval_pairs=held,
        gate=_gate(baselines=[], min_ceiling_share=0.6),
        fit_report=report,
    )
    assert ok.passed and "of their agreement ceiling 0.800" in ok.reason


def test_the_floor_is_optional_and_a_disabled_gate_still_measures() -> None:
    train, held = _pairs(30), _pairs(30, start=50)
    credit = np.ones(30)
    v = evaluate_gate(accuracy_per_pair=credit, train_pairs=train, eval_pairs=held, gate=_gate(), min_accuracy=0.0)
    assert v.passed and not any(c.name == "floor" for c in v.checks)  # matches a perfect baseline: no headroom
    v = evaluate_gate(accuracy_per_pair=credit * 0.5, train_pairs=train, eval_pairs=held, gate=_gate(enabled=False))
    assert not v.passed and not v.enforced and v.baselines["length"] == 1.0
    v = evaluate_gate(
        accuracy_per_pair=credit, train_pairs=train, eval_pairs=held, gate=_gate(baselines=[]), min_accuracy=0.99
    )
    assert v.passed and "reward.min_accuracy floor 0.990" in v.reason
    with pytest.raises(ValueError, match="3 per-pair results for 30"):
        evaluate_gate(accuracy_per_pair=np.ones(3), train_pairs=train, eval_pairs=held, gate=_gate())


def test_shorter_answers_winning_is_a_baseline_too() -> None:
    train, held = _pairs(50, chosen_longer=False), _pairs(30, chosen_longer=False, start=60)
    v = evaluate_gate(
        accuracy_per_pair=np.ones(30), train_pairs=train, eval_pairs=held, gate=_gate(baselines=["length"])
    )
    assert v.baselines["length"] == 1.0  # direction fitted on the training pairs


def test_no_headroom_above_a_baseline_at_the_measured_ceiling_asks_for_the_ceiling_share() -> None:
    """The demo world's case: noisy raters, a keyword rule already as good as people agree."""
    train, held = _pairs(60), _pairs(40, start=100)  # both baselines get 1.0 here
    report = {"families": {"f": {"verdict": "fit", "agreement": {"pairwise": 0.9}}}}
    credit = np.array([1.0] * 36 + [0.0] * 4)  # 0.9: below the baselines, at the agreement ceiling
    v = evaluate_gate(accuracy_per_pair=credit, train_pairs=train, eval_pairs=held, gate=_gate(), fit_report=report)
    assert v.rule == "no headroom" and v.lift < 0 and v.passed, v.reason
    assert v.ceiling == pytest.approx(0.9) and v.ceiling_share == pytest.approx(1.0)
    worse = np.array([1.0] * 30 + [0.0] * 10)  # 0.75 < 0.85 * 0.9
    assert not evaluate_gate(
        accuracy_per_pair=worse, train_pairs=train, eval_pairs=held, gate=_gate(), fit_report=report
    ).passed


def _length_world(n: int, start: int = 0) -> list[PreferencePair]:
    """Chosen is the longer answer in 3 of every 5 pairs: the length rule scores 0.6."""
    out = []
    for i in range(start, start + n):
        long, short = f"a long answer number {i} here", f"short {i}"
        pair = (long, short) if i % 5 < 3 else (short, long)
        out.append(PreferencePair(f"p{i}", f"q{i}", "f", f"question {i}?", *pair))
    return out


def test_the_same_lift_fails_on_few_held_out_pairs_passes_on_many_and_the_reason_says_how_much_is_needed() -> None:
    """The paired bound narrows as 1/sqrt(n): a real +0.08 lift is noise on 100 pairs and clear on 2,000."""
    train = _length_world(100, start=10_000)
    results = {}
    for n in (100, 2000):
        held = _length_world(n)
        rng = np.random.default_rng(n)
        credit = (rng.random(n) < 0.68).astype(float)  # about 0.68 against the length rule's 0.6
        v = evaluate_gate(
            accuracy_per_pair=credit, train_pairs=train, eval_pairs=held, gate=_gate(baselines=["length"]), seed=0
        )
        assert v.baselines == {"length": pytest.approx(0.6)} and v.rule == "superiority"
        assert v.needed_lift == pytest.approx(v.lift - v.lift_lower)  # min_lift 0: the bound's distance below the lift
        results[n] = v
    few, many = results[100], results[2000]
    assert not few.passed and few.lift > 0.04 and few.lift_lower < 0 and few.needed_lift > few.lift
    assert "a lift of about" in few.reason and f"{few.needed_lift:+.3f}" in few.reason
    assert many.passed and many.lift_lower > 0 and many.needed_lift < few.needed_lift / 3
    assert "reward.gate.needed_lift" in many.metrics()
