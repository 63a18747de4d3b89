"""The evaluate step end to end on the toy world: figures, gates, report, MLflow run, CLI exit codes."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import typer
import yaml
from mlflow import MlflowClient
from support.mlflow_server import free_port
from test_evaluate_support import SUITE, toy_config, toy_store, toy_world  # noqa: F401 (fixtures)

from preftune.errors import ConfigError, ExitCode, PreftuneError, UnreachableError
from preftune.evaluate.step import REPORT_HTML, REPORT_MD, RESULTS_FILE, SAMPLES_FILE, evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def good_eval(toy_world, toy_store):  # noqa: F811
    cfg = toy_config(toy_store, toy_world, model="toy-eval-first")
    return cfg, evaluate(cfg, str(toy_world["good"]), progress=False)


def run_cli(argv: list[str]) -> int:
    """The evaluate commands on their own app, with the exit-code handling of ``preftune.cli.main``."""
    from preftune.cli import evaluate_cmd

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    evaluate_cmd.register(app)
    try:
        app(args=argv, standalone_mode=False)
    except PreftuneError as err:
        return err.exit_code
    return 0


def test_first_run_passes_on_absolute_gates_and_says_so(good_eval):
    cfg, res = good_eval
    assert res.passed, res.reasons
    assert res.first_promotion and res.results["champion"] is None
    assert {g.kind for g in res.gates} == {"absolute"}  # no champion: no non-regression gates
    names = {g.name for g in res.gates}
    assert {"risky.forbidden_share.max", "benign.needless_refusal_share.max", "capability.loglik_change.min"} <= names
    risky = res.metrics["risky"]
    assert risky["preferred_share"]["candidate"].value > 0.8
    assert risky["forbidden_share"]["candidate"].ci_high <= 0.1
    assert res.metrics["benign"]["needless_refusal_share"]["candidate"].value < 0.1
    # the candidate moved away from the 50/50 base: positive KL, and it kept its capability
    assert res.metrics["all"]["kl_to_reference"]["candidate"].value > 0.1
    assert res.metrics["capability"]["loglik_change"]["candidate"].value > -0.15
    report = (Path(res.output) / REPORT_MD).read_text()
    assert "No champion yet: this is a first promotion, judged on the absolute gates alone." in report


def test_every_sample_is_judged_and_unknown_is_counted(good_eval):
    _, res = good_eval
    n_cases = len(SUITE["cases"])
    spp = SUITE["generation"]["samples_per_prompt"]
    assert len(res.records) == n_cases * spp
    for shares in res.results["behaviour_shares"]["candidate"].values():
        assert sum(shares.values()) == pytest.approx(1.0)
    unknown = sum(r.unknown for r in res.records if r.family == "risky") / (8 * spp)
    assert res.metrics["risky"]["unknown_share"]["candidate"].value == pytest.approx(unknown)


def test_output_folder_and_self_contained_html(good_eval):
    _, res = good_eval
    out = Path(res.output)
    for name in (RESULTS_FILE, SAMPLES_FILE, REPORT_MD, REPORT_HTML, "capability.jsonl", "plots/families.png"):
        assert (out / name).is_file(), name
    html = (out / REPORT_HTML).read_text()
    assert html.count("data:image/png;base64,") >= 2
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "the page must not fetch anything"
    results = json.loads((out / RESULTS_FILE).read_text())
    assert results["passed"] is True and results["suite"]["id"] == "toy-v1"


def test_mlflow_run_has_stable_metric_names_tags_and_the_report(good_eval):
    cfg, res = good_eval
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(res.run_id)
    m = run.data.metrics
    for name in (
        "eval.risky.preferred_share",
        "eval.risky.preferred_share.ci_low",
        "eval.risky.preferred_share.ci_high",
        "eval.benign.needless_refusal_share",
        "eval.all.kl_to_reference",
        "eval.all.response_length",
        "eval.capability.loglik_change",
        "eval.capability.loglik_per_token.reference",
        "behaviour_share.risky.decline",
        "eval.gates.passed",
        "eval.first_promotion",
    ):
        assert name in m, name
    assert m["eval.gates.passed"] == 1.0
    assert run.data.tags["preftune.step"] == "evaluate"
    assert run.data.tags["preftune.eval.passed"] == "true"
    assert run.data.tags["preftune.eval.suite"] == "toy-v1"
    arts = {a.path for a in client.list_artifacts(res.run_id, "evaluation")}
    assert {"evaluation/report.html", "evaluation/report.md", "evaluation/results.json"} <= arts


def test_same_model_twice_gives_the_same_figures_and_zero_deltas(good_eval, toy_world):  # noqa: F811
    cfg, first = good_eval
    again = evaluate(cfg, str(toy_world["good"]), champion=str(toy_world["good"]), progress=False)
    for metric in ("preferred_share", "forbidden_share", "kl_to_reference", "response_length"):
        a = first.metrics["risky"][metric]["candidate"]
        b = again.metrics["risky"][metric]["candidate"]
        assert a == b, metric
        assert again.metrics["risky"][metric]["delta"].value == 0.0
    assert again.passed, again.reasons
    assert {g.kind for g in again.gates} == {"absolute", "non_regression"}


def test_without_a_champion_the_reference_fallback_measures_the_change(toy_world, toy_store):  # noqa: F811
    cfg = toy_config(toy_store, toy_world, model="toy-eval-fallback", champion_fallback="reference")
    res = evaluate(cfg, str(toy_world["good"]), progress=False)
    assert res.results["champion"] is not None  # the base policy (models.policy) stood in for the champion
    assert "non_regression" in {g.kind for g in res.gates}
    delta = res.metrics["risky"]["preferred_share"]["delta"]
    assert delta.value > 0.3 and delta.ci_low > 0  # the good candidate beats the 50/50 base


def test_refuse_everything_candidate_fails_with_the_right_reasons(toy_world, toy_store):  # noqa: F811
    cfg = toy_config(toy_store, toy_world, model="toy-eval-refuser")
    res = evaluate(cfg, str(toy_world["refuser"]), champion=str(toy_world["good"]), progress=False)
    assert not res.passed
    failed = {g.name for g in res.gates if g.passed is False}
    assert "benign.needless_refusal_share.max" in failed
    assert "benign.needless_refusal_share.non_regression" in failed
    assert "benign.preferred_share.non_regression" in failed
    assert "risky.forbidden_share.max" not in failed  # it still declines risky requests
    assert any("benign.needless_refusal_share: upper 95% bound" in r for r in res.reasons)
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    tags = client.get_run(res.run_id).data.tags
    assert tags["preftune.eval.passed"] == "false" and "needless_refusal_share" in tags["preftune.eval.reasons"]
    assert "FAILED" in (Path(res.output) / REPORT_MD).read_text().splitlines()[0]


def test_bad_suite_fails_before_any_model_is_loaded_or_run_started(tmp_path, toy_world, toy_store):  # noqa: F811
    bad = copy.deepcopy(SUITE)
    bad["families"]["benign"]["judge"] = "missing-judge"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    cfg = toy_config(toy_store, toy_world, model="toy-eval-bad", suite=str(path))
    client = MlflowClient(tracking_uri=toy_store)
    exp = client.get_experiment_by_name("toy")
    before = len(client.search_runs([exp.experiment_id])) if exp else 0
    with pytest.raises(ConfigError, match="unknown judge 'missing-judge'"):
        evaluate(cfg, str(tmp_path / "candidate-that-does-not-exist"))
    exp = client.get_experiment_by_name("toy")
    assert (len(client.search_runs([exp.experiment_id])) if exp else 0) == before


def test_unreachable_tracking_server_fails_before_loading_models(toy_world):  # noqa: F811
    cfg = toy_config(f"http://127.0.0.1:{free_port()}", toy_world, model="x")
    cfg.tracking.timeout_s = 2
    with pytest.raises(UnreachableError, match="unreachable"):
        evaluate(cfg, "/nonexistent/candidate")


def test_cli_exit_codes(tmp_path, toy_world, toy_store):  # noqa: F811
    cfg_path = tmp_path / "run.yaml"
    cfg = toy_config(toy_store, toy_world, model="toy-eval-cli")
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    code = run_cli(
        [
            "evaluate",
            str(toy_world["unsafe"]),
            "-c",
            str(cfg_path),
            "--champion",
            "none",
            "-o",
            str(tmp_path / "report"),
        ]
    )
    assert code == ExitCode.GATE_FAILED
    assert "risky.forbidden_share" in (tmp_path / "report" / REPORT_MD).read_text()
    assert (
        run_cli(["evaluate", str(toy_world["unsafe"]), "-c", str(cfg_path), "--champion", "none", "--no-fail-on-gate"])
        == 0
    )


def _tiny_reward_model(folder: Path, tok_source: Path) -> Path:
    """A randomly initialised one-output sequence classifier in train-reward's published layout."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from preftune.scoring.metadata import RewardModelMeta

    tok = AutoTokenizer.from_pretrained(str(tok_source))
    torch.manual_seed(3)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=128,
        n_embd=16,
        n_layer=1,
        n_head=2,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    GPT2ForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    meta = RewardModelMeta(
        base="toy",
        dataset_hash="ds-toy",
        eval_accuracy=0.8,
        reward_mean=0.0,
        reward_std=1.0,
        config_hash="0" * 16,
        max_length=128,
    )
    (folder / "reward_model.json").write_text(meta.to_json())
    return folder


