"""Behaviour suites: the shipped suite is valid, and every bad-input case fails before generation
with the file, the line, the case and the reason."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from test_evaluate_support import SUITE

from preftune.behaviour.suite import load_suite, parse_suite, shipped_suites, thresholds_for
from preftune.config import parse_config
from preftune.errors import ConfigError, ExitCode


def _write(tmp_path, data, name="suite.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _error(tmp_path, data) -> str:
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_suite(str(path))
    assert info.value.exit_code == ExitCode.CONFIG
    return info.value.message


def test_shipped_demo_suite_is_listed_and_valid_without_building_anything():
    assert "demo-v1" in shipped_suites()
    raw = yaml.safe_load(open(load_suite.__globals__["resources"].files("preftune.suites").joinpath("demo-v1.yaml")))
    # the shipped suite reads the demo world's held-out prompts; validate its structure on stand-in cases
    raw["cases_from"] = []
    raw["cases"] = [{"id": f"{f}-1", "family": f, "prompt": "p"} for f in raw["families"]]
    folder = Path(str(load_suite.__globals__["resources"].files("preftune.suites")))
    suite = parse_suite(raw, source_name="demo-v1.yaml", base_dir=folder)
    assert suite.id == "demo-v1"
    # a calibration set for every family, labels by construction (each response's own template behaviour)
    assert {i.family for i in suite.calibration.items} == set(suite.families)
    assert suite.calibration.judge_min_kappa == 0.8
    assert set(suite.families) == {"safety", "high_risk", "benign", "tone"}
    assert suite.families["safety"].forbidden == {"unsafe_comply"}
    assert suite.families["benign"].needless_refusal == {"needless_refusal"}
    assert len(suite.capability) >= 10
    assert suite.generation.samples_per_prompt >= 2


def test_toy_suite_resolves_roles_and_hash_is_stable(tmp_path):
    a = load_suite(str(_write(tmp_path, SUITE)))
    b = load_suite(str(_write(tmp_path, copy.deepcopy(SUITE), "again.yaml")))
    assert a.sha256 == b.sha256 and len(a.sha256) == 64
    case = a.cases[0]
    assert case.family == "risky" and case.preferred == {"decline"} and case.forbidden == {"comply"}
    assert case.roles("decline") == {
        "preferred": True,
        "acceptable": True,
        "forbidden": False,
        "needless_refusal": False,
        "unknown": False,
    }
    changed = copy.deepcopy(SUITE)
    changed["generation"]["seed"] = 8
    assert load_suite(str(_write(tmp_path, changed, "c.yaml"))).sha256 != a.sha256


def test_unknown_judge_names_file_line_family_and_reason(tmp_path):
    data = copy.deepcopy(SUITE)
    data["families"]["risky"]["judge"] = "nosuch"
    msg = _error(tmp_path, data)
    line = next(i for i, text in enumerate((tmp_path / "suite.yaml").read_text().splitlines(), 1) if "nosuch" in text)
    assert f"suite.yaml:{line}:" in msg
    assert "family 'risky'" in msg and "unknown judge 'nosuch'" in msg and "toy-rules" in msg


def test_unknown_judge_type(tmp_path):
    data = copy.deepcopy(SUITE)
    data["judges"]["llm"] = {"type": "gpt-judge"}
    msg = _error(tmp_path, data)
    assert "unknown judge type 'gpt-judge'" in msg and "judges.llm" in msg


def test_empty_family(tmp_path):
    data = copy.deepcopy(SUITE)
    data["families"]["empty"] = {"judge": "toy-rules", "preferred": ["helpful"]}
    msg = _error(tmp_path, data)
    assert "family 'empty' is empty: it has no cases" in msg


def test_forbidden_also_preferred_in_a_case_names_the_case(tmp_path):
    data = copy.deepcopy(SUITE)
    data["cases"][3]["forbidden"] = ["decline"]
    data["cases"][3]["preferred"] = ["decline"]
    msg = _error(tmp_path, data)
    assert "case 'risky-3'" in msg and "'decline' is both forbidden and preferred" in msg
    assert re.search(r"suite\.yaml:\d+: case 'risky-3'", msg)


def test_forbidden_also_preferred_in_a_family(tmp_path):
    data = copy.deepcopy(SUITE)
    data["families"]["benign"]["forbidden"] = ["helpful"]
    msg = _error(tmp_path, data)
    assert "family 'benign': behaviour 'helpful' is both forbidden and preferred" in msg


def test_missing_classifier_model_path(tmp_path):
    data = copy.deepcopy(SUITE)
    data["judges"]["clf"] = {"type": "classifier", "path": "models/behaviour-clf"}
    data["families"]["benign"]["judge"] = "clf"
    msg = _error(tmp_path, data)
    assert "judge 'clf': classifier model path 'models/behaviour-clf' does not exist" in msg


def test_reward_judge_needs_a_path_or_the_runs_reward_model(tmp_path):
    data = copy.deepcopy(SUITE)
    data["judges"]["rm"] = {"type": "reward", "above": "helpful", "below": "refuse"}
    data["families"]["benign"]["judge"] = "rm"
    msg = _error(tmp_path, data)
    assert "a reward judge needs a path, or evaluation.reward_model" in msg


def test_every_problem_is_reported_at_once(tmp_path):
    data = copy.deepcopy(SUITE)
    data["judges"]["toy-rules"]["behaviours"]["decline"]["all"] = ["(unclosed"]
    data["cases"].append({"id": "risky-0", "family": "risky", "prompt": "dup"})
    data["cases"].append({"id": "x-1", "family": "nofamily", "prompt": "p"})
    data["families"]["risky"]["preferred"] = ["declien"]
    msg = _error(tmp_path, data)
    assert "not a valid regular expression" in msg
    assert "case 'risky-0': duplicate case id" in msg
    assert "case 'x-1': unknown family 'nofamily'" in msg
    assert "preferred behaviour 'declien' is not among the family's behaviours: ['comply', 'decline']" in msg


def test_structural_errors_name_the_case_id(tmp_path):
    data = copy.deepcopy(SUITE)
    del data["cases"][2]["prompt"]
    data["cases"][4]["colour"] = "red"
    msg = _error(tmp_path, data)
    assert "case 'risky-2' (cases[2]): prompt: Field required" in msg
    assert "case 'risky-4' (cases[4]): colour: unknown field" in msg


def test_cases_from_jsonl_with_bad_lines(tmp_path):
    good = {"id": "inc-1", "family": "benign", "prompt": "Please help me knit ."}
    (tmp_path / "more.jsonl").write_text(
        json.dumps(good) + "\n{not json\n" + json.dumps({"id": "inc-2", "family": "risky"}) + "\n"
    )
    data = copy.deepcopy(SUITE)
    data["cases_from"] = ["more.jsonl"]
    msg = _error(tmp_path, data)
    assert f"{tmp_path / 'more.jsonl'}:2: not valid JSON" in msg
    assert f"{tmp_path / 'more.jsonl'}:3: case 'inc-2': needs a non-empty string 'prompt'" in msg
    (tmp_path / "more.jsonl").write_text(json.dumps(good) + "\n")
    suite = load_suite(str(_write(tmp_path, data)))
    assert suite.cases[-1].id == "inc-1" and suite.cases[-1].preferred == {"helpful"}


def test_missing_suite_file_and_unknown_shipped_name(tmp_path):
    with pytest.raises(ConfigError, match="suite file not found"):
        load_suite(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="no shipped suite of that name"):
        load_suite("demo-v99")


def test_config_thresholds_override_suite_and_unknown_family_fails(tmp_path):
    suite = load_suite(str(_write(tmp_path, SUITE)))
    cfg = parse_config(
        {
            "evaluation": {
                "gates": {
                    "every_family": {"unknown_share": {"max": 0.3}},
                    "thresholds": {"risky": {"forbidden_share": {"max": 0.01}}},
                }
            }
        }
    )
    eff = thresholds_for(suite, cfg.evaluation.gates)
    assert eff["risky"]["forbidden_share"].max == 0.01  # config wins over the suite's 0.1
    assert eff["benign"]["needless_refusal_share"].max == 0.2  # suite's own
    assert eff["benign"]["unknown_share"].max == 0.3 and eff["risky"]["unknown_share"].max == 0.3
    bad = parse_config({"evaluation": {"gates": {"thresholds": {"riksy": {"forbidden_share": {"max": 0.1}}}}}})
    with pytest.raises(ConfigError, match="has no family 'riksy'"):
        thresholds_for(suite, bad.evaluation.gates)


def test_run_config_rejects_unknown_gate_metrics():
    with pytest.raises(ConfigError, match="unknown metric"):
        parse_config({"evaluation": {"gates": {"thresholds": {"safety": {"forbiden_share": {"max": 0.1}}}}}})
    with pytest.raises(ConfigError, match="not a comparable metric"):
        parse_config({"evaluation": {"gates": {"non_regression": {"response_length": 1.0}}}})
    with pytest.raises(ConfigError, match="min 0.5 is above max 0.1"):
        parse_config({"evaluation": {"gates": {"thresholds": {"all": {"unknown_share": {"min": 0.5, "max": 0.1}}}}}})


def test_the_documented_example_is_a_valid_suite(tmp_path):
    """docs/suites.md's format example parses, once the files it names exist."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "suites.md").read_text()
    example = re.search(r"```yaml\n(format: preftune\.suite.*?)```", doc, flags=re.S).group(1)
    (tmp_path / "models" / "tone-classifier").mkdir(parents=True)
    (tmp_path / "rm").mkdir()
    (tmp_path / "more-cases.jsonl").write_text(json.dumps({"id": "s-2", "family": "safety", "prompt": "p"}) + "\n")
    path = tmp_path / "example.yaml"
    path.write_text(example)
    suite = load_suite(str(path), reward_model=str(tmp_path / "rm"))
    assert suite.id == "support-bot-v2" and [c.id for c in suite.cases] == ["safety-001", "s-2"]
    assert set(suite.judges) == {"refusal-rules", "tone-clf", "rm", "world"}
