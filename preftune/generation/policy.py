"""Loading policies, seeded sampling, and log-probabilities for KL and capability.

Why the sampling is organised this way: the candidate and the champion are sampled with the
*same* seeds on the *same* batches (common random numbers). Where two models agree, they then
mostly draw the same answer, so the paired candidate-minus-champion differences, and their
confidence intervals, show the models' difference rather than sampling luck. Batch i is seeded
with ``generation.seed + i`` and batch composition is fixed by the suite, so an evaluation is
reproducible on the same hardware and thread count.

A policy folder is either a full model (``save_pretrained``) or a peft LoRA adapter
(``adapter_config.json``), whose base is resolved through ``preftune.world.resolve_model_ref``
for ``demo:`` references. Adapters are merged for generation (fewer matmuls; same outputs).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preftune.common.metadata import read_metadata_json
from preftune.errors import InputError
from preftune.text import render_prompt

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass
class LoadedPolicy:
    path: str
    model: Any
    tokenizer: Any
    is_adapter: bool


def _resolve_base(ref: str, world: Any = None) -> str:
    if ref.startswith("demo:"):
        from preftune.world import resolve_model_ref

        return str(resolve_model_ref(ref, world))
    return ref


@dataclass(frozen=True)
class PolicyLayout:
    """Where a policy folder's weights are: a full model, or an adapter over a base."""

    weights: Path
    adapter: Path | None
    base: Path | None


def policy_layout(path: str | Path, world: Any = None) -> PolicyLayout:
    """Read a policy folder: ``save_pretrained`` weights, a peft adapter, or ``preftune ppo`` output.

    ``preftune ppo`` publishes ``ppo_policy.json`` naming merged weights (``merged``) and/or an
    adapter sub-folder (``adapter``) over ``base_path``; merged weights are preferred.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"{folder}: policy folder not found (expected a save_pretrained folder or a LoRA adapter)")
    meta_file = folder / "ppo_policy.json"
    if (
        meta_file.is_file()
        and not (folder / "config.json").is_file()
        and not (folder / "adapter_config.json").is_file()
    ):
        meta = read_metadata_json(meta_file, fmt="preftune.ppo_policy", missing=f"{meta_file}: missing")
        if meta.get("merged"):
            return PolicyLayout(folder / str(meta["merged"]), None, None)
        if meta.get("adapter"):
            adapter = folder / str(meta["adapter"])
            base = meta.get("base_path") or meta.get("base")
            return PolicyLayout(adapter, adapter, Path(_resolve_base(str(base), world)) if base else None)
        raise InputError(f"{meta_file}: names neither merged weights nor an adapter")
    adapter_cfg = folder / "adapter_config.json"
    if adapter_cfg.is_file():
        try:
            base_ref = json.loads(adapter_cfg.read_text(encoding="utf-8"))["base_model_name_or_path"]
        except (OSError, ValueError, KeyError) as err:
            raise InputError(f"{adapter_cfg}: cannot read base_model_name_or_path ({err})") from None
        return PolicyLayout(folder, folder, Path(_resolve_base(str(base_ref), world)))
    return PolicyLayout(folder, None, None)


def load_policy(path: str | Path, device: torch.device | str = "cpu", world: Any = None) -> LoadedPolicy:
    """A causal LM and its tokenizer from a full-model folder, a LoRA adapter folder or a PPO output."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    layout = policy_layout(path, world)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if layout.adapter is not None:
            from peft import PeftModel

            if layout.base is None or not layout.base.is_dir():
                raise InputError(
                    f"{path}: the adapter's base model {layout.base} is not a local folder; nothing may be "
                    "downloaded, so save the adapter with a local base path (or publish merged weights)"
                )
            base = AutoModelForCausalLM.from_pretrained(str(layout.base), dtype=torch.float32)
            model = PeftModel.from_pretrained(base, str(layout.adapter)).merge_and_unload()
            has_tok = any((layout.adapter / f).is_file() for f in TOKENIZER_FILES)
            tok_src = str(layout.adapter) if has_tok else str(layout.base)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(layout.weights), dtype=torch.float32)
            tok_src = str(layout.weights)
        tokenizer = AutoTokenizer.from_pretrained(tok_src)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot load the policy: {err}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.to(device).eval()
    return LoadedPolicy(str(path), model, tokenizer, layout.adapter is not None)


@dataclass
class Sample:
    case_index: int
    sample_index: int
    text: str
    response_ids: list[int]
    ended: bool


