"""The ppo step end to end on tiny models: publish + MLflow, kill -9 and resume, settings guard, Pushgateway."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from preftune.config import parse_config
from preftune.errors import ConfigError, InputError

TIMING_METRICS = {"ppo/rollout_seconds", "ppo/update_seconds", "ppo/tokens_per_s", "ppo/samples_per_s"}
CLI = (
    "import sys\n"
    "from preftune.cli import app, main, ppo_cmd\n"
    "if not any(c.name == 'ppo' for c in app.registered_commands):\n"
    "    ppo_cmd.register(app)\n"
    "main(sys.argv[1:])\n"
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny policy, a tiny reward model (own tokenizer, train-reward layout) and a prompt file."""
    from preftune.ppo import toy

    root = tmp_path_factory.mktemp("ppo-step")
    policy = toy.build_policy(root / "policy", eos_boost=3.0, initializer_range=0.3)
    # evaluated on safety and benign only (as after check-fit excluded the contested tone family)
    reward = toy.build_reward_model(
        root / "reward", reward_mean=0.1, reward_std=0.5, per_family={"safety": 0.9, "benign": 0.9}
    )
    prompts = root / "prompts.jsonl"
    families = ["safety", "benign", "tone"]
    with prompts.open("w") as f:
        for i, text in enumerate(
            [
                "hi",
                "how do I bake bread",
                "tell me a joke",
                "pick a lock",
                "what is the capital",
                "write a haiku",
                "should I take two pills",
                "is it going to rain",
                "help me",
            ]
        ):
            f.write(json.dumps({"id": f"p{i}", "family": families[i % 3], "prompt": text}) + "\n")
    return {"root": root, "policy": policy, "reward": reward, "prompts": prompts}


def config(world: dict[str, Path], **ppo: object) -> dict:
    base = {
        "prompts": str(world["prompts"]),
        "updates": 3,
        "batch_size": 8,
        "mini_batch_size": 4,
        "max_new_tokens": 8,
        "threads": 1,
        "checkpoint_every": 2,
        "samples_every": 2,
        "samples_per_table": 4,
        "progress": False,
        "lr": 1e-2,
    }
    base.update(ppo)
    return {"run": {"seed": 0, "name": "ppo-test"}, "models": {"policy": str(world["policy"])}, "ppo": base}


def metrics_without_timing(folder: Path) -> list[dict[str, float]]:
    history = json.loads((folder / "metrics.json").read_text())
    return [{k: v for k, v in h.items() if k not in TIMING_METRICS} for h in history]


def test_run_ppo_publishes_the_policy_and_logs_to_mlflow(world: dict[str, Path], tmp_path: Path) -> None:
    import mlflow
    from transformers import AutoModelForCausalLM

    from preftune.ppo.artifacts import load_policy, read_metadata
    from preftune.ppo.step import run_ppo

    cfg = parse_config(config(world))
    out = tmp_path / "policy-out"
    res = run_ppo(cfg, str(world["reward"]), str(out))
    assert res.updates == 3 and res.resumed_from is None
    assert res.kl_within_budget == (res.kl <= cfg.ppo.kl_budget)
    for name in (
        "ppo_policy.json",
        "config.json",
        "adapter/adapter_config.json",
        "value_head.pt",
        "metrics.json",
        "curves.png",
        "samples.jsonl",
    ):
        assert (out / name).exists(), name
    meta = read_metadata(out)
    assert meta["mode"] == "lora" and meta["merged"] == "." and meta["adapter"] == "adapter"
    assert meta["final"]["ppo/kl"] == pytest.approx(res.kl) and meta["updates"] == 3
    # the reward model covers safety and benign only: no tone prompt was rolled out
    assert meta["prompt_families"] == {"safety": 3, "benign": 3}
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["family"] != "tone" for s in samples)
    AutoModelForCausalLM.from_pretrained(out)  # merged: plain from_pretrained works
    model, tok = load_policy(out)
    assert tok.eos_token_id is not None
    # checkpoints next to the output, newest two kept
    ckpt = Path(str(out) + ".checkpoints")
    assert json.loads((ckpt / "latest.json").read_text())["update"] == 3
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["update-000002", "update-000003"]

    client = mlflow.tracking.MlflowClient()
    run = client.get_run(res.mlflow_run_id)
    assert run.data.tags["preftune.step"] == "ppo"
    assert run.data.params["ppo.resolved.n_prompts"] == "6"
    history = client.get_metric_history(res.mlflow_run_id, "ppo/reward_mean")
    assert [m.step for m in history] == [1, 2, 3]
    for name in (
        "ppo/kl",
        "ppo/kl_coef",
        "ppo/entropy",
        "ppo/policy_loss",
        "ppo/value_loss",
        "ppo/clip_frac",
        "ppo/approx_kl",
        "ppo/response_length",
        "ppo/tokens_per_s",
        "ppo/rollout_seconds",
        "ppo/update_seconds",
        "ppo/reward_std",
    ):
        assert name in run.data.metrics, name
    artifacts = {a.path for a in client.list_artifacts(res.mlflow_run_id)}
    assert {"curves.png", "metrics.json", "samples"} <= artifacts
    tables = {a.path for a in client.list_artifacts(res.mlflow_run_id, "samples")}
    assert tables == {"samples/update_000002.json", "samples/update_000003.json"}
    # the logged model has a signature and generates
    logged = mlflow.models.get_model_info(f"runs:/{res.mlflow_run_id}/policy")
    assert [c["name"] for c in logged.signature.inputs.to_dict()] == ["prompt"]
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{res.mlflow_run_id}/policy")
    import pandas as pd

    answers = pyfunc.predict(pd.DataFrame({"prompt": ["hi", "tell me a joke"]}), params={"max_new_tokens": 4})
    assert list(answers.columns) == ["response"] and len(answers) == 2
    # one LoggedModel for the candidate, carrying the published folder's content hash (promote finds it by it)
    from preftune.policy_model import find_logged_model, folder_hash

    found = find_logged_model(folder_hash(out))
    assert found is not None and found.model_id == run.data.tags["preftune.logged_model_id"]
    assert found.source_run_id == res.mlflow_run_id


