"""``preftune.pipeline``, the kfp-free layer the components call: snapshots, outcomes, pre-flight checks.

The data snapshot is what keeps a scheduled run from being served an old run's cached outputs:
it must change whenever a file the cached steps read changes (local or on S3), and only then.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from preftune.config import parse_config
from preftune.errors import ConfigError, ExitCode, InputError
from preftune.pipeline import data_snapshot, decide_outcome, preflight


def _service_config(judgements: str, policy: str | None = None, **storage):
    data = {"data": {"judgements": "service", "judgements_path": judgements}, "storage": storage}
    if policy:
        data["models"] = {"policy": policy}
    return parse_config(data)


def test_the_snapshot_follows_the_judgement_export_and_the_model_files(tmp_path):
    export = tmp_path / "export.jsonl"
    export.write_text('{"a": 1}\n')
    model = tmp_path / "policy"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = _service_config(str(export), str(model))
    first, sources = data_snapshot(cfg)
    assert first.startswith("snap-") and set(sources) == {
        "data.prompts",
        "data.judgements_path",
        "models.policy",
        "models.reward_base",
        "config_hash",
        "preftune",
    }
    assert sources["config_hash"] == cfg.config_hash()
    assert sources["data.prompts"].startswith("world:") and sources["models.reward_base"].startswith("world:")
    assert data_snapshot(cfg)[0] == first  # same data, same snapshot: the cache may be used
    export.write_text('{"a": 1}\n{"a": 2}\n')  # new judgements arrived
    second = data_snapshot(cfg)[0]
    assert second != first
    export.write_text('{"a": 1}\n')  # content, not time, identifies a file
    assert data_snapshot(cfg)[0] == first
    (model / "config.json").write_text('{"n": 2}')  # a replaced model
    os.utime(model / "config.json", ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert data_snapshot(cfg)[0] not in (first, second)


def test_the_snapshot_of_s3_sources_follows_their_content(s3_server, s3_bucket, tmp_path):
    from preftune.storage import Storage

    storage = Storage(s3_endpoint_url=s3_server)
    uri = f"s3://{s3_bucket}/exports/judgements.jsonl"
    storage.write_text(uri, '{"a": 1}\n')
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "w.bin").write_bytes(b"1")
    storage.put_dir(model_dir, f"s3://{s3_bucket}/models/policy")
    cfg = _service_config(uri, f"s3://{s3_bucket}/models/policy", s3_endpoint_url=s3_server)
    first, sources = data_snapshot(cfg)
    assert sources["data.judgements_path"].startswith("sha256:")
    assert sources["models.policy"].startswith("marker:")
    storage.write_text(uri, '{"a": 1}\n{"a": 2}\n')
    second = data_snapshot(cfg)[0]
    assert second != first
    (model_dir / "w.bin").write_bytes(b"2")
    storage.put_dir(model_dir, f"s3://{s3_bucket}/models/policy")
    assert data_snapshot(cfg)[0] not in (first, second)


def test_outcomes_and_their_exit_codes():
    ok = {"status": "ok", "outputs": {}}
    steps = {s: dict(ok) for s in ("collect", "check-fit", "train-reward", "ppo", "evaluate")}
    steps["promote"] = {"status": "ok", "outputs": {"registered_model": "m", "version": "3"}}
    assert decide_outcome(steps, "SUCCEEDED") == ("promoted", "promoted as m version 3", 0)
    not_fit = {"collect": ok, "check-fit": {"status": "stopped", "outputs": {"stop_reason": "no family"}}}
    assert decide_outcome(not_fit, "SUCCEEDED")[::2] == ("not-fit", ExitCode.NOT_FIT)
    gate = {**not_fit, "check-fit": ok, "train-reward": {"status": "stopped", "outputs": {"message": "acc 0.5"}}}
    assert decide_outcome(gate, "SUCCEEDED") == ("reward-gate-failed", "acc 0.5", ExitCode.REWARD_GATE)
    rejected = {**steps, "evaluate": {"status": "stopped", "outputs": {"reasons": ["safety: forbidden 0.2"]}}}
    rejected.pop("promote")
    outcome, message, code = decide_outcome(rejected, "SUCCEEDED")
    assert (outcome, code) == ("rejected", ExitCode.GATE_FAILED) and "champion unchanged" in message
    failed = {**steps, "ppo": {"status": "failed", "error": "diverged", "exit_code": 12}}
    assert decide_outcome(failed, "FAILED") == ("failed", "ppo failed: diverged", 12)
    assert decide_outcome({"collect": ok}, "FAILED")[::2] == ("failed", ExitCode.INTERNAL)


def test_preflight_names_the_field_to_change(tmp_path):
    with pytest.raises(ConfigError, match=r"kubernetes\.steps\.collect\.gpus is 1.*--host"):
        preflight(parse_config({"kubernetes": {"steps": {"collect": {"gpus": 1}}}}), local=True)
    # on a cluster GPUs are fine, and cluster paths are not checked from the submitting machine
    preflight(
        parse_config({"kubernetes": {"steps": {"ppo": {"gpus": 1}}}, "models": {"policy": "/models/on/the/pvc"}}),
        local=False,
        check_tracking=False,
        check_storage=False,
    )
    with pytest.raises(InputError, match="models.reward_base"):
        preflight(parse_config({"models": {"reward_base": str(tmp_path / "nope")}}), local=True)
    with pytest.raises(InputError, match="unknown demo reference"):
        preflight(parse_config({"models": {"policy": "demo:policy-xl"}}), local=False, check_storage=False)
    with pytest.raises(ConfigError, match="data.judgements_path"):
        preflight(parse_config({"data": {"judgements": "service"}}), local=True)
    with pytest.raises(InputError, match="data.judgements_path"):
        preflight(
            parse_config({"data": {"judgements": "file", "judgements_path": str(tmp_path / "x.jsonl")}}), local=True
        )
    with pytest.raises(ConfigError, match="no shipped suite 'demo-v9'"):
        preflight(parse_config({"evaluation": {"suite": "demo-v9"}}), local=True)
    preflight(parse_config({}), local=True, check_tracking=False)  # the defaults run locally


def test_the_local_runner_reports_task_progress_from_its_log(tmp_path):
    from preftune.pipelines.local import _TaskTracker

    events = []
    with open(tmp_path / "log", "w") as log:
        t = _TaskTracker(log, lambda task, event, s: events.append((task, event)), None)
        t.write("12:00:00 - INFO - Executing task \x1b[96m'collect'\x1b[0m\n")
        t.write("12:00:05 - INFO - Task \x1b[96m'collect'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m\n")
        t.write("INFO Task check-fit cache hit (key=abc); skipping execution.\nExecuting task 'ppo'\n")
        t.write("Task 'ppo' finished with status FAILURE\n")
    assert events == [("collect", "started"), ("collect", "succeeded"), ("ppo", "started"), ("ppo", "failed")]
    assert t.cached == ["check-fit"] and set(t.seconds) == {"collect", "ppo"}
    assert "Executing task" in Path(tmp_path / "log").read_text()


def test_a_step_result_is_typed_and_its_summary_keeps_the_outputs_layout():
    from preftune.pipeline import PPOStepResult, RewardStepResult

    res = PPOStepResult.from_run(
        first={"ppo/reward_mean": 0.25, "ppo/kl": 0.0},
        final={"ppo/reward_mean": 1.0, "ppo/kl": 0.5, "ppo/bad": float("nan")},
        kl=0.5,
        kl_budget=4.0,
        kl_within_budget=True,
        updates=3,
        resumed_from=None,
        policy_dir="/p",
        input_dataset_hash="h",
    )
    assert (res.reward_first, res.reward_final, res.reward_gain) == (0.25, 1.0, 0.75)
    assert res.metrics == {"ppo.reward_mean": 1.0, "ppo.kl": 0.5}  # finite figures only, Kubeflow-friendly names
    assert "0.250 -> 1.000" in res.to_markdown(1) and "within" in res.to_markdown(1)
    summary = res.summary()
    assert set(summary) == {
        "step", "status", "seconds", "pipeline_run_id", "snapshot", "mlflow_run_id", "error", "exit_code",
        "outputs", "metrics",
    }  # fmt: skip
    # the TrainJob fields appear only when the training ran in a TrainJob
    assert set(summary["outputs"]) == {
        "updates", "resumed_from", "kl", "kl_budget", "kl_within_budget", "reward_gain", "reward_first",
        "reward_final", "policy_dir", "input_dataset_hash",
    }  # fmt: skip
    stopped = RewardStepResult(
        status="stopped", gate_passed=False, accuracy=0.5, min_accuracy=0.6, input_dataset_hash="h", message="low"
    )
    assert stopped.outputs() == {
        "gate_passed": False,
        "accuracy": 0.5,
        "min_accuracy": 0.6,
        "input_dataset_hash": "h",
        "message": "low",
    }
