"""Data-parallel PPO on CPU: two processes under torchrun (gloo), the same code path as GPUs use."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CLI = (
    "import sys\n"
    "from preftune.cli import app, main, ppo_cmd\n"
    "if not any(c.name == 'ppo' for c in app.registered_commands):\n"
    "    ppo_cmd.register(app)\n"
    "main(sys.argv[1:])\n"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_process_gloo_run_trains_one_policy(tmp_path: Path) -> None:
    import mlflow

    from preftune.ppo import toy

    policy = toy.build_policy(tmp_path / "policy", eos_boost=3.0, initializer_range=0.3)
    reward = toy.build_reward_model(tmp_path / "reward")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "family": "benign", "prompt": f"question number {i}"}) + "\n" for i in range(12)
        )
    )
    cfg = {
        "run": {"seed": 0, "name": "ppo-ddp"},
        "models": {"policy": str(policy)},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "ppo-ddp"},
        "ppo": {
            "prompts": str(prompts),
            "updates": 3,
            "batch_size": 8,
            "mini_batch_size": 4,
            "max_new_tokens": 8,
            "threads": 1,
            "checkpoint_every": 2,
            "progress": False,
            "log_model": False,
            "lr": 1e-2,
            "ppo_epochs": 1,
            "approx_kl_stop": None,  # every mini-batch steps, so the count below is exact
        },
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    script = tmp_path / "cli.py"
    script.write_text(CLI)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        str(script),
        "ppo",
        "--config",
        str(tmp_path / "run.yaml"),
        "--reward-model",
        str(reward),
        "--output",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # process 0 alone published and tracked; the replicas ended identical (checked inside the run)
    assert proc.stdout.count("policy published to") == 1
    meta = json.loads((out / "ppo_policy.json").read_text())
    assert meta["updates"] == 3
    history = json.loads((out / "metrics.json").read_text())
    assert [h["update"] for h in history] == [1.0, 2.0, 3.0]
    assert all(h["ppo/optimizer_steps"] == 2.0 for h in history)  # 8 responses / 4 per mini-batch
    state = json.loads((Path(str(out) + ".checkpoints") / "latest.json").read_text())
    assert state["update"] == 3
    run = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(meta["mlflow_run_id"])
    assert run.data.params["ppo.resolved.processes"] == "2"

    import torch

    saved = torch.load(Path(str(out) + ".checkpoints") / "update-000003" / "state.pt", weights_only=True)
    assert len(saved["per_rank"]) == 2  # each process's random streams, for an exact resume
    assert not torch.equal(saved["per_rank"][0]["sample_gen"], saved["per_rank"][1]["sample_gen"])
