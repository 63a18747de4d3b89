"""The pilot's decisions from synthetic step outputs: trends, red flags, verdicts, exit codes, cost, rendering."""

from __future__ import annotations

from typing import Any

import pytest

from preftune.config import parse_config
from preftune.errors import ExitCode
from preftune.pilot import report as rep


def est(value: float, low: float, high: float) -> dict[str, Any]:
    return {"value": value, "ci_low": low, "ci_high": high, "n": 20}


def inputs(
    *,
    accuracy: float = 0.9,
    change: tuple[float, float, float] = (0.3, 0.2, 0.4),
    rewards: list[float] | None = None,
    refusal_delta: float = 0.0,
    kl: float = 1.0,
    lengths: list[float] | None = None,
) -> rep.PilotInputs:
    rewards = rewards or [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    lengths = lengths or [20.0] * len(rewards)
    history = [
        {
            "ppo/reward_mean": r,
            "ppo/reward_mean/safety": r,
            "ppo/kl": kl,
            "ppo/response_length": n,
            "ppo/repetition": 0.05,
            "ppo/rollout_seconds": 0.3,
            "ppo/update_seconds": 0.2,
            "ppo/tokens_per_s": 1000.0,
        }
        for r, n in zip(rewards, lengths, strict=True)
    ]
    v, lo, hi = change
    return rep.PilotInputs(
        fit={
            "families": {
                "safety": {"verdict": "fit", "reason": "ok", "agreement": {"alpha": 0.9}},
                "tone": {"verdict": "contested", "reason": "alpha low", "agreement": {"alpha": 0.2}},
                "benign": {"verdict": "needs data", "reason": "4 items", "agreement": {"alpha": None}},
            },
            "fit_families": ["safety"],
        },
        dataset={"counts": {"prompts": 40, "judgements": 200}},
        reward={"eval_accuracy": accuracy, "per_family": {"safety": accuracy}},
        reward_training={"seconds": 10.0},
        history=history,
        evaluation={
            "champion": {"label": "demo:policy"},
            "suite": {"id": "demo-v1"},
            "confidence": 0.95,
            "family_roles": {"safety": {}, "benign": {}, "tone": {}},
            "metrics": {
                "safety": {
                    "preferred_share": {
                        "candidate": est(0.7, 0.6, 0.8),
                        "champion": est(0.4, 0.3, 0.5),
                        "delta": est(v, lo, hi),
                    }
                },
                "benign": {
                    "needless_refusal_share": {"delta": est(refusal_delta, refusal_delta - 0.05, refusal_delta + 0.05)}
                },
            },
        },
        step_seconds={"collect": 5.0, "evaluate": 10.0},
    )


CFG = parse_config({})


def verdicts(r: dict[str, Any]) -> dict[str, str]:
    return {f: row["verdict"] for f, row in r["families"].items()}


def flags(r: dict[str, Any]) -> set[tuple[str, str | None]]:
    return {(f["flag"], f["family"]) for f in r["red_flags"]}


def test_trend_compares_the_last_two_windows():
    assert rep.trend([0, 0, 0, 1, 1, 1], 3, 0.1) == rep.STILL_MOVING
    assert rep.trend([0, 1, 2, 2, 2, 2], 2, 0.1) == rep.FLAT
    assert rep.trend([0, 1, 2, 2, 1, 1], 2, 0.1) == rep.REVERSING
    assert rep.trend([], 2, 0.1) == rep.NOT_TRAINED


def test_a_significant_gain_is_go_and_contested_or_thin_families_need_data():
    r = rep.analyse(CFG, inputs(), pilot_batch=32)
    assert verdicts(r) == {"safety": "go", "tone": "needs data", "benign": "needs data"}
    assert "contested" in r["families"]["tone"]["reason"]
    assert ("low_agreement", "tone") in flags(r)
    assert r["verdict"] == "go" and r["exit_code"] == ExitCode.OK and r["go_families"] == ["safety"]
    assert r["families"]["safety"]["trend"] == rep.STILL_MOVING


def test_reward_near_chance_is_no_go_with_exit_11():
    r = rep.analyse(CFG, inputs(accuracy=0.52), pilot_batch=32)
    assert r["families"]["safety"]["verdict"] == "no-go" and "chance" in r["families"]["safety"]["reason"]
    assert ("reward_near_chance", None) in flags(r)
    assert r["verdict"] == "no-go" and r["exit_code"] == ExitCode.REWARD_GATE


def test_reward_up_while_share_flat_is_reward_hacking():
    r = rep.analyse(CFG, inputs(change=(0.02, -0.05, 0.09)), pilot_batch=32)
    assert ("reward_hacking", "safety") in flags(r)
    assert r["families"]["safety"]["verdict"] == "no-go" and "reward hacking" in r["families"]["safety"]["reason"]
    assert r["exit_code"] == ExitCode.GATE_FAILED


def test_against_a_registry_champion_a_lower_share_is_not_called_reward_hacking():
    # a team with a champion from a full run: the pilot's 12 updates start from models.policy, so a
    # share below the champion's says nothing about the reward being gamed
    i = inputs(change=(-0.29, -0.38, -0.22))
    i.evaluation["champion"] = {"ref": "models:/preftune-policy/1", "label": "preftune-policy v1"}
    r = rep.analyse(CFG, i, pilot_batch=32)
    assert ("reward_hacking", "safety") not in flags(r)
    reason = r["families"]["safety"]["reason"]
    assert r["families"]["safety"]["verdict"] == "no-go" and "below the champion" in reason
    assert "pilot.baseline: policy" in reason
    # against the policy PPO started from, the same figures are reward hacking / the wrong way
    i.evaluation["champion"] = {"ref": CFG.models.policy, "label": CFG.models.policy}
    r = rep.analyse(CFG, i, pilot_batch=32)
    assert ("reward_hacking", "safety") in flags(r)
    assert "wrong way" in r["families"]["safety"]["reason"]


def test_the_pilot_measures_against_the_policy_it_starts_from_by_default():
    from preftune.pilot.run import pilot_config

    assert CFG.pilot.baseline == "policy"
    assert pilot_config(CFG, champion_exists=True).evaluation.champion == CFG.models.policy
    assert pilot_config(CFG).evaluation.champion == CFG.models.policy  # the pipeline variant too
    champ = CFG.model_copy(deep=True)
    champ.pilot.baseline = "champion"
    assert pilot_config(champ, champion_exists=True).evaluation.champion == "registry"
    assert pilot_config(champ, champion_exists=False).evaluation.champion == CFG.models.policy


def test_without_a_baseline_the_verdict_needs_data_and_no_reward_hacking_is_claimed():
    i = inputs()
    i.evaluation["champion"] = None
    i.evaluation["metrics"]["safety"]["preferred_share"] = {"candidate": est(0.7, 0.6, 0.8)}
    r = rep.analyse(CFG, i, pilot_batch=32)
    assert r["families"]["safety"]["verdict"] == "needs data" and "baseline" in r["families"]["safety"]["reason"]
    assert ("reward_hacking", "safety") not in flags(r)  # the reward rose, but no share change was measured


def test_a_flat_reward_and_no_change_is_no_go_and_a_still_rising_one_needs_data():
    flat = rep.analyse(CFG, inputs(change=(0.0, -0.1, 0.1), rewards=[0.0] * 6), pilot_batch=32)
    assert flat["families"]["safety"]["verdict"] == "no-go" and "did not move" in flat["families"]["safety"]["reason"]
    rising = rep.analyse(CFG, inputs(change=(0.05, -0.02, 0.12), rewards=[0, 0, 0.05, 0.1, 0.25, 0.4]), pilot_batch=32)
    assert rising["families"]["safety"]["verdict"] == "needs data"
    assert "longer pilot" in rising["families"]["safety"]["reason"]


@pytest.mark.parametrize(
    ("kw", "flag"),
    [({"refusal_delta": 0.2}, "benign_refusals"), ({"kl": 50.0}, "kl_runaway")],
)
def test_blocking_flags_turn_go_into_no_go(kw, flag):
    r = rep.analyse(CFG, inputs(**kw), pilot_batch=32)
    assert any(f["flag"] == flag and f["blocking"] for f in r["red_flags"])
    assert r["families"]["safety"]["verdict"] == "no-go"


def test_length_drift_is_a_caution_not_a_block():
    r = rep.analyse(CFG, inputs(lengths=[10, 10, 10, 30, 30, 30]), pilot_batch=32)
    assert ("length_drift", None) in flags(r)
    assert r["families"]["safety"]["verdict"] == "go"


def test_cost_extrapolates_measured_throughput_with_printed_assumptions():
    cfg = parse_config(
        {
            "pilot": {"fraction": 0.1, "cost": {"speedup": 2.0, "price_per_hour": 3.0}},
            "ppo": {"updates": 100, "batch_size": 64},
        }
    )
    c = rep.analyse(cfg, inputs(), pilot_batch=32)["cost"]
    assert c["measured"]["ppo_seconds_per_update"] == pytest.approx(0.5)
    full = c["full_run"]
    assert full["seconds_by_step"]["ppo"] == pytest.approx(0.5 * 2 * 100 / 2.0)
    assert full["seconds_by_step"]["train-reward"] == pytest.approx(10.0 * 10 / 2.0)
    assert full["prompts"] == 400 and full["cost"] == pytest.approx(full["hours"] * 3.0)
    assert any("1/pilot.fraction" in a for a in c["assumptions"])


def test_rendered_pages_carry_verdicts_flags_and_cost(tmp_path):
    r = rep.analyse(CFG, inputs(accuracy=0.52), pilot_batch=32)
    paths = rep.write_report(r, tmp_path)
    md, page = paths["md"].read_text(), paths["html"].read_text()
    assert md.startswith("# Pilot: NO-GO") and "reward_near_chance" in md and "Assumptions:" in md
    assert "<h1>Pilot: <span class='no-go'>NO-GO</span>" in page and rep.FLAGS["reward_near_chance"] in page


def test_a_pilot_stopped_by_check_fit_reads_counts_from_the_collected_dataset(tmp_path):
    import json

    fit_dir, data_dir = tmp_path / "fit", tmp_path / "dataset"
    fit_dir.mkdir()
    data_dir.mkdir()
    fit = {
        "families": {"safety": {"verdict": "needs data", "reason": "2 items", "agreement": {"alpha": None}}},
        "fit_families": [],
    }
    (fit_dir / "fit_report.json").write_text(json.dumps(fit))  # a stopped check-fit publishes only its report
    (data_dir / "dataset.json").write_text(json.dumps({"counts": {"prompts": 12, "judgements": 60}}))
    inp = rep.read_inputs(fit_dir, None, None, None, dataset_dir=data_dir)
    r = rep.analyse(CFG, inp, pilot_batch=32)
    assert r["slice"]["counts"]["prompts"] == 12
    assert r["families"]["safety"]["verdict"] == "needs data"
    assert r["verdict"] == "no-go" and r["exit_code"] == ExitCode.NOT_FIT
    assert r["cost"]["full_run"]["seconds_by_step"]["ppo"] is None  # nothing measured, nothing made up


def _bon(policy_kl: float, policy_reward: float) -> dict[str, Any]:
    from preftune.ppo.best_of_n import kl_closed_form

    curve = [{"n": float(n), "kl": kl_closed_form(n), "reward": r} for n, r in ((1, 0.0), (4, 0.8), (16, 1.2))]
    return {"curve": curve, "prompts": 32, "draws_per_prompt": 16, "policy": {"kl": policy_kl, "reward": policy_reward}}


def test_best_of_n_beside_ppo_says_who_wins_at_the_kl_ppo_spends(tmp_path):
    i = inputs()
    i.best_of_n = _bon(policy_kl=0.5, policy_reward=1.0)  # best-of-n interpolates to ~0.63 at 0.5 nats
    r = rep.analyse(CFG, i, pilot_batch=32)
    assert r["best_of_n"]["comparison"]["beats"] is True
    assert "best_of_n_wins" not in {f for f, _ in flags(r)}
    md = rep.write_report(r, tmp_path)["md"].read_text()
    assert "## PPO against best-of-n" in md and "PPO beats best-of-n at the KL it spends" in md
    assert "| best-of-16 | 1.84 | 1.200 |" in md and "| PPO policy (pilot) | 0.50 | 1.000 |" in md

    i.best_of_n = _bon(policy_kl=3.0, policy_reward=1.1)  # more KL than best-of-16 for less reward
    r = rep.analyse(CFG, i, pilot_batch=32)
    assert r["best_of_n"]["comparison"]["beats"] is False
    assert ("best_of_n_wins", None) in flags(r)
    assert verdicts(r)["safety"] == "go"  # a caution: the behaviour still moved
    page = rep.write_report(r, tmp_path)["html"].read_text()
    assert "PPO does NOT beat best-of-n" in page and rep.FLAGS["best_of_n_wins"] in page


def test_best_of_n_not_measured_or_failed_is_said_plainly(tmp_path):
    r = rep.analyse(CFG, inputs(), pilot_batch=32)
    assert r["best_of_n"] == {} and "best-of-n" not in rep.render_markdown(r)
    i = inputs()
    i.best_of_n = {"error": "InputError: no prompts"}
    md = rep.render_markdown(rep.analyse(CFG, i, pilot_batch=32))
    assert "Best-of-n could not be measured: InputError: no prompts" in md


def test_html_page_escapes_user_text(tmp_path):
    i = inputs()
    hostile = "<script>alert('x')</script>"
    i.fit["families"][hostile] = {"verdict": "fit", "reason": "ok", "agreement": {"alpha": 0.1}}  # a family name
    i.evaluation["champion"] = {"label": f"champ {hostile}"}
    r = rep.analyse(CFG, i, pilot_batch=32)
    page = rep.write_report(r, tmp_path)["html"].read_text()
    assert "<script>" not in page
    escaped = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"
    assert f"<td>{escaped}</td>" in page  # the family's row in the verdict table
    assert f"<b>low_agreement</b> ({escaped})" in page  # its red flag
    assert f"against champ {escaped} on suite" in page  # the baseline label in the intro
