"""Model references: models:/name@alias from an MLflow registry, Hugging Face ids from the local cache only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.errors import InputError
from preftune.models import is_hf_id, resolve_model_ref


def _model_folder(root: Path, marker: str) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "bert", "marker": marker}))
    return root


def _fake_hf_cache(hub: Path, repo_id: str, revision: str = "main", commit: str = "a" * 40) -> Path:
    """The hub cache layout: models--org--name/{refs/<rev>, snapshots/<commit>/...}."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (snap / "config.json").write_text(json.dumps({"model_type": "bert", "marker": repo_id}))
    return snap


def test_hf_id_is_read_from_the_local_cache_only(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    snap = _fake_hf_cache(hub, "sentence-transformers/all-MiniLM-L6-v2")
    _fake_hf_cache(hub, "org/pinned", revision="v1", commit="b" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.chdir(tmp_path)

    got = resolve_model_ref("sentence-transformers/all-MiniLM-L6-v2", setting="models.reward_base")
    assert got == snap and json.loads((got / "config.json").read_text())["marker"].startswith("sentence")
    assert resolve_model_ref("hf:org/pinned@v1").name == "b" * 40

    with pytest.raises(InputError) as info:
        resolve_model_ref("org/not-cached", setting="models.policy")
    msg = str(info.value)
    assert "models.policy = 'org/not-cached'" in msg and str(hub) in msg and "never downloads" in msg
    assert "huggingface-cli download org/not-cached" in msg
    with pytest.raises(InputError, match="revision v2"):
        resolve_model_ref("org/pinned@v2")


def test_a_local_folder_wins_over_the_hf_reading(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.chdir(tmp_path)
    local = _model_folder(tmp_path / "org" / "name", "local")
    assert resolve_model_ref("org/name") == Path("org/name")
    assert resolve_model_ref(str(local)) == local
    with pytest.raises(InputError, match="no such folder"):
        resolve_model_ref("/no/such/folder")
    assert is_hf_id("org/name") and is_hf_id("hf:gpt2") and not is_hf_id("./org/name") and not is_hf_id("gpt2")


@pytest.fixture
def registry(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PREFTUNE_HOME", str(tmp_path / "home"))
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("models-test", artifact_location=(tmp_path / "artifacts").as_uri())
    return {"uri": uri, "experiment": exp}


class _Noop:  # pyfunc python_model: never loaded by these tests
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ARG002
        return model_input


def _register(registry, folder: Path, name: str) -> str:
    import mlflow

    class Model(mlflow.pyfunc.PythonModel, _Noop):
        pass

    with mlflow.start_run(experiment_id=registry["experiment"]):
        info = mlflow.pyfunc.log_model(
            name="m", python_model=Model(), artifacts={"reward_model": str(folder)}, pip_requirements=[]
        )
    return mlflow.register_model(info.model_uri, name).version


@pytest.mark.slow
def test_models_uri_with_an_alias_from_a_local_registry(registry, tmp_path):
    import mlflow

    from preftune.config import parse_config

    v1 = _register(registry, _model_folder(tmp_path / "m1", "one"), "rm")
    v2 = _register(registry, _model_folder(tmp_path / "m2", "two"), "rm")
    client = mlflow.MlflowClient(registry["uri"])
    client.set_registered_model_alias("rm", "champion", v1)
    cfg = parse_config({"tracking": {"uri": registry["uri"]}})

    got = resolve_model_ref("models:/rm@champion", cfg, setting="models.reward_base")
    assert json.loads((got / "config.json").read_text())["marker"] == "one"
    assert str(tmp_path / "home" / "cache" / "models") in str(got)
    client.set_registered_model_alias("rm", "champion", v2)  # the alias moved: read at call time
    assert json.loads((resolve_model_ref("models:/rm@champion", cfg) / "config.json").read_text())["marker"] == "two"
    assert json.loads((resolve_model_ref(f"models:/rm/{v1}", cfg) / "config.json").read_text())["marker"] == "one"
    with pytest.raises(InputError, match="no alias 'staging'"):
        resolve_model_ref("models:/rm@staging", cfg)
    with pytest.raises(InputError, match="no alias"):
        resolve_model_ref("models:/unknown@champion", cfg)
