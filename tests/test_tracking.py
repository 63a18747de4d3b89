"""MLflow tracking: names, tags and nesting, on SQLite and on a real mlflow server backed by PostgreSQL."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from support.mlflow_server import free_port

from preftune import tracking
from preftune.config import parse_config
from preftune.errors import ExitCode, UnreachableError


def _exercise(cfg, uri):
    with tracking.start_pipeline_run(cfg, pipeline_id="pipe-123") as parent:
        with tracking.start_step_run("collect", cfg, params={"extra": 1}) as child:
            mlflow.log_metric("collect.pairs", 42)
            mlflow.log_text("hello", "notes/hello.txt")
        parent_id, child_id = parent.info.run_id, child.info.run_id
    client = MlflowClient(tracking_uri=uri)
    parent_run, child_run = client.get_run(parent_id), client.get_run(child_id)
    return client, parent_run, child_run


def _check_tags(cfg, parent_run, child_run):
    tags = child_run.data.tags
    assert tags[tracking.TAG_STEP] == "collect"
    assert tags[tracking.TAG_PIPELINE_RUN_ID] == "pipe-123"
    assert tags[tracking.TAG_CONFIG_HASH] == cfg.config_hash()
    assert tags[tracking.TAG_GIT_SHA]
    assert tags["mlflow.parentRunId"] == parent_run.info.run_id
    assert child_run.info.run_name == f"{cfg.run.name}/collect"
    assert parent_run.data.tags[tracking.TAG_STEP] == "pipeline"
    assert child_run.data.params["extra"] == "1"
    assert child_run.data.params["run.seed"] == str(cfg.run.seed)
    assert child_run.data.metrics["collect.pairs"] == 42
    assert child_run.info.status == "FINISHED" and parent_run.info.status == "FINISHED"


def test_sqlite_default_store_under_home(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # set process-wide by any earlier mlflow.set_tracking_uri
    monkeypatch.setenv("PREFTUNE_HOME", str(tmp_path / "home"))
    cfg = parse_config({"tracking": {"experiment": "t-sqlite"}})
    uri = tracking.resolve_tracking_uri(cfg.tracking)
    assert uri == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    client, parent_run, child_run = _exercise(cfg, uri)
    _check_tags(cfg, parent_run, child_run)
    # artifacts live under the preftune home, not in the current directory
    assert child_run.info.artifact_uri.startswith((tmp_path / "home" / "mlartifacts").as_uri())
    assert "hello.txt" in [f.path.split("/")[-1] for f in client.list_artifacts(child_run.info.run_id, "notes")]
    # a model-training experiment: the MLflow UI opens it on its runs, not on the GenAI trace overview
    exp = client.get_experiment_by_name("t-sqlite")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_existing_experiment_gets_its_kind(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'old.db'}"
    exp_id = mlflow.MlflowClient(uri).create_experiment("t-old", artifact_location=str(tmp_path / "art"))
    tracking.configure(parse_config({"tracking": {"uri": uri, "experiment": "t-old"}}))
    assert mlflow.MlflowClient(uri).get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_env_uri_is_used_when_config_is_empty(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    assert tracking.resolve_tracking_uri(parse_config({}).tracking) == f"sqlite:///{tmp_path}/other.db"
    cfg = parse_config({"tracking": {"uri": "http://example.invalid:5000"}})
    assert tracking.resolve_tracking_uri(cfg.tracking) == "http://example.invalid:5000"


def test_failed_step_is_marked_failed_with_the_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PREFTUNE_HOME", str(tmp_path / "home"))
    cfg = parse_config({"tracking": {"experiment": "t-fail"}})
    with pytest.raises(ValueError):
        with tracking.start_step_run("ppo", cfg) as run:
            run_id = run.info.run_id
            raise ValueError("boom")
    r = MlflowClient(tracking.resolve_tracking_uri(cfg.tracking)).get_run(run_id)
    assert r.info.status == "FAILED"
    assert r.data.tags[tracking.TAG_ERROR] == "ValueError: boom"


def test_unreachable_server_is_one_clear_error():
    port = free_port()  # nothing listens there
    cfg = parse_config({"tracking": {"uri": f"http://127.0.0.1:{port}", "timeout_s": 1}})
    with pytest.raises(UnreachableError) as ei:
        with tracking.start_step_run("collect", cfg):
            pass
    assert f"127.0.0.1:{port} is unreachable" in ei.value.message
    assert ei.value.exit_code == ExitCode.UNREACHABLE
    bad_db = parse_config({"tracking": {"uri": f"postgresql+psycopg2://postgres@127.0.0.1:{port}/x", "timeout_s": 1}})
    with pytest.raises(UnreachableError, match="unreachable"):
        tracking.configure(bad_db)


@pytest.mark.slow
@pytest.mark.postgres
def test_real_mlflow_server_on_postgres(mlflow_server):
    cfg = parse_config({"tracking": {"uri": mlflow_server, "experiment": "t-server"}})
    client, parent_run, child_run = _exercise(cfg, mlflow_server)
    _check_tags(cfg, parent_run, child_run)
    # artifacts are proxied by the server
    assert child_run.info.artifact_uri.startswith("mlflow-artifacts:")
    files = [f.path for f in client.list_artifacts(child_run.info.run_id)]
    assert "config" in files and "notes" in files
    text = mlflow.artifacts.load_text(f"runs:/{child_run.info.run_id}/notes/hello.txt")
    assert text == "hello"
