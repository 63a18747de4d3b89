"""The real pipeline with kfp's local runner: six steps as local processes, one MLflow tree, the step cache.

Slow (a few minutes on 2 cores): a shortened run config on the demo world (a slice of the
prompts, two candidates, one reward epoch, two PPO updates, a six-case suite) runs end to end
and promotes; the same config again is served from the step cache up to ppo, and only evaluate
and promote run. The bad-input tests are fast: they fail before any step runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from preftune.config import load_config

CACHED = ["collect", "check-fit", "train-reward", "ppo"]


def small_suite(path: Path, prompts_eval: Path, per_family: int = 3) -> Path:
    """A six-case suite on the world's held-out prompts (the shipped demo-v1 has 21 cases x 4 samples)."""
    cases, seen = [], {}
    for line in prompts_eval.read_text().splitlines():
        r = json.loads(line)
        if r["family"] in ("safety", "benign") and seen.get(r["family"], 0) < per_family:
            seen[r["family"]] = seen.get(r["family"], 0) + 1
            cases.append({"id": r["id"], "family": r["family"], "prompt": r["prompt"]})
    suite = {
        "format": "preftune.suite",
        "name": "pipeline-test",
        "version": 1,
        "generation": {"seed": 3, "samples_per_prompt": 2, "max_new_tokens": 24, "batch_size": 32},
        "judges": {"world": {"type": "demo"}},
        "families": {
            "safety": {"judge": "world", "preferred": ["explain_decline"], "forbidden": ["unsafe_comply"]},
            "benign": {"judge": "world", "preferred": ["helpful"], "needless_refusal": ["needless_refusal"]},
        },
        "cases": cases,
    }
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def small_config(root: Path, **overrides: Any) -> Path:
    """A shortened run config on the demo world with its own MLflow store under ``root``."""
    from preftune.config import RunConfig
    from preftune.world import ensure_world

    paths = ensure_world(RunConfig().world, progress=False)
    suite = small_suite(root / "suite.yaml", Path(paths.prompts_eval))
    data: dict[str, Any] = {
        "run": {"name": "pipeline-test"},
        "data": {"prompt_fraction": 0.15, "generation": {"n_candidates": 2, "max_new_tokens": 24}},
        "fit": {"bootstrap_resamples": 200},
        "reward": {"epochs": 1, "min_accuracy": 0.0, "gate": {"enabled": False}},  # a 1-epoch model: no gate
        "ppo": {
            "updates": 2,
            "batch_size": 8,
            "mini_batch_size": 4,
            "max_new_tokens": 16,
            "ppo_epochs": 1,
            "progress": False,
            "log_model": False,
            "samples_per_table": 2,
        },
        "evaluation": {"suite": str(suite), "bootstrap_resamples": 200},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "pipeline-test"},
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _runs_of(uri: str, pipeline_run_id: str) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("pipeline-test")
    return client.search_runs(
        [exp.experiment_id], f"tags.`preftune.pipeline_run_id` = '{pipeline_run_id}'", max_results=100
    )


def _describe(result: Any) -> str:
    tail = "\n".join(Path(result.log_path).read_text().splitlines()[-40:])
    return f"outcome: {json.dumps(result.outcome, default=str)[:3000]}\nlog tail:\n{tail}"


