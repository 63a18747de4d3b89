"""Promotion on the toy world (SQLite store): only passing models reach the registry, with an audit
trail; a stale evaluation is re-checked against a champion that changed; rollback and listing."""

from __future__ import annotations

import json

import pytest
import yaml
from mlflow import MlflowClient
from support.mlflow_server import free_port
from test_evaluate_step import run_cli
from test_evaluate_support import toy_config, toy_store, toy_world  # noqa: F401 (fixtures)

from preftune import registry
from preftune.errors import ConfigError, ExitCode, InputError, PreftuneError, UnreachableError
from preftune.evaluate.promote import promote
from preftune.evaluate.step import evaluate
from preftune.registry import list_versions, rollback

pytestmark = pytest.mark.slow

AUDIT_TAGS = (
    "preftune.dataset_hash",
    "preftune.reward_model_version",
    "preftune.eval_run_id",
    "preftune.gates",
    "preftune.gate_results",
    "preftune.suite",
    "preftune.suite_hash",
    "preftune.config_hash",
    "preftune.git_sha",
    "preftune.pipeline_run_id",
    "preftune.model_hash",
    "preftune.promoted_by",
)

LOOSE = {
    # Lets the 50/50 base policy be a first champion, and tolerates the toy suite's noise on
    # families a candidate does not change; the comparisons between candidates stay decisive.
    "gates": {
        "every_family": {"forbidden_share": {"max": 1.0}, "needless_refusal_share": {"max": 1.0}},
        "non_regression": {"preferred_share": 0.35, "needless_refusal_share": 0.35},
        "capability_tolerance": None,
        "max_capability_drop": None,
    }
}


def _aliases(client, name):
    return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}


def _versions(client, name):
    return sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))


def test_pass_registers_with_audit_tags_and_reject_registers_nothing(toy_world, toy_store):  # noqa: F811
    cfg = toy_config(toy_store, toy_world, model="toy-promote-basic")
    client = MlflowClient(tracking_uri=toy_store)

    first = promote(cfg, str(toy_world["good"]), dataset_hash="ds-123", user="alice")  # evaluates first
    assert first.promoted and first.version == "1" and first.first_promotion
    assert "no champion yet: promoted on the absolute gates alone" in first.notes
    mv = client.get_model_version("toy-promote-basic", "1")
    for tag in AUDIT_TAGS:
        assert mv.tags.get(tag), tag
    assert mv.tags["preftune.dataset_hash"] == "ds-123" and mv.tags["preftune.promoted_by"] == "alice"
    assert mv.tags["preftune.first_promotion"] == "true" and mv.tags["preftune.gates"] == "passed"
    assert mv.tags["gate.risky.forbidden_share.max"] == "pass"
    assert mv.tags["preftune.suite"] == "toy-v1"
    assert registry.alias_version(client, "toy-promote-basic", "champion") == "1"
    # the registered artifact is a loadable policy
    assert client.get_run(first.run_id).data.tags["preftune.promotion.status"] == "promoted"

    ev = evaluate(cfg, str(toy_world["refuser"]), progress=False)  # against the registry champion v1
    assert ev.results["champion"]["version"] == "1" and not ev.passed
    rejected = promote(cfg, str(toy_world["refuser"]), eval_run_id=ev.run_id)
    assert not rejected.promoted and rejected.version is None
    assert any("benign.needless_refusal_share" in r for r in rejected.reasons)
    assert _versions(client, "toy-promote-basic") == [1]
    assert registry.alias_version(client, "toy-promote-basic", "champion") == "1"
    for run_id in (rejected.run_id, ev.run_id):
        tags = client.get_run(run_id).data.tags
        assert tags["preftune.promotion.status"] == "rejected"
        assert "needless_refusal_share" in tags["preftune.promotion.reasons"]
    with pytest.raises(PreftuneError) as info:
        rejected.raise_for_status()
    assert info.value.exit_code == ExitCode.GATE_FAILED
    assert "nothing registered, champion unchanged" in info.value.message

    # the registry champion's samples come from the evaluation that promoted it; sampling it again
    # (downloaded from the registry) gives the same figures
    again = evaluate(cfg, str(toy_world["good"]), progress=False)
    assert again.results["champion"]["samples_from_eval_run"] == first.eval_run_id
    assert again.results["champion"]["model_hash"] == again.results["candidate"]["model_hash"]
    assert again.passed
    # passing, but the very model that is champion already: nothing new is registered
    same = promote(cfg, str(toy_world["good"]), eval_run_id=again.run_id)
    assert not same.promoted and "identical to the champion, version 1" in same.reasons[0]
    assert _versions(client, "toy-promote-basic") == [1]
    cfg.evaluation.reuse_champion_samples = False
    fresh = evaluate(cfg, str(toy_world["good"]), progress=False)
    assert fresh.results["champion"]["samples_from_eval_run"] is None
    for family in ("risky", "benign", "all", "capability"):
        assert fresh.results["metrics"][family] == again.results["metrics"][family], family


