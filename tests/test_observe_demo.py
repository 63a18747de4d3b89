"""``preftune demo --observe``: the parts of the loop that need no pipeline run.

The end to end run (the demo promotes a champion, a week of production in which it *generates* every
answer, the new style from day 4 flagged by observe, then -- by what this CPU's world gives -- the
retraining promoted and the unsafe share recovering, a capability gap, or the retraining rejected by
evaluate) shares the default demo's run:
``tests/test_demo.py::test_the_default_demo_promotes_and_the_observed_week_ends_in_a_documented_branch``
(one ``demo --observe`` instead of two demos; the margins are in docs/observe.md).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from test_evaluate_support import RISKY, toy_config, toy_store, toy_world  # noqa: F401 (fixtures)


def test_the_week_s_traffic_and_the_retraining_config(tmp_path):
    """Cheap: the new style only from shift_day on; the retraining run gets the hard cases twice over."""
    from preftune.config import parse_config
    from preftune.observe.demo_loop import ObserveDemoSettings, production_prompts, retrain_config
    from preftune.world.corpus import build_corpus
    from preftune.world.jailbreak import jailbreak_prompts

    settings = ObserveDemoSettings(per_day=400, shift_day=4, jailbreak_share=0.25)
    new_style = {p.prompt for p in jailbreak_prompts()}
    assert not new_style & {p.prompt for p in build_corpus(0).train + build_corpus(0).eval}
    before, after = production_prompts(3, settings, 0), production_prompts(4, settings, 0)
    assert not any(p["jailbreak"] for p in before) and not new_style & {p["prompt"] for p in before}
    share = sum(p["jailbreak"] for p in after) / len(after)
    assert 0.18 < share < 0.32 and all((p["prompt"] in new_style) == p["jailbreak"] for p in after)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "family": "safety", "prompt": f"q {i}"}) + "\n" for i in range(3))
    )
    hard = tmp_path / "hard_cases.jsonl"
    hard.write_text(
        json.dumps(
            {
                "id": "h1",
                "family": "safety",
                "prompt": "How do I x so that nobody finds out?",
                "tags": ["observed"],
                "champion_answer": "Happy to help!",
            }
        )
        + "\n"
    )
    cfg = parse_config({"data": {"prompts": str(prompts), "generation": {"n_candidates": 3}}})
    got = retrain_config(cfg, hard, tmp_path, {"data": {"generation": {"max_new_tokens": 40}}, "ppo": {"updates": 5}})
    assert got.data.extra_prompts == [str(hard)]
    assert got.evaluation.observed_cases == [str(hard)]  # its held-out split judges the candidate
    assert (got.data.generation.n_candidates, got.data.generation.max_new_tokens) == (3, 40)  # merged, not replaced
    assert got.ppo.updates == 5 and got.run.name.endswith("-observed")
    assert got.ppo.prompts is None  # the rollouts read data.prompts + data.extra_prompts (ppo.step.load_prompt_items)
    assert got.models.policy == "demo:policy" and got.data.extra_generation is None


def test_the_retraining_run_continues_from_the_champion_with_weight_on_the_hard_cases(tmp_path):
    """ObserveDemoSettings -> run-config overrides: start at the champion's version, more candidates per hard
    case, repeats in the rollouts, a short PPO run; ``retrain`` overrides last."""
    from preftune.config import parse_config
    from preftune.observe.demo_loop import ObserveDemoSettings, retrain_config, retrain_overrides

    hard = tmp_path / "hard_cases.jsonl"
    hard.write_text(json.dumps({"id": "h1", "family": "safety", "prompt": "How do I x?"}) + "\n")
    cfg = parse_config({"models": {"registered_model": "shop-policy"}, "data": {"generation": {"temperature": 0.9}}})
    settings = ObserveDemoSettings(
        retrain_from="champion", hard_case_candidates=6, hard_case_repeat=3, retrain_updates=12
    )
    got = retrain_config(cfg, hard, tmp_path, retrain_overrides(cfg, settings, "7"))
    assert got.models.policy == "models:/shop-policy/7"  # the champion's version, not the moving alias
    assert (got.data.extra_generation.n_candidates, got.data.extra_generation.temperature) == (6, 0.9)
    assert got.data.generation.n_candidates == cfg.data.generation.n_candidates  # the usual prompts unchanged
    assert got.data.extra_prompts_repeat == 3 and got.ppo.updates == 12
    assert got.evaluation.gates.observed_min_gain == {"forbidden_share": 0.1}  # must show it fixes the hard cases
    own = ObserveDemoSettings(retrain_from="policy", retrain={"ppo": {"updates": 3}})
    got = retrain_config(cfg, hard, tmp_path, retrain_overrides(cfg, own, "7"))
    assert got.models.policy == cfg.models.policy and got.ppo.updates == 3
    assert (got.world.rater_write_rate, got.ppo.demonstration_coef) == (0.0, 0.0)  # off unless asked
    # raters who write the wanted answer, and PPO taught it (a champion start keeps its short run)
    taught = ObserveDemoSettings(retrain_from="champion", rater_write_rate=1.0, demonstration_coef=0.02)
    got = retrain_config(cfg, hard, tmp_path, retrain_overrides(cfg, taught, "7"))
    assert (got.world.rater_write_rate, got.ppo.demonstration_coef, got.ppo.updates) == (1.0, 0.02, 20)


def test_coverage_of_hard_cases_decides_where_the_retraining_starts(tmp_path, toy_world, toy_store):  # noqa: F811
    """retrain_from 'auto': PPO reinforces only answers the start policy samples. The toy 'unsafe' policy never
    declines a risky prompt (coverage 0), the toy base policy declines half the time (coverage ~1 with 8
    samples): from an unsafe champion the retraining starts from the base policy; when the base is unsafe too,
    it is a capability gap (no retraining, exit 10's message)."""
    from rich.console import Console

    from preftune.observe.coverage import hard_case_coverage
    from preftune.observe.demo_loop import ObserveDemoSettings, capability_gap_message, choose_start

    cases = [{"id": f"h{i}", "family": "risky", "prompt": f"How do I {x} ?", "tags": []} for i, x in enumerate(RISKY)]
    cases.append({"id": "other", "family": "not-in-the-suite", "prompt": "p", "tags": []})
    hard = tmp_path / "hard_cases.jsonl"
    hard.write_text("".join(json.dumps(c) + "\n" for c in cases))
    cfg = toy_config(toy_store, toy_world)
    unsafe = hard_case_coverage(cfg, str(toy_world["unsafe"]), cases, 8, 0)
    base = hard_case_coverage(cfg, str(toy_world["base"]), cases, 8, 0)
    assert (unsafe.cases, unsafe.covered, unsafe.preferred_share) == (len(RISKY), 0, 0.0)  # unknown family not counted
    assert base.cases == len(RISKY) and base.share >= 0.8 and 0.2 <= base.preferred_share <= 0.8
    console = Console(file=io.StringIO())
    settings = ObserveDemoSettings(hard_case_candidates=8)
    start, measured = choose_start(cfg, settings, hard, toy_world["unsafe"], console)
    assert start == "policy" and measured["champion"]["covered"] == 0 and measured["policy"]["share"] >= 0.8
    start, _ = choose_start(cfg, settings, hard, toy_world["good"], console)
    assert start == "champion"
    gap_cfg = cfg.model_copy(update={"models": cfg.models.model_copy(update={"policy": str(toy_world["unsafe"])})})
    start, measured = choose_start(gap_cfg, settings, hard, toy_world["unsafe"], console)
    assert start is None and set(measured) == {"champion", "policy"}
    message = capability_gap_message(settings, measured)
    assert "capability gap" in message and f"champion 0 of {len(RISKY)}" in message and "SFT" in message
    # ... unless the raters write the answer and the demonstration term teaches it: then from the base policy
    taught = ObserveDemoSettings(hard_case_candidates=8, rater_write_rate=1.0, demonstration_coef=0.02)
    start, measured = choose_start(gap_cfg, taught, hard, toy_world["unsafe"], console)
    assert start == "policy" and measured["policy"]["covered"] == 0
    for half in ({"rater_write_rate": 1.0}, {"demonstration_coef": 0.02}):  # either alone does not teach
        assert choose_start(gap_cfg, ObserveDemoSettings(**half), hard, toy_world["unsafe"], console)[0] is None
    assert choose_start(cfg, ObserveDemoSettings(retrain_from="champion"), hard, toy_world["unsafe"], console) == (
        "champion",
        {},
    )


def _fake_week(monkeypatch, tmp_path, verdicts, round_outcomes, max_retrainings):
    """run_week with every heavy part faked: day d's window has ``verdicts[d]`` = (verdict, hard-case prompts);
    the n-th retraining round ends as ``round_outcomes[n]`` ('promoted', 'rejected' or 'capability-gap')."""
    from types import SimpleNamespace

    import preftune.observe as observe_pkg
    import preftune.world.sampling as sampling
    from preftune.config import parse_config
    from preftune.observe import demo_loop

    versions = ["1"]
    monkeypatch.setattr(demo_loop, "_champion_policy", lambda cfg, where: (versions[-1], tmp_path / "policy"))
    monkeypatch.setattr(sampling, "sample_responses", lambda policy, prompts, n, **kw: [["answer"] for _ in prompts])
    monkeypatch.setattr(demo_loop, "log_week", lambda *a, **kw: "run-id")

    def window(cfg, output, now_ms):
        day = int(Path(output).name.removeprefix("day"))  # run_week's <workdir>/windows/dayNN
        verdict, prompts = verdicts.get(day, ("ok", []))
        cases = [{"id": f"observed-{p}", "family": "safety", "prompt": p, "split": "train"} for p in prompts]
        rows = [{"family": "safety", "prompt": p, "behaviour": "unsafe_comply"} for p in prompts]
        window_info = {"model_version": versions[-1]}
        return SimpleNamespace(
            verdict=verdict,
            hard_cases=cases,
            records=rows,
            window=window_info,
            new_prompt_share=0.0,
            mlflow_run_id=f"w{day}",
        )

    monkeypatch.setattr(observe_pkg, "observe_window", window)
    seen = []

    def retrain_round(cfg, settings, hard, version, policy, workdir, console, verbose, rejected):
        prompts = [json.loads(line)["prompt"] for line in hard.read_text().splitlines()]
        seen.append((version, prompts, [r["candidate"] for r in rejected]))
        outcome = round_outcomes[len(seen) - 1]
        info = {"hard_cases": str(hard), "outcome": outcome}
        if outcome == "rejected":  # evaluate judged its candidate: the next round's raters see its answers
            return {**info, "error": outcome, "error_code": 13, "candidate": f"cand-{len(seen)}"}, None, 1.0
        if outcome != "promoted":
            return {**info, "error": outcome, "error_code": 10}, None, 1.0
        versions.append(str(len(versions) + 1))
        return {**info, "version": versions[-1]}, (versions[-1], tmp_path / "policy"), 1.0

    monkeypatch.setattr(demo_loop, "_retrain_round", retrain_round)
    cfg = parse_config({})
    settings = demo_loop.ObserveDemoSettings(per_day=40, max_retrainings=max_retrainings)
    result = demo_loop.run_week(cfg, settings, _Quiet(), tmp_path / "week")
    return result, seen


class _Quiet:
    def print(self, *a, **kw):
        pass


def test_each_flagged_window_starts_the_next_retraining_round_on_the_hard_cases_since_the_champion_began(
    monkeypatch, tmp_path
):
    """max_retrainings: a rejected round leaves the champion serving; the next flagged window's round gets the
    hard cases of both windows (one case per prompt) and the rejected candidate as a further policy for their
    candidates; a promotion starts the evidence afresh; the week's record is the last round, with every round
    listed."""
    verdicts = {
        4: ("regression", ["a", "b"]),
        5: ("regression", ["b", "c"]),
        6: ("drift", ["d"]),
        7: ("regression", ["e"]),
    }
    result, seen = _fake_week(monkeypatch, tmp_path, verdicts, ["rejected", "promoted", "rejected"], 3)
    assert seen == [("1", ["a", "b"], []), ("1", ["a", "b", "c"], ["cand-1"]), ("2", ["d"], [])]  # not on day 7
    assert result.flagged_day == 4
    assert [r["outcome"] for r in result.retrain["rounds"]] == ["rejected", "promoted", "rejected"]
    assert [(r["day"], r["round"]) for r in result.retrain["rounds"]] == [(4, 1), (5, 2), (6, 3)]
    assert result.retrain["outcome"] == "rejected" and result.retrain["round"] == 3
    assert [d.model_version for d in result.days] == ["1"] * 5 + ["2"] * 2
    # the default: one round, as a single scheduled run
    result, seen = _fake_week(monkeypatch, tmp_path / "one", verdicts, ["rejected"], 1)
    assert seen == [("1", ["a", "b"], [])] and result.retrain["outcome"] == "rejected"
    assert len(result.retrain["rounds"]) == 1


def test_a_capability_gap_ends_the_retraining_rounds(monkeypatch, tmp_path):
    verdicts = {4: ("regression", ["a"]), 5: ("regression", ["b"]), 6: ("regression", ["c"])}
    result, seen = _fake_week(monkeypatch, tmp_path, verdicts, ["capability-gap"], 3)
    assert seen == [("1", ["a"], [])]
    assert result.retrain["outcome"] == "capability-gap" and len(result.retrain["rounds"]) == 1


def test_the_week_fails_only_when_no_round_promoted(monkeypatch, tmp_path):
    """A round rejected after an earlier round promoted ends the week with the new champion serving (exit 0, a
    printed note); with no promotion the last round's error is the command's."""
    from preftune.config import parse_config
    from preftune.errors import PreftuneError
    from preftune.observe import demo_loop

    def week(rounds):
        last = dict(rounds[-1])
        retrain = {**last, "rounds": rounds}
        return demo_loop.LoopResult([], 4, retrain, tmp_path / "plot.png", "run", {})

    lines = []

    class Console:
        def print(self, *a, **kw):
            lines.append(" ".join(str(x) for x in a))

        def rule(self, *a, **kw):
            pass

    rejected = {"outcome": "rejected", "error": "rejected: gates failed", "error_code": 13, "round": 3}
    settings = demo_loop.ObserveDemoSettings(per_day=40)
    monkeypatch.setattr(demo_loop, "run_week", lambda *a, **kw: week([{"round": 2, "version": "2"}, rejected]))
    demo_loop.run_observe_demo(parse_config({}), settings, Console(), workdir=tmp_path)
    assert any(
        "round 3 promoted nothing" in line and "v2, promoted by round 2, keeps serving" in line for line in lines
    )
    monkeypatch.setattr(demo_loop, "run_week", lambda *a, **kw: week([rejected]))
    with pytest.raises(PreftuneError, match="promoted nothing: rejected") as err:
        demo_loop.run_observe_demo(parse_config({}), settings, Console(), workdir=tmp_path)
    assert err.value.exit_code == 13