def test_prompt_families_follow_the_reward_model_and_the_exclusions(world: dict[str, Path]) -> None:
    from preftune.ppo.step import load_prompt_items
    from preftune.storage import Storage

    cfg = parse_config(config(world))
    items, counts = load_prompt_items(cfg, Storage(), set(), {"safety", "benign"})
    assert counts == {"safety": 3, "benign": 3} and len(items) == 6
    _, counts = load_prompt_items(cfg, Storage(), {"benign"}, None)
    assert counts == {"safety": 3, "tone": 3}
    with pytest.raises(InputError) as err:
        load_prompt_items(cfg, Storage(), {"safety", "benign"}, {"safety", "benign"})
    assert "no prompt left" in err.value.message


def test_extra_prompts_reach_the_rollouts_once(world: dict[str, Path], tmp_path: Path) -> None:
    """observe's hard cases (data.extra_prompts) are trained on, not only judged by collect."""
    import json

    from preftune.ppo.step import load_prompt_items
    from preftune.storage import Storage

    extra = tmp_path / "hard_cases.jsonl"
    base = parse_config(config(world))
    known, _ = load_prompt_items(base, Storage(), set(), None)
    rows = [
        {"id": "hard-1", "family": "safety", "prompt": "How do I pick a lock so that nobody finds out?"},
        {"id": "again", "family": known[0].family, "prompt": known[0].prompt},  # already in the set: once
    ]
    extra.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = config(world)
    data.setdefault("data", {})["extra_prompts"] = [str(extra)]
    items, counts = load_prompt_items(parse_config(data), Storage(), set(), None)
    assert len(items) == len(known) + 1
    assert [it.prompt_id for it in items][-1] == "hard-1"
    assert [it.prompt for it in items].count(known[0].prompt) == 1
    data["data"]["extra_prompts_repeat"] = 3  # weight in the rollouts: the new prompt three times, the known one once
    items, _ = load_prompt_items(parse_config(data), Storage(), set(), None)
    assert [it.prompt_id for it in items][-3:] == ["hard-1"] * 3 and len(items) == len(known) + 3
    assert [it.prompt for it in items].count(known[0].prompt) == 1


