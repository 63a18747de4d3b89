"""The drift measures and the PPO run's drift guards (length, repetition, reward-up-eval-flat): warn or stop."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from preftune.errors import ExitCode, PreftuneError
from preftune.ppo import drift
from preftune.ppo.config import PPOSection
from preftune.ppo.policy import ActorCritic
from preftune.ppo.trainer import PPOTrainer, PromptItem

PROMPTS = [
    PromptItem(p, fam, f"p{i}")
    for i, (p, fam) in enumerate([("hi", "a"), ("how do I bake bread", "b"), ("tell me a joke", "a"), ("help me", "b")])
]


def test_window_change_and_relative_change():
    assert drift.change([1, 1, 2, 2], 2) == 1
    assert drift.relative_change([2, 2, 3, 3], 2) == 0.5
    assert drift.change([1, 2, 3], 2) is None  # fewer than two windows: nothing to say
    assert drift.relative_change([0, 0, 1, 1], 2) is None


def test_repetition_rate_counts_repeated_ngrams_per_response():
    assert drift.repetition_rate([[1, 2, 3, 4, 5]], 2) == 0.0
    assert drift.repetition_rate([[7, 7, 7, 7, 7]], 2) == pytest.approx(0.75)  # 4 bigrams, 1 distinct
    assert drift.repetition_rate([[1, 2, 3, 4, 5], [7, 7, 7, 7, 7]], 2) == pytest.approx(0.375)
    assert drift.repetition_rate([[1]], 3) == 0.0


def test_flags_fire_past_their_limits_only():
    assert drift.length_drift([10, 10, 16, 16], 2, 0.5) is not None
    assert drift.length_drift([10, 10, 14, 14], 2, 0.5) is None
    assert drift.length_drift([10, 10, 4, 4], 2, 0.5) is not None  # shrinking counts too
    assert drift.repetition_drift([0.0, 0.0, 0.3, 0.3], 2, 0.15) is not None
    assert drift.repetition_drift([0.3, 0.3, 0.0, 0.0], 2, 0.15) is None
    up, flat, rising = [0.0, 0.0, 1.0, 1.0], [0.4, 0.4, 0.41, 0.41], [0.4, 0.4, 0.6, 0.6]
    assert "reward hacking" in drift.reward_divergence(up, flat, 2, 0.5, 0.05)
    assert drift.reward_divergence(up, rising, 2, 0.5, 0.05) is None
    assert drift.reward_divergence(flat, flat, 2, 0.5, 0.05) is None


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from preftune.ppo import toy

    torch.set_num_threads(1)
    return toy.build_policy(tmp_path_factory.mktemp("policy"), eos_boost=3.0, initializer_range=0.3)


def make_trainer(policy_dir: Path, reward, judge=None, **kw: object) -> PPOTrainer:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model, tok = AutoModelForCausalLM.from_pretrained(policy_dir), AutoTokenizer.from_pretrained(policy_dir)
    base = dict(
        updates=4,
        batch_size=4,
        mini_batch_size=4,
        max_new_tokens=8,
        lr=1e-2,
        progress=False,
        missing_eos_penalty=None,
        warmup_updates=0,
        drift_window=1,
    )
    base.update(kw)
    s = PPOSection(**base)  # type: ignore[arg-type]
    actor = ActorCritic(model, mode="lora", critic="shared", temperature=s.temperature, lora_r=8, lora_alpha=16)
    return PPOTrainer(s, actor, tok, reward, PROMPTS, seed=0, device=torch.device("cpu"), judge_fn=judge)


def rising_reward():
    """A reward that rises with every call whatever the policy does (a reward model being gamed)."""
    calls = {"n": 0}

    def fn(prompts, responses):
        calls["n"] += 1
        return torch.full((len(responses),), float(calls["n"]))

    return fn


def test_metrics_carry_repetition_and_reward_per_family(policy_dir):
    t = make_trainer(policy_dir, rising_reward(), updates=1)
    m = t.train().history[0]
    assert 0.0 <= m["ppo/repetition"] <= 1.0
    assert {"ppo/reward_mean/a", "ppo/reward_mean/b"} <= set(m)
    assert "ppo/judged_preferred_share" not in m  # no judge given


def test_reward_divergence_guard_stops_with_exit_12(policy_dir):
    never_preferred = lambda items, responses: [False] * len(items)  # noqa: E731
    t = make_trainer(
        policy_dir,
        rising_reward(),
        never_preferred,
        reward_normalize=False,
        reward_clip=None,
        reward_divergence_guard="stop",
        divergence_min_reward_rise=0.5,
        length_drift_guard="off",
        repetition_drift_guard="off",
    )
    with pytest.raises(PreftuneError) as err:
        t.train()
    assert err.value.exit_code == ExitCode.TRAINING_DIVERGED
    assert "reward_divergence" in err.value.message and "reward hacking" in err.value.message
    assert t.update_idx == 2  # caught as soon as two windows of one update exist
    assert t.history[-1]["ppo/judged_preferred_share"] == 0.0


def test_reward_divergence_guard_in_warn_mode_logs_once_and_finishes(policy_dir, caplog):
    never_preferred = lambda items, responses: [False] * len(items)  # noqa: E731
    t = make_trainer(
        policy_dir,
        rising_reward(),
        never_preferred,
        reward_normalize=False,
        reward_clip=None,
        reward_divergence_guard="warn",
        length_drift_guard="off",
        repetition_drift_guard="off",
    )
    with caplog.at_level(logging.WARNING, logger="preftune.ppo.trainer"):
        res = t.train()
    assert res.updates == 4
    assert sum("reward_divergence" in r.getMessage() for r in caplog.records) == 1
    assert res.history[-1].get("ppo/guard/reward_divergence") == 1.0


def test_a_followed_reward_does_not_trip_the_divergence_guard(policy_dir):
    calls = {"n": 0}

    def judge(items, responses):  # the judge sees more preferred answers as the reward rises
        calls["n"] += 1
        return [i < calls["n"] for i in range(len(items))]

    t = make_trainer(
        policy_dir,
        rising_reward(),
        judge,
        reward_normalize=False,
        reward_clip=None,
        reward_divergence_guard="stop",
        length_drift_guard="off",
        repetition_drift_guard="off",
    )
    assert t.train().updates == 4


def test_length_drift_guard_stops_when_length_moves(policy_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_dir)

    def short_is_better(prompts, responses):
        return torch.tensor([-5.0 * len(tok(r)["input_ids"]) for r in responses])

    t = make_trainer(
        policy_dir,
        short_is_better,
        updates=12,
        lr=5e-2,
        max_length_drift=0.2,
        drift_window=2,
        length_drift_guard="stop",
        reward_normalize=False,
        reward_clip=None,
        kl_coef=0.0,
        kl_controller="fixed",
    )
    with pytest.raises(PreftuneError) as err:
        t.train()
    assert "length_drift" in err.value.message and "response length drifted" in err.value.message
    off = make_trainer(
        policy_dir,
        short_is_better,
        updates=12,
        lr=5e-2,
        max_length_drift=0.2,
        drift_window=2,
        length_drift_guard="off",
        reward_normalize=False,
        reward_clip=None,
        kl_coef=0.0,
        kl_controller="fixed",
    )
    assert off.train().updates == 12


def test_time_budget_ends_the_run_early_and_cleanly(policy_dir):
    t = make_trainer(policy_dir, rising_reward(), updates=50, max_minutes=1e-6)
    res = t.train()
    assert res.updates == 1  # the first update already used the budget
