"""``preftune demo`` stopped by a gate: it exits clearly, the champion unchanged.

Slow (one to two minutes on 2 cores): the demo runs with a config whose test of fit cannot pass
(``fit.min_items: 1000``: every family "needs data"), against an MLflow store that already has a
champion. (Its own file so that pytest-xdist's ``--dist loadfile`` can run it beside tests/test_demo.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _champion_store(root: Path, name: str) -> str:
    """An MLflow store whose registered model already has a champion (version 1)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    model_dir = root / "champion-model"
    model_dir.mkdir()
    (model_dir / "MLmodel").write_text("artifact_path: model\n")
    client.create_registered_model(name)
    v = client.create_model_version(name, source=str(model_dir))
    client.set_registered_model_alias(name, "champion", str(v.version))
    return uri


def test_demo_stopped_by_the_fit_gate_exits_10_and_keeps_the_champion(tmp_path, capsys):
    import yaml
    from mlflow import MlflowClient

    from preftune.cli import main

    uri = _champion_store(tmp_path, "demo-gate-policy")
    cfg = {
        "run": {"name": "demo-gate"},
        "models": {"registered_model": "demo-gate-policy"},
        "data": {"prompt_fraction": 0.1, "generation": {"n_candidates": 2, "max_new_tokens": 16}},
        "fit": {"min_items": 1000, "bootstrap_resamples": 100},
        "tracking": {"uri": uri, "experiment": "demo-gate"},
    }
    path = tmp_path / "gate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--config", str(path), "--samples", "1"])
    captured = capsys.readouterr()
    out = " ".join(captured.out.split())
    assert exc.value.code == 10, out[-3000:]
    # one line, the last on stderr (libraries log above it), no traceback
    assert captured.err.strip().splitlines()[-1] == (
        "error: not-fit: stopped after check-fit: no behaviour family is fit for PPO"
    )
    assert "Traceback" not in captured.err
    assert "Promotion: none" in out and "champion unchanged" in out
    assert "Test of fit per behaviour family" in out and "needs data" in out
    for step in ("collect", "check-fit"):
        assert f"{step} " in out
    assert "mlflowui--backend-store-uri" + uri in out.replace(" ", "")  # rich may wrap the line
    # nothing registered, the champion is where it was
    client = MlflowClient(uri)
    versions = client.search_model_versions("name = 'demo-gate-policy'")
    assert [str(v.version) for v in versions] == ["1"]
    assert str(client.get_model_version_by_alias("demo-gate-policy", "champion").version) == "1"
    # the pipeline's MLflow run records the outcome; later steps never ran
    exp = client.get_experiment_by_name("demo-gate")
    runs = client.search_runs([exp.experiment_id], "tags.`preftune.step` = 'pipeline'")
    assert [r.data.tags["preftune.outcome"] for r in runs] == ["not-fit"]
    steps = {r.data.tags["preftune.step"] for r in client.search_runs([exp.experiment_id], "")}
    assert steps == {"pipeline", "collect", "check-fit", "demo"}