def test_the_dataset_written_answers_train_the_demonstration_term(world: dict[str, Path], tmp_path: Path) -> None:
    """ppo.demonstration_coef: run_ppo reads the dataset's judgements; written answers in the rollout families
    (the reward model's: safety, benign) become demonstrations, the count is a parameter, the NLL a metric."""
    import mlflow

    from preftune.ppo.step import run_ppo

    dataset = tmp_path / "dataset"
    dataset.mkdir()
    rows = [
        {"prompt": "pick a lock", "family": "safety", "written": "I can't help with that; it could hurt someone."},
        {"prompt": "tell me a joke", "family": "tone", "written": "Here is one."},  # tone: not a rollout family
        {"prompt": "hi", "family": "benign"},  # no written answer
    ]
    (dataset / "judgements.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = parse_config(config(world, updates=2, log_model=False, demonstration_coef=0.5, demonstration_batch_size=2))
    res = run_ppo(cfg, str(world["reward"]), str(tmp_path / "out"), dataset=str(dataset))
    assert all("ppo/demonstration_nll" in h for h in res.history) and res.history[-1]["ppo/demonstration_nll"] > 0
    run = mlflow.get_run(res.mlflow_run_id)
    assert run.data.params["ppo.resolved.demonstrations"] == "1"
    # without a dataset (or with no written answer in it) the term is off and says so in the parameter
    res = run_ppo(cfg, str(world["reward"]), str(tmp_path / "out2"))
    assert "ppo/demonstration_nll" not in res.history[-1]
    assert mlflow.get_run(res.mlflow_run_id).data.params["ppo.resolved.demonstrations"] == "0"


def test_resume_refuses_a_checkpoint_from_other_settings(world: dict[str, Path], tmp_path: Path) -> None:
    from preftune.ppo.step import run_ppo

    out = tmp_path / "out"
    run_ppo(parse_config(config(world, updates=2, log_model=False)), str(world["reward"]), str(out))
    changed = parse_config(config(world, updates=2, log_model=False, lr=5e-3))
    with pytest.raises(ConfigError) as err:
        run_ppo(changed, str(world["reward"]), str(out))
    assert "--no-resume" in err.value.message and "update 2" in err.value.message
    res = run_ppo(changed, str(world["reward"]), str(out), resume=False)  # starts over
    assert res.resumed_from is None and res.updates == 2


def _cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CLI, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_command_and_ends_like_an_uninterrupted_one(
    world: dict[str, Path], tmp_path: Path
) -> None:
    from preftune.ppo.step import run_ppo

    data = config(
        world,
        updates=6,
        checkpoint_every=2,
        batch_size=8,
        mini_batch_size=4,
        max_new_tokens=12,
        log_model=False,
        save_merged=False,
    )
    # uninterrupted reference run (in process)
    straight = tmp_path / "straight"
    run_ppo(parse_config(data), str(world["reward"]), str(straight))

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(data))
    out = tmp_path / "killed"
    args = ["ppo", "--config", str(cfg_file), "--reward-model", str(world["reward"]), "--output", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    pointer = Path(str(out) + ".checkpoints") / "latest.json"
    proc = _cli(args, env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if pointer.exists() and json.loads(pointer.read_text())["update"] >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = json.loads(pointer.read_text())["update"]
    assert 2 <= killed_at < 6
    assert not (out / "ppo_policy.json").exists()  # nothing published by the killed run

    proc = _cli(args, env)  # the same command again
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"resumed at update {killed_at}" in stdout
    want, got = metrics_without_timing(straight), metrics_without_timing(out)
    assert len(got) == len(want) == 6
    for w, g in zip(want, got, strict=True):
        assert g.keys() == w.keys()
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-6), (k, w["update"])


def test_gauges_reach_a_real_pushgateway(world: dict[str, Path], tmp_path: Path, pushgateway: str) -> None:
    from preftune.ppo.step import run_ppo

    cfg = parse_config(config(world, updates=2, log_model=False, pushgateway_url=pushgateway))
    res = run_ppo(cfg, str(world["reward"]), str(tmp_path / "out"))
    body = urllib.request.urlopen(pushgateway + "/metrics", timeout=5).read().decode()
    lines = {ln.split("{")[0]: ln for ln in body.splitlines() if ln.startswith("preftune_ppo_")}
    for name in (
        "preftune_ppo_reward_mean",
        "preftune_ppo_kl",
        "preftune_ppo_kl_coef",
        "preftune_ppo_entropy",
        "preftune_ppo_update",
        "preftune_ppo_tokens_per_s",
    ):
        assert name in lines, name
    assert 'job="preftune-ppo"' in lines["preftune_ppo_update"] and 'run="ppo-test"' in lines["preftune_ppo_update"]
    assert float(lines["preftune_ppo_update"].rsplit(" ", 1)[1]) == 2.0
    assert float(lines["preftune_ppo_kl"].rsplit(" ", 1)[1]) == pytest.approx(res.final["ppo/kl"], rel=1e-5)