@pytest.mark.slow
def test_local_run_promotes_in_one_mlflow_tree_then_reuses_the_step_cache(tmp_path):
    from mlflow import MlflowClient
    from preftune.pipelines.local import run_local

    cfg = load_config(small_config(tmp_path))
    uri = cfg.tracking.uri
    first = run_local(cfg, root=tmp_path / "pipelines")
    assert first.outcome is not None, _describe(first)
    o = first.outcome
    assert (o["outcome"], o["exit_code"]) == ("promoted", 0), _describe(first)
    steps = o["steps"]
    assert [steps[s]["status"] for s in steps] == ["ok"] * 6
    assert not any(s["cached"] for s in steps.values())
    assert steps["check-fit"]["outputs"]["verdicts"]["tone"]["verdict"] == "contested"  # the contested family
    assert steps["check-fit"]["outputs"]["fit"] is True
    assert 0.0 <= steps["train-reward"]["outputs"]["accuracy"] <= 1.0
    assert steps["ppo"]["outputs"]["updates"] == 2
    assert str(steps["promote"]["outputs"]["version"]) == "1"
    assert set(first.task_seconds) == {"open-run", *steps, "close-run"}

    # MLflow: one parent run per pipeline run, a nested run per step, all tagged with the run id
    runs = _runs_of(uri, first.pipeline_run_id)
    by_step = {r.data.tags["preftune.step"]: r for r in runs}
    assert sorted(by_step) == sorted(["pipeline", *steps])
    parent = by_step.pop("pipeline")
    assert parent.info.status == "FINISHED" and parent.data.tags["preftune.outcome"] == "promoted"
    assert parent.data.tags["preftune.snapshot"].startswith("snap-")
    for step, r in by_step.items():
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id, step
        assert r.data.tags["preftune.config_hash"] == cfg.config_hash() or step == "ppo", step
        assert r.data.tags["preftune.pipeline_config_hash"] == cfg.config_hash(), step
    client = MlflowClient(uri)
    assert str(client.get_model_version_by_alias(cfg.models.registered_model, "champion").version) == "1"

    # the same config and data again: the cache serves collect .. ppo; evaluate and promote run again
    second = run_local(cfg, root=tmp_path / "pipelines")
    o2 = second.outcome
    assert o2 is not None, _describe(second)
    assert sorted(second.cached_tasks) == sorted(CACHED), _describe(second)
    assert [s for s in CACHED if o2["steps"][s]["cached"]] == CACHED
    assert o2["steps"]["collect"]["outputs"]["dataset_hash"] == steps["collect"]["outputs"]["dataset_hash"]
    assert o2["steps"]["collect"]["computed_in"] == first.pipeline_run_id
    assert not o2["steps"]["evaluate"]["cached"] and o2["steps"]["evaluate"]["status"] in ("ok", "stopped")
    runs2 = {r.data.tags["preftune.step"] for r in _runs_of(uri, second.pipeline_run_id)}
    assert runs2 == {"pipeline", "evaluate", "promote"}  # cached steps open no MLflow run
    # the second evaluation compared with the champion the first run promoted
    assert str(o2["steps"]["evaluate"]["outputs"]["champion_version"]) == "1"
    if o2["outcome"] == "promoted":
        assert str(o2["steps"]["promote"]["outputs"]["previous"]) == "1"
    else:  # a rejected candidate leaves the champion where it was
        assert str(client.get_model_version_by_alias(cfg.models.registered_model, "champion").version) == "1"


def cli(*args: str) -> int:
    from preftune.cli import main

    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _no_step_ran(home: Path) -> bool:
    logs = home / "pipelines" / "logs"
    return not logs.exists() or not any(logs.iterdir())


@pytest.fixture()
def fresh_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("PREFTUNE_HOME", str(home))
    return home


def test_missing_model_path_fails_before_any_step(tmp_path, fresh_home, capsys):
    path = _write(tmp_path, {"models": {"policy": str(tmp_path / "no-such-model")}})
    assert cli("run", "--config", str(path)) == 3
    err = capsys.readouterr().err
    assert "models.policy" in err and "no-such-model" in err and "Traceback" not in err
    assert _no_step_ran(fresh_home)


def test_gpus_on_the_local_runner_fail_before_any_step_naming_the_fix(tmp_path, fresh_home, capsys):
    path = _write(tmp_path, {"kubernetes": {"steps": {"ppo": {"gpus": 2}}}})
    assert cli("run", "--config", str(path)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "kubernetes.steps.ppo.gpus is 2" in err and "set kubernetes.steps.ppo.gpus to 0" in err and "--host" in err
    assert _no_step_ran(fresh_home)


def test_unreachable_tracking_server_fails_before_any_step(tmp_path, fresh_home, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = _write(tmp_path, {"tracking": {"uri": f"http://127.0.0.1:{port}", "timeout_s": 2}})
    assert cli("run", "--config", str(path)) == 4
    assert f"127.0.0.1:{port}" in capsys.readouterr().err
    assert _no_step_ran(fresh_home)


def test_missing_suite_file_fails_before_any_step(tmp_path, fresh_home, capsys):
    path = _write(tmp_path, {"evaluation": {"suite": str(tmp_path / "suite.yaml")}})
    assert cli("run", "--config", str(path)) == 3
    assert "evaluation.suite" in capsys.readouterr().err
    assert _no_step_ran(fresh_home)


def test_tasks_import_the_installed_preftune_even_from_a_folder_holding_a_preftune_source_tree(tmp_path):
    """`pip install .` then `preftune demo` inside the clone: the clone's preftune/ (which has no
    preftune.components) must not shadow the installed package in the task processes."""
    import os
    import subprocess
    import sys

    from preftune.pipelines.local import TASK_ENV

    (tmp_path / "preftune").mkdir()
    (tmp_path / "preftune" / "__init__.py").write_text("SHADOW = True\n")
    code = "import preftune, preftune.components; assert not hasattr(preftune, 'SHADOW'), preftune.__file__"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, **TASK_ENV}, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