def sample(
    policy: LoadedPolicy,
    prompts: Sequence[str],
    *,
    n_samples: int,
    seed: int,
    temperature: float,
    top_p: float,
    top_k: int,
    max_new_tokens: int,
    batch_size: int,
    progress: Any = None,
) -> list[Sample]:
    """``n_samples`` responses per prompt, case-major, seeded per batch (see the module docstring)."""
    tok, model = policy.tokenizer, policy.model
    device = next(model.parameters()).device
    rows = [(i, s) for i in range(len(prompts)) for s in range(n_samples)]
    rendered = [render_prompt(p, tok) for p in prompts]
    eos = tok.eos_token_id
    out: list[Sample] = []
    for b, start in enumerate(range(0, len(rows), batch_size)):
        chunk = rows[start : start + batch_size]
        enc = tok([rendered[i] for i, _ in chunk], return_tensors="pt", padding=True).to(device)
        torch.manual_seed(seed + b)
        if device.type == "cuda":
            torch.cuda.manual_seed_all(seed + b)
        with torch.inference_mode():
            gen = model.generate(
                **enc,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                max_new_tokens=max_new_tokens,
                use_cache=True,
                eos_token_id=eos,
                pad_token_id=tok.pad_token_id,
            )
        new = gen[:, enc["input_ids"].shape[1] :].tolist()
        for (i, s), ids in zip(chunk, new, strict=True):
            ended = eos is not None and eos in ids
            if ended:
                ids = ids[: ids.index(eos) + 1]  # keep EOS: choosing to stop is part of the response
            elif tok.pad_token_id is not None and tok.pad_token_id != eos:
                while ids and ids[-1] == tok.pad_token_id:
                    ids = ids[:-1]
            text = tok.decode(ids, skip_special_tokens=True).strip()
            out.append(Sample(i, s, text, ids, ended))
        if progress is not None:
            progress(len(chunk))
    return out


def response_logprobs(
    policy: LoadedPolicy,
    prompts: Sequence[str],
    samples: Sequence[Sample],
    *,
    temperature: float,
    batch_size: int,
) -> list[np.ndarray]:
    """Per-token log-probabilities of each sample's response tokens under ``policy`` (teacher forcing).

    ``temperature`` divides the logits, so that the candidate's values are those it sampled with
    and the reference's are comparable. Prompts are tokenized the same way as for sampling.
    """
    tok, model = policy.tokenizer, policy.model
    device = next(model.parameters()).device
    prompt_ids = {}
    for s in samples:
        if s.case_index not in prompt_ids:
            prompt_ids[s.case_index] = tok(render_prompt(prompts[s.case_index], tok))["input_ids"]
    out: list[np.ndarray] = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        seqs = [prompt_ids[s.case_index] + s.response_ids for s in chunk]
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, x in enumerate(seqs):
            ids[r, : len(x)] = torch.tensor(x)
            mask[r, : len(x)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits / temperature, dim=-1)
        for r, s in enumerate(chunk):
            p_len = len(prompt_ids[s.case_index])
            n = len(s.response_ids)
            if n == 0:
                out.append(np.zeros(0, dtype=np.float64))
                continue
            targets = torch.tensor(s.response_ids, device=logp.device)
            rows = logp[r, p_len - 1 : p_len - 1 + n]
            out.append(rows.gather(-1, targets[:, None]).squeeze(-1).double().cpu().numpy())
    return out


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers map text to the same ids (a KL over token ids needs it)."""
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def text_logliks(
    policy: LoadedPolicy,
    texts: Sequence[str],
    *,
    max_tokens: int,
    prompts: Sequence[str | None] | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """Mean per-token log-likelihood (nats) of each text under ``policy``.

    A plain text is scored from its second token on. With a prompt, only the text's tokens are
    scored, as the response to the rendered prompt (the way the policy sees a conversation).
    """
    tok, model = policy.tokenizer, policy.model
    device = next(model.parameters()).device
    prompts = list(prompts) if prompts is not None else [None] * len(texts)
    encoded: list[tuple[list[int], int]] = []  # (ids, index of the first scored token)
    for t, p in zip(texts, prompts, strict=True):
        if p is None:
            ids = tok(t)["input_ids"][:max_tokens]
            start = 1
        else:
            ctx = tok(render_prompt(p, tok))["input_ids"]
            ids = (ctx + tok(" " + t.strip())["input_ids"])[: len(ctx) + max_tokens]
            start = len(ctx)
        if len(ids) - start < 1 or len(ids) < 2:
            raise InputError(f"capability text {t[:40]!r} is too short to score (needs at least 2 tokens)")
        encoded.append((ids, start))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = np.zeros(len(encoded), dtype=np.float64)
    for b0 in range(0, len(encoded), batch_size):
        chunk = encoded[b0 : b0 + batch_size]
        width = max(len(x) for x, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)
        for r, (x, start) in enumerate(chunk):
            ids[r, : len(x)] = torch.tensor(x)
            mask[r, : len(x)] = 1
            scored[r, start : len(x)] = True
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(device)[..., None]).squeeze(-1)
        valid = scored[:, 1:].to(device)
        out[b0 : b0 + len(chunk)] = ((logp * valid).sum(-1) / valid.sum(-1)).double().cpu().numpy()
    return out
