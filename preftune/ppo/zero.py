"""DeepSpeed (ZeRO) for the PPO update: ``ppo.deepspeed_config`` names a DeepSpeed config file.

The trainer keeps one code path for CPU and GPU: rollouts, rewards, GAE and the losses are the
same; with DeepSpeed on, only three things change (see ``PPOTrainer.attach_engine``):

- ``engine.backward(loss)`` replaces ``loss.backward()`` (ZeRO hooks the gradients),
- ``engine.step()`` replaces the hand all-reduce (``_sync_grads``), the gradient-norm clipping
  and ``optimizer.step()``: DeepSpeed reduces (stage 1/2: reduce-scatters) the gradients, clips
  them to ``gradient_clipping`` and steps the partitioned optimiser,
- the optimiser state saved in checkpoints is each process's ZeRO partition.

:func:`reconcile` checks the file against the run config before DeepSpeed is imported (so it is
unit-tested without DeepSpeed installed): DeepSpeed's ``train_batch_size`` is preftune's
``mini_batch_size`` (responses per optimiser step, all processes), its
``gradient_accumulation_steps`` is ``grad_accum_steps``, and its micro-batch per process is
``mini_batch_size / (processes x grad_accum_steps)``. Fields left out or ``"auto"`` are filled in;
a field that disagrees is a ConfigError naming the file and the field. preftune passes its own
AdamW (its parameter groups and lr schedule) to ``deepspeed.initialize``, so the file must not
have an ``optimizer`` or ``scheduler`` section. ``deepspeed`` is imported only here, lazily (the
``gpu`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from preftune.errors import ConfigError

SUPPORTED_STAGES = (0, 1, 2)
"""ZeRO stages this trainer runs. Stage 3 partitions the frozen base too, which the LoRA reference
pass, generation and ``trainable_state`` would each have to gather first; it is refused for now."""


def _auto(value: Any) -> bool:
    return value is None or value == "auto"


def reconcile(ds: dict[str, Any], settings: Any, world_size: int, source: str) -> dict[str, Any]:
    """The DeepSpeed config to initialise with: ``ds`` with the batch fields filled in and checked.

    ``settings`` is the run config's ``ppo`` section; ``source`` names the file in messages.
    """
    if not isinstance(ds, dict):
        raise ConfigError(f"{source}: a DeepSpeed config is a JSON object, got {type(ds).__name__}")
    out = json.loads(json.dumps(ds))  # a copy, JSON-only
    mini, accum = settings.mini_batch_size, settings.grad_accum_steps
    if mini % (world_size * accum):
        raise ConfigError(
            f"{source}: ppo.mini_batch_size ({mini}) must be a multiple of processes ({world_size}) x "
            f"ppo.grad_accum_steps ({accum}) to give DeepSpeed a whole micro-batch per process"
        )
    want = {
        "train_batch_size": mini,
        "gradient_accumulation_steps": accum,
        "train_micro_batch_size_per_gpu": mini // (world_size * accum),
        "gradient_clipping": settings.max_grad_norm,
    }
    source_of = {
        "train_batch_size": "ppo.mini_batch_size (responses per optimiser step, all processes)",
        "gradient_accumulation_steps": "ppo.grad_accum_steps",
        "train_micro_batch_size_per_gpu": f"ppo.mini_batch_size / ({world_size} processes x ppo.grad_accum_steps)",
        "gradient_clipping": "ppo.max_grad_norm",
    }
    for field, value in want.items():
        given = out.get(field)
        if _auto(given):
            out[field] = value
        elif isinstance(given, bool) or not isinstance(given, int | float) or float(given) != float(value):
            raise ConfigError(
                f"{source}: {field} is {given!r} but the run config gives {value!r} ({source_of[field]}); "
                f"set it to {value!r} or 'auto', or leave it out"
            )
    if settings.critic == "separate":
        raise ConfigError(
            f"{source}: ppo.critic 'separate' runs two backward passes per micro-batch, which DeepSpeed's gradient "
            "hooks do not support; use ppo.critic 'shared' with DeepSpeed"
        )
    for section in ("optimizer", "scheduler"):
        if section in out:
            raise ConfigError(
                f"{source}: remove the '{section}' section: preftune passes its own AdamW (ppo.lr, ppo.weight_decay, "
                "ppo.adam_eps, ppo.value_head_lr_ratio) and lr schedule (ppo.lr_schedule, ppo.warmup_updates)"
            )
    zero = out.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise ConfigError(f'{source}: zero_optimization must be an object, e.g. {{"stage": 2}}')
    stage = zero.get("stage", 0)
    if stage not in SUPPORTED_STAGES:
        raise ConfigError(
            f"{source}: zero_optimization.stage is {stage!r}; this trainer runs ZeRO stages 0, 1 and 2 (stage 3 "
            "would partition the frozen base that generation and the LoRA reference pass read)"
        )
    if (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None):
        out.setdefault("zero_force_ds_cpu_optimizer", False)  # keep preftune's torch AdamW on the offloaded state
    if (out.get("fp16") or {}).get("enabled") is True:
        raise ConfigError(
            f"{source}: fp16.enabled is true; use bf16 (ppo.mixed_precision) -- fp16 loss scaling is not supported"
        )
    if (out.get("bf16") or {}).get("enabled") is True and settings.mixed_precision == "no":
        raise ConfigError(f"{source}: bf16.enabled is true but ppo.mixed_precision is 'no'; make them agree")
    return out


def load(path: str, settings: Any, world_size: int) -> dict[str, Any]:
    """Read the DeepSpeed config file at the local ``path`` and :func:`reconcile` it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"ppo.deepspeed_config: {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"ppo.deepspeed_config: {path} is not a readable JSON file ({err})") from None
    return reconcile(data, settings, world_size, path)


def initialize(actor: Any, optimizer: Any, ds_config: dict[str, Any], device: Any) -> Any:
    """``deepspeed.initialize`` over the actor-critic's trainable parameters and preftune's optimiser."""
    try:
        import deepspeed
    except ImportError:
        raise ConfigError(
            "ppo.deepspeed_config is set but DeepSpeed is not installed: pip install 'preftune[gpu]' (or leave "
            "ppo.deepspeed_config empty)"
        ) from None
    if device.type == "cpu":
        # On CPU, gloo carries the all-reduce; DeepSpeed's shared-memory comm op would first be compiled
        # (a C++ build of minutes) for a speed-up tiny models do not need. Mark it unavailable.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    params = [p for _, p in actor.trainable_named_parameters()]
    engine, _opt, _, _ = deepspeed.initialize(
        model=actor, optimizer=optimizer, model_parameters=params, config=ds_config, dist_init_required=True
    )
    return engine
