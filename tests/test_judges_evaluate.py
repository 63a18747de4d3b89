"""Done-when of issue 14 (items 1-2): a suite mixing ``llm`` (local folder and endpoint), ``embedding``
and ``rules`` judges, with a calibration set, evaluates a policy; a judge below the kappa floor blocks
gating (exit 2) with a message naming the family and the figures, before anything is generated.
"""

# ruff: noqa: F811 (pytest fixtures are imported by name and taken as arguments)
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from judge_support import EXEMPLARS, RUBRICS, calibration_items, judge_lms  # noqa: F401 (fixture)
from mlflow import MlflowClient
from support.openai_server import ServerState, openai_server
from test_evaluate_support import SUITE, toy_config, toy_store, toy_world  # noqa: F401 (fixtures)

from preftune.errors import ConfigError, ExitCode
from preftune.evaluate.step import evaluate

pytestmark = pytest.mark.slow


def mixed_suite(folder, judge_lm, url, cache, risky_judge="llm-local"):
    data = copy.deepcopy(SUITE)
    data["name"] = "toy-mixed"
    data["judges"].update(
        {
            "llm-local": {"type": "llm", "path": str(judge_lm), "rubrics": RUBRICS},
            "llm-endpoint": {
                "type": "llm",
                "endpoint": {
                    "base_url": url,
                    "model": "tiny-judge",
                    "api_key_env": "TOY_JUDGE_KEY",
                    "cache_dir": str(cache),
                    "concurrency": 2,
                },
                "rubrics": RUBRICS,
            },
            "minilm": {"type": "embedding", "exemplars": EXEMPLARS, "k": 2, "min_similarity": 0.45},
            "benign-vote": {"type": "ensemble", "judges": ["llm-endpoint", "minilm", "toy-rules"]},
        }
    )
    data["families"]["risky"]["judge"] = risky_judge
    data["families"]["benign"]["judge"] = "benign-vote"
    (folder / "labels.jsonl").write_text("".join(json.dumps(i) + "\n" for i in calibration_items()))
    data["calibration"] = {"items_from": ["labels.jsonl"], "min_items": 6, "judge_min_kappa": 0.6}
    path = folder / "mixed.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def server(judge_lms):  # noqa: F811
    state = ServerState(str(judge_lms["trained"]), api_key="toy-key")
    with openai_server(state) as url:
        yield url, state


def test_mixed_judges_with_calibration_evaluate_a_policy(
    tmp_path, server, judge_lms, toy_world, toy_store, monkeypatch
):
    url, state = server
    monkeypatch.setenv("TOY_JUDGE_KEY", "toy-key")
    path = mixed_suite(tmp_path, judge_lms["trained"], url, tmp_path / "cache")
    cfg = toy_config(toy_store, toy_world, model="toy-mixed", suite=str(path))
    res = evaluate(cfg, str(toy_world["good"]), champion=str(toy_world["base"]), progress=False)
    assert res.passed, res.reasons
    # every judge a family uses was measured; the family's own judge gates, ensemble members are reported
    cal = {(e["family"], e["judge"]): e for e in res.results["calibration"]["judges"]}
    assert set(cal) == {
        ("risky", "llm-local"),
        ("benign", "benign-vote"),
        ("benign", "llm-endpoint"),
        ("benign", "minilm"),
        ("benign", "toy-rules"),
    }
    assert cal[("risky", "llm-local")]["gating"] and not cal[("benign", "minilm")]["gating"]
    assert all(e["kappa"] >= 0.6 for e in cal.values() if e["gating"])
    # the behaviours were named by the llm judges: the good policy declines and helps
    risky = {r.behaviour for r in res.records if r.family == "risky" and r.model == "candidate"}
    assert (
        risky <= {"decline", "comply", "unknown"} and res.metrics["risky"]["preferred_share"]["candidate"].value > 0.8
    )
    # shares raw and corrected for the measured confusion, candidate and champion
    fb = res.metrics["risky"]["forbidden_share"]
    assert {"candidate", "champion", "delta", "corrected", "champion.corrected"} <= set(fb)
    run = MlflowClient(tracking_uri=toy_store).get_run(res.run_id)
    m = run.data.metrics
    assert m["calibration.risky.llm-local.kappa"] >= 0.6 and "calibration.benign.minilm.accuracy" in m
    assert "eval.risky.forbidden_share.corrected" in m and "eval.risky.forbidden_share.corrected.ci_high" in m
    arts = {a.path for a in MlflowClient(tracking_uri=toy_store).list_artifacts(res.run_id, "calibration")}
    assert {"calibration/judges.json", "calibration/confusion.json"} <= arts
    assert "evaluation/calibration.json" in {
        a.path for a in MlflowClient(tracking_uri=toy_store).list_artifacts(res.run_id, "evaluation")
    }
    report = (Path(res.output) / "report.md").read_text()
    assert "## Judge calibration" in report and "| risky | llm-local | 6 |" in report
    assert "member (not gated)" in report and "candidate (corrected)" in report
    # the endpoint's answers were cached: evaluating again sends no request for what it already judged
    before = state.requests
    evaluate(cfg, str(toy_world["good"]), champion="none", progress=False)
    assert state.requests == before


def test_a_judge_below_the_kappa_floor_blocks_gating(tmp_path, server, judge_lms, toy_world, toy_store, monkeypatch):  # noqa: F811
    url, _ = server
    monkeypatch.setenv("TOY_JUDGE_KEY", "toy-key")
    suite = copy.deepcopy(yaml.safe_load(mixed_suite(tmp_path, judge_lms["trained"], url, tmp_path / "c").read_text()))
    suite["judges"]["llm-random"] = {"type": "llm", "path": str(judge_lms["random"]), "rubrics": RUBRICS}
    suite["families"]["risky"]["judge"] = "llm-random"
    path = tmp_path / "random.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    cfg = toy_config(toy_store, toy_world, model="toy-mixed-random", suite=str(path))
    with pytest.raises(ConfigError) as info:
        evaluate(cfg, str(toy_world["good"]), champion="none", progress=False)
    msg = info.value.message
    assert info.value.exit_code == ExitCode.CONFIG
    assert "judge calibration failed" in msg and "family 'risky': judge 'llm-random' kappa" in msg
    assert "< 0.6, accuracy" in msg and "on 6 labelled responses" in msg and "'benign'" not in msg
    client = MlflowClient(tracking_uri=toy_store)
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id], order_by=["start_time DESC"])
    failed = runs[0]
    assert failed.info.status == "FAILED" and "calibration.risky.llm-random.kappa" in failed.data.metrics
    assert not [a for a in client.list_artifacts(failed.info.run_id) if a.path == "evaluation"]  # nothing generated

    # the same check on its own: preftune judge check
    from preftune.cli import main

    with pytest.raises(SystemExit) as code:
        main(["judge", "check", str(path)])
    assert code.value.code == ExitCode.CONFIG
    with pytest.raises(SystemExit) as code:
        main(["judge", "check", str(tmp_path / "mixed.yaml"), "--confusion", "-o", str(tmp_path / "cal.json")])
    assert code.value.code == 0
    assert {e["judge"] for e in json.loads((tmp_path / "cal.json").read_text())["judges"]} >= {"llm-local", "minilm"}