def test_reward_model_win_rate_and_reward_judge(tmp_path, toy_world, toy_store):  # noqa: F811
    from preftune.evaluate.metrics import win_rate_values

    rm = _tiny_reward_model(tmp_path / "rm", toy_world["good"])
    suite = copy.deepcopy(SUITE)
    suite["judges"]["rm"] = {"type": "reward", "threshold": 0.0, "above": "helpful", "below": "refuse"}
    suite["families"]["benign"]["judge"] = "rm"  # the run's reward model decides benign behaviour
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    cfg = toy_config(
        toy_store,
        toy_world,
        model="toy-eval-rm",
        suite=str(path),
        reward_model=str(rm),
        gates={"min_reward_win_rate": 0.0},
    )
    res = evaluate(cfg, str(toy_world["good"]), champion=str(toy_world["base"]), progress=False)
    cand = [r for r in res.records if r.model == "candidate"]
    champ = [r for r in res.records if r.model == "champion"]
    assert all(r.reward is not None for r in res.records)
    assert {r.behaviour for r in cand if r.family == "benign"} <= {"helpful", "refuse"}
    for r in cand:  # the reward judge's verdict is the sign of the reward
        if r.family == "benign":
            assert r.behaviour == ("helpful" if r.reward >= 0 else "refuse")
    win = res.metrics["all"]["reward_win_rate"]["candidate"]
    per_case = win_rate_values(cand, champ)
    assert win.value == pytest.approx(sum(per_case.values()) / len(per_case))
    assert 0.0 <= win.ci_low <= win.value <= win.ci_high <= 1.0
    assert "all.reward_win_rate.min" in {g.name for g in res.gates}
    assert "eval.all.reward_win_rate" in MlflowClient(tracking_uri=toy_store).get_run(res.run_id).data.metrics
