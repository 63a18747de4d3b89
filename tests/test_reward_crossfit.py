"""Cross-fitting for the reward gate (reward.gate.cross_fit_folds), on constructed data with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from preftune.config import parse_config
from preftune.errors import ConfigError
from preftune.reward.crossfit import cross_fit, prompt_folds
from preftune.reward.data import PreferencePair
from preftune.reward.gate import evaluate_gate


def _gate(**kw):
    return parse_config({"reward": {"gate": kw}}).reward.gate


def _blind_pairs(n_prompts: int, per_prompt: int = 2) -> list[PreferencePair]:
    """Labels no baseline can see: chosen and rejected alternate in length and share every word."""
    out = []
    for q in range(n_prompts):
        for j in range(per_prompt):
            i = q * per_prompt + j
            a, b = f"alpha beta {i}", f"beta alpha {i} x"
            out.append(PreferencePair(f"p{i}", f"q{q}", "f", f"question {q}?", *((a, b) if i % 2 else (b, a))))
    return out


def _known_model(accuracy: float):
    """A 'reward model' right on a fixed, evenly spread subset of pairs: its accuracy on any stretch of pairs is known.

    Pair i is right when frac(i * golden ratio) < accuracy (a low-discrepancy sequence, so 200
    consecutive pairs already score within ~0.01 of ``accuracy``).
    """

    def correct(pairs: list[PreferencePair]) -> np.ndarray:
        return np.array([float((int(p.pair_id[1:]) * 0.6180339887) % 1.0 < accuracy) for p in pairs])

    return correct


def test_folds_keep_a_prompt_together_and_are_balanced() -> None:
    pairs = _blind_pairs(101, per_prompt=3)
    folds = prompt_folds(pairs, 5, seed=0)
    by_prompt: dict[str, set[int]] = {}
    for p, f in zip(pairs, folds, strict=True):
        by_prompt.setdefault(p.prompt_id, set()).add(int(f))
    assert all(len(s) == 1 for s in by_prompt.values())  # every pair of a prompt in one fold
    prompts_per_fold = np.bincount([next(iter(s)) for s in by_prompt.values()], minlength=5)
    assert prompts_per_fold.max() - prompts_per_fold.min() <= 1 and prompts_per_fold.sum() == 101
    assert (prompt_folds(pairs, 5, seed=0) == folds).all() and not (prompt_folds(pairs, 5, seed=1) == folds).all()
    with pytest.raises(ValueError, match="at least 2 folds"):
        prompt_folds(pairs, 1, seed=0)
    with pytest.raises(ValueError, match="cannot fill 5 folds"):
        prompt_folds(pairs[:9], 5, seed=0)


def test_every_pair_is_scored_once_by_a_model_that_never_saw_its_prompt() -> None:
    pairs = _blind_pairs(60)
    model = _known_model(0.7)
    seen_test: list[str] = []

    def fit_and_score(train, test, fold):
        train_prompts, test_prompts = {p.prompt_id for p in train}, {p.prompt_id for p in test}
        assert not train_prompts & test_prompts and len(train) + len(test) == len(pairs)
        seen_test.extend(p.pair_id for p in test)
        return model(test)

    cf = cross_fit(pairs, 4, fit_and_score, baselines=["length", "bag_of_words"], seed=0, progress=False)
    assert sorted(seen_test) == sorted(p.pair_id for p in pairs) and cf.k == 4
    assert (cf.credit == model(pairs)).all()  # placed back in the pairs' order
    assert set(cf.baselines) == {"length", "bag_of_words"} and all(x.shape == (120,) for x in cf.baselines.values())
    assert cf.baselines["length"].mean() == pytest.approx(0.5, abs=0.05)  # lengths alternate: the rule is blind
    m = cf.metrics()
    assert m["reward.crossfit.folds"] == 4 and m["reward.crossfit.pairs"] == 120
    assert m["reward.crossfit.accuracy"] == pytest.approx(model(pairs).mean())
    assert np.mean([m[f"reward.crossfit.fold_accuracy.{i}"] for i in range(4)]) == pytest.approx(
        model(pairs).mean(), abs=0.05
    )


def test_a_modest_lift_fails_on_the_held_out_split_and_passes_cross_fitted_over_all_pairs() -> None:
    """1,000 pairs, 20 % held out; a model with accuracy 0.54 against blind baselines (length rule 0.5): lift 0.04.

    On the 200 held-out pairs the bound sits ~0.05 below the lift, so it cannot clear 0;
    cross-fitted over all 1,000 pairs it is about sqrt(1000 / 200) = 2.2 times narrower (~0.025)
    and clears it. The gate's statistics (confidence, resamples, min_lift) are the same in both.
    """
    pairs = _blind_pairs(500)
    train, held = pairs[:800], pairs[800:]
    model = _known_model(0.54)
    gate = _gate()

    held_v = evaluate_gate(accuracy_per_pair=model(held), train_pairs=train, eval_pairs=held, gate=gate, seed=0)
    cf = cross_fit(pairs, 5, lambda tr, te, f: model(te), baselines=gate.baselines, seed=0, progress=False)
    cf_v = evaluate_gate(
        accuracy_per_pair=cf.credit,
        train_pairs=train,
        eval_pairs=cf.pairs,
        gate=gate,
        seed=0,
        baseline_credit=cf.baselines,
        cross_fit_folds=cf.k,
    )
    assert held_v.rule == cf_v.rule == "superiority"
    assert not held_v.passed and held_v.lift_lower <= 0 < held_v.lift, held_v.reason
    assert cf_v.passed and cf_v.lift_lower > 0, cf_v.reason
    assert cf_v.n_pairs == 1000 and cf_v.n_prompts == 500 and cf_v.cross_fit_folds == 5
    narrowing = (held_v.lift - held_v.lift_lower) / (cf_v.lift - cf_v.lift_lower)
    assert 1.6 < narrowing < 3.0  # ~ sqrt(1000 / 200) = 2.24
    assert "cross-fitted (5 folds by prompt" in cf_v.reason and "judges the training procedure" in cf_v.reason
    assert cf_v.metrics()["reward.gate.cross_fit_folds"] == 5.0
    assert "held-out pairwise accuracy" in held_v.reason and "reward.gate.cross_fit_folds" not in held_v.metrics()


def test_given_baseline_results_must_cover_the_configured_baselines() -> None:
    pairs = _blind_pairs(10)
    with pytest.raises(ValueError, match="no per-pair results for the baselines"):
        evaluate_gate(
            accuracy_per_pair=np.ones(20),
            train_pairs=pairs,
            eval_pairs=pairs,
            gate=_gate(),
            baseline_credit={"length": np.ones(20)},
        )


def test_one_fold_is_refused_in_the_config() -> None:
    assert parse_config({}).reward.gate.cross_fit_folds == 0  # default: off
    assert parse_config({"reward": {"gate": {"cross_fit_folds": 5}}}).reward.gate.cross_fit_folds == 5
    with pytest.raises(ConfigError, match="nothing to train on"):
        parse_config({"reward": {"gate": {"cross_fit_folds": 1}}})


@pytest.mark.slow
def test_train_reward_gates_on_cross_fitted_figures_and_publishes_the_training_split_model(tmp_path) -> None:
    import json

    import mlflow
    import torch
    from test_reward import build_tiny, synth_pairs, write_dataset

    from preftune.reward.step import EVAL_REPORT_FILE, train_reward
    from preftune.scoring.metadata import read_metadata

    train, eval_ = synth_pairs(60, 0), synth_pairs(20, 1, start=10_000)
    texts = [f"User: {r['prompt']}\nAssistant: {r['chosen']} {r['rejected']}" for r in train]
    base = build_tiny("llama", tmp_path / "llama", texts)
    dataset = write_dataset(tmp_path / "dataset", train, eval_)
    cfg = parse_config(
        {
            "models": {"reward_base": str(base)},
            "reward": {
                "epochs": 2,
                "batch_size": 16,
                "lr": 3e-3,
                "eval_every": 5,
                "max_length": 96,
                "gate": {"cross_fit_folds": 2, "bootstrap_resamples": 500},
            },
        }
    )
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = train_reward(cfg, dataset, tmp_path / "rm", progress=False)
    finally:
        torch.set_num_threads(before)

    # the gate saw every pair once (160 = 120 training + 40 held-out), each scored by a model that never saw it
    assert res.gate.cross_fit_folds == 2 and res.gate.n_pairs == 160 and res.gate.n_prompts == 80
    assert res.gate.passed and "cross-fitted (2 folds by prompt" in res.gate.reason
    m = mlflow.get_run(res.mlflow_run_id).data.metrics
    assert m["reward.crossfit.folds"] == 2 and m["reward.crossfit.pairs"] == 160
    assert m["reward.crossfit.accuracy"] == pytest.approx(res.gate.accuracy) and m["reward.gate.cross_fit_folds"] == 2
    # the published model is the one trained on the training split, with its own held-out figures
    assert read_metadata(tmp_path / "rm").eval_accuracy == res.evaluation.accuracy and res.evaluation.n_pairs == 40
    report = json.loads((tmp_path / "rm" / EVAL_REPORT_FILE).read_text())
    assert report["cross_fit"]["folds"] == 2 and len(report["cross_fit"]["fold_accuracy"]) == 2
    assert report["eval"]["n_pairs"] == 40 and report["gate"]["n_pairs"] == 160
