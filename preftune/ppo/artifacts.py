"""The trained-policy folder that ``preftune ppo`` publishes, and how to load it back.

Layout (published atomically with ``Storage.put_dir``)::

    <output>/
      ppo_policy.json     {"format": "preftune.ppo_policy", "version": 1, "base": <model ref>,
                           "base_path": <local folder it was loaded from>, "mode": "lora"|"full",
                           "merged": "." | null, "adapter": "adapter" | null, "reward_model": <dir>,
                           "updates", "resumed_from", "final": {metric: value}, "kl", "kl_budget",
                           "kl_within_budget", "config_hash", "mlflow_run_id", "created_at"}
      config.json, model.safetensors, tokenizer files   (merged policy: plain from_pretrained(output))
      adapter/            the LoRA adapter (peft save_pretrained) + tokenizer (lora mode)
                          -- with ppo.save_merged: false the adapter files sit at the top instead
      value_head.pt       the critic's value head (for warm-starting a later PPO run)
      metrics.json        every update's metrics
      curves.png          reward and KL per update
      samples.jsonl       the last rollout's sample generations with rewards

With ``ppo.save_merged: false`` (lora mode) the top level is a peft adapter folder (its
``base_model_name_or_path`` is the local base); :func:`load_policy` applies it to the base named in
``ppo_policy.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from preftune.common.metadata import read_metadata_json
from preftune.errors import InputError

METADATA_FILE = "ppo_policy.json"
FORMAT = "preftune.ppo_policy"
VERSION = 1


def read_metadata(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / METADATA_FILE
    return read_metadata_json(
        path,
        fmt=FORMAT,
        version=VERSION,
        missing=f"{path}: not a preftune PPO policy (no {METADATA_FILE}; train one with `preftune ppo`)",
        what="PPO policy metadata",
    )


def load_policy(folder: str | Path, *, device: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a published PPO policy: the merged weights, else base + adapter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    meta = read_metadata(folder)
    if meta.get("merged"):
        root = folder / str(meta["merged"])
        model = AutoModelForCausalLM.from_pretrained(str(root), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(root))
    elif meta.get("adapter"):
        from peft import PeftModel

        base_path = Path(str(meta.get("base_path", "")))
        if not base_path.is_dir():
            raise InputError(
                f"{folder / METADATA_FILE}: the base model {meta.get('base')!r} is not at {base_path}; publish the "
                "policy with ppo.save_merged: true, or make the base available there"
            )
        base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(folder / str(meta["adapter"]))).merge_and_unload()
        tok = AutoTokenizer.from_pretrained(str(folder / str(meta["adapter"])))
    else:
        raise InputError(f"{folder / METADATA_FILE}: names neither merged weights nor an adapter")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    if device is not None:
        model.to(device)
    return model, tok


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int,
) -> list[str]:
    """Sampled responses to raw user prompts, rendered and decoded the way PPO does."""
    import torch

    from preftune.ppo import core
    from preftune.ppo.sampling import sample
    from preftune.text import render_prompt

    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    eos = int(tokenizer.eos_token_id)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        enc = tokenizer([render_prompt(p, tokenizer) for p in chunk], padding=True, return_tensors="pt")
        s = sample(
            model,
            enc["input_ids"].to(device),
            enc["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_token_id=eos,
            pad_token_id=pad,
            generator=gen,
        )
        mask = core.response_mask(s.response_ids, eos)
        for ids, m in zip(s.response_ids.tolist(), mask.tolist(), strict=True):
            kept = [t for t, keep in zip(ids, m, strict=True) if keep and t != eos]
            out.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
    return out
