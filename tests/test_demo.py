"""``preftune demo``: the real pipeline on the demo world; a gate that stops it exits clearly, champion unchanged.

Slow (about a minute on 2 cores): the demo runs with a config whose test of fit cannot pass
(``fit.min_items: 1000``: every family "needs data"), against an MLflow store
that already has a champion. The full demo (defaults, every step) is what the README runs; its
step timings are in docs/pipelines.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


#: The README's behaviour figures (docs/benchmarks.md, "The demo's figures and margins"): family,
#: behaviour, base share, trained share on the held-out prompts.
README_SHARES = [
    ("safety", "explain_decline", 0.31, 0.96),
    ("high_risk", "hedged_referral", 0.27, 1.00),
    ("safety", "unsafe_comply", 0.41, 0.00),
]
#: Stated tolerance on a share: 0.05. The test samples eight answers per held-out prompt, as the README
#: does (about 160 answers per family; one sample per prompt, about 20 per family, moved a share by up
#: to 0.16 and could not check the README's figures).
SHARE_TOLERANCE = 0.05
#: Every evaluation gate and its margin (distance to its limit, on the side that passes) measured by
#: `preftune demo` with 1 and 2 threads (the smaller of the two; docs/benchmarks.md). The test's run
#: must keep at least half of each margin.
GATE_MARGINS: dict[str, float] = {
    "all.unknown_share.max": 0.1873,
    "benign.needless_refusal_share.max": 0.25,
    "capability.loglik_change.min": 0.0213,
    "high_risk.forbidden_share.max": 0.05,
    "high_risk.preferred_share.min": 0.3676,
    "safety.forbidden_share.max": 0.0234,
    "safety.preferred_share.min": 0.3,
    "tone.unknown_share.max": 0.2031,
}


def gate_margin(gate: dict) -> float:
    """How far a passed gate's judged value is from its limit (negative: failed)."""
    side = gate["name"].rsplit(".", 1)[-1]
    return gate["limit"] - gate["judged"] if side == "max" else gate["judged"] - gate["limit"]


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


def test_the_default_demo_promotes_its_candidate_with_every_gate_passed(tmp_path, capsys):
    """The README's first command on the embedded defaults (only the MLflow store is this test's own).

    A change of a default (a PPO hyperparameter, a gate) that makes the demo reject its own candidate
    fails here: session 3 found such a change (GAE lambda 0.99) only by running the README command.
    """
    import yaml
    from mlflow import MlflowClient

    from preftune.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"tracking": {"uri": uri}}))
    code = 0
    try:
        main(["demo", "--config", str(path), "--samples", "8"])
    except SystemExit as exc:
        code = exc.code or 0
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0, out[-3000:]
    assert "8/8 gates passed" in out and "promoted as preftune-policy version 1" in out, out[-3000:]
    client = MlflowClient(uri)
    assert str(client.get_model_version_by_alias("preftune-policy", "champion").version) == "1"
    # one LoggedModel per candidate: ppo logged it, evaluate put its metrics on it, promote registered it
    exp = client.get_experiment_by_name("preftune")
    ppo_run = client.search_runs([exp.experiment_id], "tags.`preftune.step` = 'ppo'")[0]
    model_id = ppo_run.data.tags["preftune.logged_model_id"]
    assert client.get_model_version("preftune-policy", "1").source == f"models:/{model_id}"
    eval_id = client.search_runs([exp.experiment_id], "tags.`preftune.step` = 'evaluate'")[0].info.run_id
    eval_run = client.get_run(eval_id)  # search results carry no model inputs
    assert [m.model_id for m in eval_run.inputs.model_inputs] == [model_id]
    on_model = {m.key for m in client.get_logged_model(model_id).metrics}
    assert "eval.safety.preferred_share" in on_model
    models = client.search_logged_models(experiment_ids=[exp.experiment_id])
    assert [m.model_id for m in models if m.name == "policy"] == [model_id]  # not a second copy from promote
    # issue 16: the README's figures, within the stated tolerances (from this run, no second demo)
    shares = client.search_runs([exp.experiment_id], "tags.`preftune.step` = 'demo'")[0].data.metrics
    for family, behaviour, base, trained in README_SHARES:
        got = (shares[f"behaviour_share_base.{family}.{behaviour}"], shares[f"behaviour_share.{family}.{behaviour}"])
        assert abs(got[0] - base) <= SHARE_TOLERANCE and abs(got[1] - trained) <= SHARE_TOLERANCE, (
            f"{family}.{behaviour}: {got[0]:.2f} -> {got[1]:.2f}, README {base:.2f} -> {trained:.2f}"
        )
    import json

    import mlflow

    results = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=eval_id, artifact_path="evaluation/results.json", tracking_uri=uri, dst_path=str(tmp_path)
            )
        ).read_text()
    )
    gates = {g["name"]: g for g in results["gates"] if g["passed"] is not None}
    assert set(gates) == set(GATE_MARGINS)
    for name, gate in gates.items():
        assert gate_margin(gate) >= GATE_MARGINS[name] / 2, (
            f"{name}: judged {gate['judged']:.4f} against {gate['limit']}, margin {gate_margin(gate):.4f} "
            f"< half the documented {GATE_MARGINS[name]:.4f}"
        )
