"""Done-when of the pilot on the demo world: go for safety and high-risk, needs data (contested) for tone; with a
reward model trained on shuffled labels, no-go with the reward-model red flag (exit 11).

One module-scoped pilot (about 40 s on 2 idle cores) and one with the broken reward model through the CLI.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from preftune.config import parse_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pilot(tmp_path_factory):
    from preftune.pilot.run import run_pilot
    from preftune.world import ensure_world

    ensure_world()
    root = tmp_path_factory.mktemp("pilot")
    data = {
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "pilot-test"},
        "ppo": {"progress": False},
        "run": {"name": "pilot-test"},
    }
    cfg = parse_config(data)
    report = run_pilot(cfg, str(root / "out"))
    return cfg, data, root, report


def test_demo_world_pilot_says_go_for_safety_and_high_risk_and_needs_data_for_tone(pilot):
    cfg, _, root, report = pilot
    fams = report["families"]
    assert fams["safety"]["verdict"] == "go" and fams["high_risk"]["verdict"] == "go", report["families"]
    assert fams["tone"]["verdict"] == "needs data" and fams["tone"]["fit_verdict"] == "contested"
    assert "contested" in fams["tone"]["reason"]
    assert report["verdict"] == "go" and report["exit_code"] == 0
    for f in ("safety", "high_risk"):
        ps = fams[f]["preferred_share"]
        assert ps["change"]["ci_low"] > 0 and ps["after"]["value"] > ps["before"]["value"]
        assert fams[f]["reward_accuracy"] >= cfg.pilot.reward_near_chance
        assert fams[f]["trend"] in ("still moving", "flat", "reversing")
    flags = {(fl["flag"], fl["family"]) for fl in report["red_flags"]}
    assert ("low_agreement", "tone") in flags
    assert not any(fl["flag"] == "reward_near_chance" for fl in report["red_flags"])
    cost = report["cost"]
    assert cost["measured"]["ppo_seconds_per_update"] > 0 and cost["measured"]["ppo_tokens_per_s"] > 0
    assert cost["full_run"]["hours"] > 0 and len(cost["assumptions"]) >= 4
    bon = report["best_of_n"]  # measured with the real models: best-of-1..16 beside the pilot's PPO policy
    assert [p["n"] for p in bon["curve"]] == [1, 2, 4, 8, 16], bon
    assert bon["curve"][-1]["reward"] > bon["curve"][0]["reward"] and bon["policy"]["kl"] > 0
    assert bon["comparison"]["beats"] in (True, False, None) and bon["comparison"]["detail"]


def test_report_files_and_mlflow_artifacts(pilot):
    from mlflow import MlflowClient

    cfg, _, root, report = pilot
    out = root / "out"
    on_disk = json.loads((out / "pilot.json").read_text())
    assert on_disk["families"]["safety"]["verdict"] == "go"
    md, page = (out / "pilot.md").read_text(), (out / "pilot.html").read_text()
    assert md.startswith("# Pilot: GO") and "## Red flags" in md and "## Cost of the full run" in md
    assert "<table>" in page and "class='go'" in page and "Assumptions" in page
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(report["mlflow_run_id"])
    assert run.data.tags["preftune.step"] == "pilot" and run.data.tags["preftune.pilot.verdict"] == "go"
    assert run.data.metrics["pilot.safety.go"] == 1.0 and run.data.metrics["pilot.tone.go"] == 0.0
    assert {a.path for a in client.list_artifacts(run.info.run_id, "pilot")} == {
        "pilot/pilot.json",
        "pilot/pilot.md",
        "pilot/pilot.html",
    }
    assert not client.search_model_versions(f"name='{cfg.models.registered_model}'")  # a pilot promotes nothing


def _shuffled_dataset(src: Path, dst: Path, seed: int) -> Path:
    """A copy of a dataset whose training pairs have chosen/rejected swapped at random (held-out pairs kept)."""
    import shutil

    shutil.copytree(src, dst)
    rng = random.Random(seed)
    rows = [json.loads(line) for line in (src / "train.jsonl").read_text().splitlines() if line.strip()]
    for r in rows:
        if rng.random() < 0.5:
            r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
    (dst / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


def test_reward_model_trained_on_shuffled_labels_gives_no_go_with_the_reward_flag(pilot, capsys):
    from preftune.cli import main
    from preftune.reward.step import train_reward

    cfg, data, root, _ = pilot
    shuffled = _shuffled_dataset(root / "out" / "steps" / "fit", root / "shuffled", seed=7)
    broken = root / "broken-rm"
    rm_cfg = cfg.model_copy(deep=True)
    rm_cfg.reward.min_accuracy = 0.0
    rm_cfg.reward.gate.enabled = False  # publish the broken control anyway
    res = train_reward(rm_cfg, shuffled, broken, progress=False)
    assert res.eval_accuracy < cfg.pilot.reward_near_chance  # the control really is broken

    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SystemExit) as exc:
        main(["pilot", "--config", str(path), "--reward-model", str(broken), "--output", str(root / "broken")])
    captured = capsys.readouterr()
    assert exc.value.code == 11, captured.out[-3000:] + captured.err[-2000:]
    assert captured.err.strip().splitlines()[-1].startswith("error: pilot says no-go for every family")
    report = json.loads((root / "broken" / "pilot.json").read_text())
    assert report["verdict"] == "no-go"
    assert any(fl["flag"] == "reward_near_chance" and fl["blocking"] for fl in report["red_flags"])
    for f in ("safety", "high_risk"):
        assert report["families"][f]["verdict"] == "no-go"
        assert "chance" in report["families"][f]["reason"]
    assert "reward_near_chance" in (root / "broken" / "pilot.md").read_text()