def test_promoting_a_different_model_than_was_evaluated_is_refused(toy_world, toy_store):  # noqa: F811
    cfg = toy_config(toy_store, toy_world, model="toy-promote-swap")
    ev = evaluate(cfg, str(toy_world["good"]), progress=False)
    with pytest.raises(InputError, match="not the model evaluate run"):
        promote(cfg, str(toy_world["refuser"]), eval_run_id=ev.run_id)
    assert registry.get_registered_model(MlflowClient(tracking_uri=toy_store), "toy-promote-swap") is None


def test_stale_evaluation_is_rechecked_against_the_new_champion(toy_world, toy_store):  # noqa: F811
    """Two runs evaluated against v1; the better one lands first: the worse one must not replace it."""
    name = "toy-promote-race"
    cfg = toy_config(toy_store, toy_world, model=name, **LOOSE)
    client = MlflowClient(tracking_uri=toy_store)
    assert promote(cfg, str(toy_world["base"])).version == "1"  # a weak first champion
    ev_good = evaluate(cfg, str(toy_world["good"]), progress=False)
    ev_medium = evaluate(cfg, str(toy_world["medium"]), progress=False)
    assert ev_good.passed and ev_medium.passed, (ev_good.reasons, ev_medium.reasons)
    assert ev_good.champion_version == ev_medium.champion_version == "1"

    won = promote(cfg, str(toy_world["good"]), eval_run_id=ev_good.run_id)
    assert won.promoted and won.version == "2" and won.previous == "1"
    lost = promote(cfg, str(toy_world["medium"]), eval_run_id=ev_medium.run_id)
    assert not lost.promoted and lost.rechecked_against == "2"
    assert any("the champion changed to v2" in r and "benign.preferred_share" in r for r in lost.reasons)
    assert _versions(client, name) == [1, 2]
    assert _aliases(client, name) == {"champion": "2", "previous-champion": "1"}


def test_stale_evaluation_of_a_better_model_still_promotes_after_recheck(toy_world, toy_store):  # noqa: F811
    name = "toy-promote-race2"
    cfg = toy_config(toy_store, toy_world, model=name, **LOOSE)
    client = MlflowClient(tracking_uri=toy_store)
    assert promote(cfg, str(toy_world["base"])).version == "1"
    ev_good = evaluate(cfg, str(toy_world["good"]), progress=False)
    ev_medium = evaluate(cfg, str(toy_world["medium"]), progress=False)
    assert promote(cfg, str(toy_world["medium"]), eval_run_id=ev_medium.run_id).version == "2"
    late = promote(cfg, str(toy_world["good"]), eval_run_id=ev_good.run_id)
    assert late.promoted and late.version == "3" and late.rechecked_against == "2"
    mv = client.get_model_version(name, "3")
    assert mv.tags["preftune.rechecked_against"] == "2" and mv.tags["preftune.replaced_version"] == "2"
    assert "recheck." in mv.tags["preftune.gate_results"]
    assert _aliases(client, name) == {"champion": "3", "previous-champion": "2"}

    # rollback: who and why are recorded; listing shows gates and the champion
    rec = rollback(cfg, "2", "benign answers got worse in production", user="bob")
    assert rec["from"] == "3" and rec["to"] == "2" and rec["by"] == "bob"
    assert _aliases(client, name) == {"champion": "2", "previous-champion": "3"}
    tag = json.loads(client.get_model_version(name, "2").tags["preftune.rollback"])
    assert tag["by"] == "bob" and tag["reason"] == "benign answers got worse in production"
    assert client.get_run(tag["run_id"]).data.tags["preftune.rollback.by"] == "bob"
    info = list_versions(cfg)
    assert info["champion"] == "2"
    assert [v["version"] for v in info["versions"]] == ["3", "2", "1"]
    v2 = next(v for v in info["versions"] if v["version"] == "2")
    assert v2["aliases"] == ["champion"] and v2["gates"] == "passed" and v2["gates_failed"] == 0
    assert v2["rollback"]["by"] == "bob"
    assert info["lock"] is None  # released

    with pytest.raises(InputError, match="has no version 9"):
        rollback(cfg, "9", "typo", user="bob")
    with pytest.raises(ConfigError, match="needs --reason"):
        rollback(cfg, "1", "  ", user="bob")
    with pytest.raises(InputError, match="already the champion"):
        rollback(cfg, "2", "again", user="bob")


