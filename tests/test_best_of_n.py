"""Best-of-N: the closed-form KL against the exact best-of-n distribution on the toy world, the estimators."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from preftune.ppo import best_of_n as bon

NS = (1, 2, 4, 8, 16)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from preftune.ppo import toy

    torch.set_num_threads(1)
    return toy.build_policy(tmp_path_factory.mktemp("bon-policy"), eos_boost=3.0, initializer_range=0.3)


def two_token_outcomes(policy_dir: Path, prompt: str) -> torch.Tensor:
    """Exact log-probs of every 2-token continuation of ``prompt`` under the toy policy (V*V outcomes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.text import render_prompt

    model = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    tok = AutoTokenizer.from_pretrained(policy_dir)
    ids = tok(render_prompt(prompt, tok), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        first = torch.log_softmax(model(ids).logits[0, -1], -1)
        V = first.shape[0]
        seq = torch.cat([ids.repeat(V, 1), torch.arange(V)[:, None]], dim=1)
        second = torch.log_softmax(model(seq).logits[:, -1], -1)
    return (first[:, None] + second).flatten()


def test_closed_form_values() -> None:
    assert bon.kl_closed_form(1) == 0.0
    assert bon.kl_closed_form(2) == pytest.approx(math.log(2) - 0.5)
    assert bon.kl_closed_form(16) == pytest.approx(math.log(16) - 15 / 16)
    with pytest.raises(ValueError):
        bon.kl_closed_form(0)


def test_best_of_n_kl_matches_the_closed_form_on_the_toy_world(toy_dir: Path) -> None:
    """The exact KL of best-of-n (all 2-token responses of the toy policy enumerated) is log n - (n-1)/n."""
    logp = two_token_outcomes(toy_dir, "how do I bake bread")
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-4)
    rewards = torch.randn(logp.shape[0], generator=torch.Generator().manual_seed(0))  # a reward without ties
    kls = []
    for n in NS:
        exact = bon.exact_best_of_n(logp, rewards, n)
        assert float(exact.probs.sum()) == pytest.approx(1.0, abs=1e-9)
        assert exact.kl == pytest.approx(bon.kl_closed_form(n), abs=2e-3), n
        assert exact.kl <= bon.kl_closed_form(n) + 1e-9  # the closed form is an upper bound
        kls.append(exact.kl)
    assert kls == sorted(kls)


def test_ties_make_best_of_n_spend_less_than_the_closed_form() -> None:
    """A coarse reward (many ties) cannot concentrate best-of-n as much: KL below log n - (n-1)/n."""
    logp = torch.full((1000,), -math.log(1000))
    coarse = torch.arange(1000) // 250  # 4 reward levels
    exact = bon.exact_best_of_n(logp, coarse.float(), 8)
    levels = [(k / 4) ** 8 - ((k - 1) / 4) ** 8 for k in range(1, 5)]
    assert exact.kl == pytest.approx(sum(q * math.log(q / 0.25) for q in levels))
    assert exact.kl < bon.kl_closed_form(8) - 0.1
    # 4 equally likely levels: the top level is picked with probability 1 - (3/4)^8
    top = float(exact.probs[coarse == 3].sum())
    assert top == pytest.approx(1 - 0.75**8)


def test_expected_max_of_n_is_the_mean_over_all_subsets() -> None:
    scores = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for n in range(1, 7):
        got = bon.expected_max_of_n(scores, n)
        for row in range(3):
            subsets = list(itertools.combinations(scores[row].tolist(), n))
            assert float(got[row]) == pytest.approx(sum(max(s) for s in subsets) / len(subsets))
    with pytest.raises(ValueError):
        bon.expected_max_of_n(scores, 7)


def test_sampled_curve_estimates_the_exact_best_of_n_reward(toy_dir: Path) -> None:
    logp = two_token_outcomes(toy_dir, "tell me a joke")
    rewards = torch.randn(logp.shape[0], generator=torch.Generator().manual_seed(2))
    draws = torch.multinomial(logp.exp(), 4000 * 16, replacement=True, generator=torch.Generator().manual_seed(3))
    points = bon.curve(rewards[draws].reshape(4000, 16), NS)
    for n, point in zip(NS, points, strict=True):
        assert point["kl"] == bon.kl_closed_form(n)
        assert point["reward"] == pytest.approx(bon.exact_best_of_n(logp, rewards, n).reward, abs=0.05), n
    assert [p["reward"] for p in points] == sorted(p["reward"] for p in points)


def test_measure_on_the_toy_policy_and_compare(toy_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(toy_dir).eval()
    tok = AutoTokenizer.from_pretrained(toy_dir)

    def short(prompts: list[str], responses: list[str]) -> torch.Tensor:
        return torch.tensor([-float(len(r)) for r in responses])

    out = bon.measure(
        model,
        tok,
        ["hi", "tell me a joke"],
        short,
        ns=(1, 2, 4),
        max_new_tokens=6,
        seed=0,
        trained=model,
        trained_samples=2,
    )
    assert out["draws_per_prompt"] == 4 and [p["n"] for p in out["curve"]] == [1, 2, 4]
    rewards = [p["reward"] for p in out["curve"]]
    assert rewards == sorted(rewards)
    # the "trained" policy is the base itself: no KL (the same log-probs from sampling and from a forward)
    assert out["policy"]["kl"] == pytest.approx(0.0, abs=1e-4)

    pts = [{"n": 1.0, "kl": 0.0, "reward": 0.0}, {"n": 4.0, "kl": bon.kl_closed_form(4), "reward": 1.0}]
    at = bon.kl_closed_form(4) / 2
    assert bon.compare(pts, at, 0.6)["beats"] is True  # best-of-n interpolates to 0.5 there
    assert bon.compare(pts, at, 0.4)["beats"] is False
    assert bon.compare(pts, 5.0, 0.9)["beats"] is False  # more KL, less reward than best-of-4
    assert bon.compare(pts, 5.0, 1.5)["beats"] is None  # more reward but more KL than measured: undecided


def test_the_pilot_measures_best_of_n_with_its_models(toy_dir: Path, tmp_path: Path) -> None:
    """preftune.pilot.run.measure_best_of_n on toy models: the curve, the trained policy's figures, no error."""
    import json
    import shutil

    from preftune.config import parse_config
    from preftune.pilot.run import measure_best_of_n
    from preftune.ppo import artifacts, toy

    reward = toy.build_reward_model(tmp_path / "reward", per_family={"toy": 0.9})
    trained = tmp_path / "trained"
    shutil.copytree(toy_dir, trained)  # a "trained" policy identical to the start: KL 0
    meta = {"format": artifacts.FORMAT, "version": artifacts.VERSION, "merged": ".", "adapter": None}
    (trained / artifacts.METADATA_FILE).write_text(json.dumps(meta))
    prompts = tmp_path / "prompts.jsonl"
    texts = ["hi", "tell me a joke", "write a haiku", "help me", "how do I bake bread"]
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "family": "toy", "prompt": t}) + "\n" for i, t in enumerate(texts))
    )
    cfg = parse_config(
        {
            "models": {"policy": str(toy_dir)},
            "ppo": {"prompts": str(prompts), "max_new_tokens": 6},
            "pilot": {"best_of_n": [1, 2, 4], "best_of_n_prompts": 3, "best_of_n_policy_samples": 2},
        }
    )
    out = measure_best_of_n(cfg, str(trained), str(reward))
    assert "error" not in out, out
    assert out["prompts"] == 3 and out["draws_per_prompt"] == 4
    assert [p["n"] for p in out["curve"]] == [1, 2, 4]
    assert out["policy"]["kl"] == pytest.approx(0.0, abs=1e-4) and out["policy"]["samples_per_prompt"] == 2
    broken = measure_best_of_n(cfg, str(tmp_path / "missing"), str(reward))
    assert "missing" in broken["error"]  # reported in the figures, the report is still written
