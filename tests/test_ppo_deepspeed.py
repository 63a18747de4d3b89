"""DeepSpeed for the PPO update: the config passthrough (no DeepSpeed needed) and a real ZeRO-2 step on CPU.

The reconciliation tests run everywhere. The engine test needs ``deepspeed`` importable (the
``gpu`` extra; 0.19.x installs from its sdist on CPU machines in seconds, see docs/ppo.md) and is
skipped otherwise: it runs one PPO update through ``deepspeed.initialize`` (ZeRO stage 2, gloo,
preftune's own AdamW, no C++ op built) and checks that it moves the weights exactly as the plain
PyTorch path does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

from preftune.config import parse_config
from preftune.errors import ConfigError
from preftune.ppo import zero
from preftune.ppo.config import PPOSection


def ppo(**kw: object) -> PPOSection:
    base: dict[str, object] = {"batch_size": 64, "mini_batch_size": 16, "grad_accum_steps": 2, "max_grad_norm": 0.5}
    base.update(kw)
    return PPOSection(**base)  # type: ignore[arg-type]


def test_batch_fields_are_filled_from_the_run_config():
    out = zero.reconcile({"zero_optimization": {"stage": 2}, "train_batch_size": "auto"}, ppo(), 4, "ds.json")
    assert out["train_batch_size"] == 16  # responses per optimiser step, all processes
    assert out["gradient_accumulation_steps"] == 2
    assert out["train_micro_batch_size_per_gpu"] == 2  # 16 / (4 processes x 2 accumulation steps)
    assert out["gradient_clipping"] == 0.5
    assert out["zero_optimization"] == {"stage": 2}


def test_agreeing_fields_pass_and_the_input_is_not_modified():
    given = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2}
    out = zero.reconcile(given, ppo(), 1, "ds.json")
    assert out["train_micro_batch_size_per_gpu"] == 8 and "gradient_clipping" not in given


@pytest.mark.parametrize(
    "ds, world, match",
    [
        ({"train_batch_size": 32}, 1, r"ds.json: train_batch_size is 32 but the run config gives 16 \(ppo.mini_batch"),
        ({"gradient_accumulation_steps": 4}, 1, r"gradient_accumulation_steps is 4 .* gives 2 \(ppo.grad_accum_steps"),
        ({"train_micro_batch_size_per_gpu": 8}, 2, r"train_micro_batch_size_per_gpu is 8 .* gives 4"),
        ({"gradient_clipping": 1.0}, 1, r"gradient_clipping is 1.0 .* gives 0.5 \(ppo.max_grad_norm\)"),
        ({"train_batch_size": "16"}, 1, r"train_batch_size is '16'"),
        ({}, 3, r"ppo.mini_batch_size \(16\) must be a multiple of processes \(3\) x ppo.grad_accum_steps \(2\)"),
        ({"zero_optimization": {"stage": 3}}, 1, r"zero_optimization.stage is 3"),
        ({"optimizer": {"type": "AdamW"}}, 1, r"remove the 'optimizer' section"),
        ({"scheduler": {"type": "WarmupLR"}}, 1, r"remove the 'scheduler' section"),
        ({"fp16": {"enabled": True}}, 1, r"fp16.enabled is true"),
        ([1, 2], 1, r"a DeepSpeed config is a JSON object"),
    ],
)
def test_inconsistent_files_name_the_file_and_field(ds: object, world: int, match: str):
    with pytest.raises(ConfigError, match=match):
        zero.reconcile(ds, ppo(), world, "ds.json")  # type: ignore[arg-type]


def test_settings_deepspeed_cannot_follow_are_refused():
    with pytest.raises(ConfigError, match="ppo.critic 'separate'"):
        zero.reconcile({}, ppo(critic="separate"), 1, "ds.json")
    with pytest.raises(ConfigError, match="bf16.enabled is true but ppo.mixed_precision is 'no'"):
        zero.reconcile({"bf16": {"enabled": True}}, ppo(mixed_precision="no"), 1, "ds.json")
    off = zero.reconcile({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, ppo(), 1, "x")
    assert off["zero_force_ds_cpu_optimizer"] is False


def test_load_reads_the_file_and_reports_bad_ones(tmp_path: Path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_batch_size": 99}))
    with pytest.raises(ConfigError, match=rf"{f}: train_batch_size is 99"):
        zero.load(str(f), ppo(), 1)
    f.write_text("{not json")
    with pytest.raises(ConfigError, match="is not a readable JSON file"):
        zero.load(str(f), ppo(), 1)
    with pytest.raises(ConfigError, match="not found"):
        zero.load(str(tmp_path / "missing.json"), ppo(), 1)


def test_the_run_config_field_and_a_missing_deepspeed(monkeypatch: pytest.MonkeyPatch):
    cfg = parse_config({"ppo": {"deepspeed_config": "configs/zero2.json"}})
    assert cfg.ppo.deepspeed_config == "configs/zero2.json"
    assert parse_config({}).ppo.deepspeed_config is None
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(ConfigError, match=r"DeepSpeed is not installed: pip install 'preftune\[gpu\]'"):
        zero.initialize(object(), object(), {}, torch.device("cpu"))


# -- the real engine on CPU ----------------------------------------------------------------------

needs_deepspeed = pytest.mark.skipif(  # .ci/run installs it, so in CI (CI=true) a missing deepspeed fails
    importlib.util.find_spec("deepspeed") is None and not os.environ.get("CI"),
    reason="deepspeed is not installed (the gpu extra)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@needs_deepspeed
def test_one_ppo_update_through_zero2_matches_plain_pytorch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import torch.distributed as dist

    from preftune.ppo import toy
    from preftune.ppo.policy import ActorCritic
    from preftune.ppo.trainer import PPOTrainer, PromptItem

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = toy.build_policy(tmp_path / "policy", eos_boost=3.0, initializer_range=0.3)
    prompts = [PromptItem(prompt=f"question {i}", family="benign", prompt_id=f"p{i}") for i in range(8)]
    # 2 mini-batches of 4, 2 accumulation steps each: DeepSpeed must step at the same boundaries
    s = PPOSection(
        batch_size=8, mini_batch_size=4, grad_accum_steps=2, max_new_tokens=6, lr=1e-2, progress=False,
        warmup_updates=0, ppo_epochs=2, approx_kl_stop=None, max_grad_norm=0.05, missing_eos_penalty=None,
    )  # fmt: skip

    def trainer() -> PPOTrainer:
        torch.manual_seed(0)  # LoRA's A matrices come from the global generator
        model, tok = AutoModelForCausalLM.from_pretrained(policy), AutoTokenizer.from_pretrained(policy)
        actor = ActorCritic(model, mode="lora", critic="shared", temperature=1.0, lora_r=4, lora_alpha=8)
        reward = lambda p, r: torch.tensor([-len(x) / 10.0 for x in r])  # noqa: E731
        return PPOTrainer(s, actor, tok, reward, prompts, seed=0, device=torch.device("cpu"))

    plain, ds = trainer(), trainer()
    ds_config = zero.reconcile({"zero_optimization": {"stage": 2}}, s, 1, "test")
    try:
        ds.attach_engine(zero.initialize(ds.actor, ds.optimizer, ds_config, torch.device("cpu")))
        assert type(ds.engine.optimizer).__name__ == "DeepSpeedZeroOptimizer"
        ro = plain.rollout(prompts, 0)
        before = {n: p.detach().clone() for n, p in plain.actor.trainable_named_parameters()}
        stats_plain = plain.update(ro, 0)
        stats_ds = ds.update(ro, 0)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert stats_ds["optimizer_steps"] == stats_plain["optimizer_steps"] == 4
    assert ds.engine.global_steps == 4  # one DeepSpeed optimiser step per mini-batch, not per micro-batch
    assert stats_ds["grad_norm"] == pytest.approx(stats_plain["grad_norm"], rel=1e-4)
    moved = 0.0
    for (name, p_plain), (_, p_ds) in zip(
        plain.actor.trainable_named_parameters(), ds.actor.trainable_named_parameters(), strict=True
    ):
        torch.testing.assert_close(p_ds.detach(), p_plain.detach(), rtol=1e-4, atol=1e-6, msg=name)
        moved += float((p_plain.detach() - before[name]).abs().sum())
    assert moved > 0  # the update did something, and DeepSpeed did the same
    assert os.environ["DS_ACCELERATOR"] == "cpu"