def test_unreachable_registry_fails_before_anything_is_registered(toy_world):  # noqa: F811
    cfg = toy_config(f"http://127.0.0.1:{free_port()}", toy_world, model="x")
    cfg.tracking.timeout_s = 2
    with pytest.raises(UnreachableError) as info:
        promote(cfg, str(toy_world["good"]), eval_run_id="0123456789abcdef")
    assert info.value.exit_code == ExitCode.UNREACHABLE
    with pytest.raises(UnreachableError):
        rollback(cfg, "1", "why", user="bob")


def test_cli_promote_models_and_rollback(tmp_path, toy_world, toy_store, capsys):  # noqa: F811
    cfg = toy_config(toy_store, toy_world, model="toy-promote-cli")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert run_cli(["promote", str(toy_world["good"]), "-c", str(path), "--user", "carol"]) == 0
    assert "registered toy-promote-cli v1" in capsys.readouterr().out
    assert run_cli(["promote", str(toy_world["refuser"]), "-c", str(path)]) == ExitCode.GATE_FAILED
    assert run_cli(["models", "-c", str(path), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["champion"] == "1" and len(listing["versions"]) == 1
    assert run_cli(["models", "-c", str(path)]) == 0
    assert "champion: v1" in capsys.readouterr().out
    assert run_cli(["rollback", "--to", "1", "--reason", "r", "-c", str(path)]) == ExitCode.INPUT  # already champion


def test_lora_adapter_candidate_is_packaged_with_its_base_and_loads_back_from_the_registry(
    tmp_path,
    toy_world,  # noqa: F811
    toy_store,  # noqa: F811
):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(toy_world["good"]))
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)  # adapter_config.json names the toy "good" policy as its base
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()

    cfg = toy_config(toy_store, toy_world, model="toy-promote-lora", **LOOSE)
    first = promote(cfg, str(adapter))
    assert first.promoted, first.reasons
    cfg.evaluation.reuse_champion_samples = False  # load the champion from the registry for real
    again = evaluate(cfg, str(adapter), progress=False)
    assert again.results["champion"]["version"] == "1"
    # the registry copy (adapter + packaged base) generates exactly what the local adapter does
    for family in ("risky", "benign"):
        assert again.metrics[family]["preferred_share"]["delta"].value == 0.0


def test_the_candidates_logged_model_is_evaluated_and_registered_without_a_copy(toy_world, toy_store):  # noqa: F811
    """What the MLflow UI shows: the candidate's one LoggedModel (as ppo logs it) is the evaluate run's
    model input and carries its metrics; the suite is the run's dataset; every case compares the
    candidate with the champion in a table and as a trace with the judges' labels; promote registers
    that same LoggedModel."""
    import mlflow

    from preftune import tracking
    from preftune.evaluate.mlflow_views import COMPARISON_TABLE
    from preftune.policy_model import TAG_MODEL_HASH, folder_hash, log_policy_model

    cfg = toy_config(toy_store, toy_world, model="toy-promote-logged", **LOOSE)
    client = MlflowClient(tracking_uri=toy_store)
    first = promote(cfg, str(toy_world["base"]))  # a champion to compare with
    assert first.promoted
    tracking.configure(cfg)
    with tracking.start_step_run("ppo", cfg, log_config=False):  # what the ppo step logs
        logged = log_policy_model(toy_world["good"], cfg.promotion.model_name,
                                  tags={TAG_MODEL_HASH: folder_hash(toy_world["good"])})
    ev = evaluate(cfg, str(toy_world["good"]), progress=False)
    run = client.get_run(ev.run_id)
    assert [m.model_id for m in run.inputs.model_inputs] == [logged.model_id]
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["toy-v1"]
    model = mlflow.get_logged_model(logged.model_id)
    on_model = {m.key: m.value for m in model.metrics}
    assert on_model["eval.risky.preferred_share"] == run.data.metrics["eval.risky.preferred_share"]
    assert any(k.endswith(".champion") for k in on_model)
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{ev.run_id}/{COMPARISON_TABLE}"))
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert rows and all(r["champion_answer"] is not None and r["candidate_behaviour"] for r in rows)
    traces = mlflow.search_traces(locations=[run.info.experiment_id], run_id=ev.run_id, return_type="list")
    assert len(traces) == len(rows)
    names = {a.name for a in traces[0].info.assessments}
    assert {"candidate_behaviour", "candidate_preferred", "champion_behaviour"} <= names
    second = promote(cfg, str(toy_world["good"]), eval_run_id=ev.run_id)
    assert second.promoted and second.model_id == logged.model_id
    mv = client.get_model_version("toy-promote-logged", second.version)
    assert mv.source == f"models:/{logged.model_id}"  # the registered version is that LoggedModel
    same_hash = mlflow.search_logged_models(
        filter_string=f"tags.`{TAG_MODEL_HASH}` = '{folder_hash(toy_world['good'])}'", output_format="list"
    )
    newer = [m.model_id for m in same_hash if m.creation_timestamp >= model.creation_timestamp]
    assert newer == [logged.model_id]  # no second copy
