"""Candidate answers: N samples per prompt from the policy, batched, seeded, with KV cache.

The policy is any causal LM saved with ``save_pretrained`` (a folder, an ``s3://`` URI through
the storage layer, or ``demo:policy``). Prompts are rendered with
:func:`preftune.text.render_prompt` (the tokenizer's chat template when it has one), left-padded
so that every row of a batch ends where generation starts, and each prompt is expanded to
``n_candidates`` sequences inside ``model.generate`` (``num_return_sequences``), which keeps the KV
cache on. A candidate ends at the first EOS token; what follows (padding) is cut.

Seeding: the sampler is re-seeded per batch from ``(seed, batch index)``, so a run is
reproducible on the same device and batch size. Throughput (candidates/s, new tokens/s over the
wall time of the ``generate`` calls) is returned for the MLflow run.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from preftune.common.device import select_device
from preftune.data.formats import _created_at, _family, _opt_str, _prompt_text, _tags, read_raw_records
from preftune.data.records import CANDIDATES_FORMAT, FORMAT_VERSION, prompt_key, short_hash, utc_now
from preftune.data.validation import RecordError, ValidationReport
from preftune.errors import ConfigError, InputError
from preftune.text import render_prompt

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import GenerationSection, RunConfig


@dataclass(frozen=True)
class PromptRecord:
    prompt_id: str
    family: str
    tags: tuple[str, ...]
    prompt: str
    where: str = ""
    split: str = ""  # "heldout": observe held this hard case out of training, for evaluate; "train" or unmarked: not


SPLITS = ("", "train", "heldout")


def training_prompts(prompts: Sequence[PromptRecord]) -> tuple[list[PromptRecord], int]:
    """The prompts training may use (``split`` not "heldout"), and how many were held out."""
    kept = [p for p in prompts if p.split != "heldout"]
    return kept, len(prompts) - len(kept)


# --------------------------------------------------------------------------------------
# Prompts


def _prompt_from_record(rec: Any, where: str, max_chars: int | None, report: ValidationReport) -> PromptRecord | None:
    if not isinstance(rec, dict):
        report.drop("schema_error", where, f"prompt set: expected a JSON object, got {type(rec).__name__}")
        return None
    try:
        if "prompt" not in rec:
            raise RecordError("schema_error", "prompt set: record without 'prompt'")
        text = _prompt_text(rec["prompt"])
        if not text.strip():
            raise RecordError("empty_text", "empty prompt")
        family, tags = _family(rec), _tags(rec)
        pid = _opt_str(rec, "id") or _opt_str(rec, "prompt_id")
        split = _opt_str(rec, "split") or ""
        if split not in SPLITS:
            raise RecordError("schema_error", f"prompt set: 'split' must be 'train' or 'heldout', got {split!r}")
        _created_at(rec)
    except RecordError as err:
        report.drop(err.reason, where, err.detail)
        return None
    if max_chars is not None and len(text) > max_chars:
        report.repair("truncated", where, f"cut to {max_chars} chars: prompt ({len(text)} chars)")
        text = text[:max_chars]
    return PromptRecord(
        prompt_id=pid or prompt_key(text), family=family, tags=tuple(tags), prompt=text, where=where, split=split
    )


def load_prompts(spec: str, cfg: RunConfig, storage: Any, report: ValidationReport) -> list[PromptRecord]:
    """The prompt set named by ``data.prompts``: JSONL/Parquet (local or s3://) or ``demo:prompts``."""
    if spec.startswith("demo:"):
        from preftune.world import resolve_prompts_ref

        uri = resolve_prompts_ref(spec, cfg.world)  # builds (or loads) the demo world
    else:
        uri = spec
    data = storage.read_bytes(uri)
    report.sources.append(uri)
    out: list[PromptRecord] = []
    seen: set[str] = set()
    for where, rec in read_raw_records(uri, data, report):
        p = _prompt_from_record(rec, where, report.max_chars, report)
        if p is None:
            continue
        key = prompt_key(p.prompt)
        if key in seen:
            report.drop("duplicate", where, "prompt set: the same prompt text appeared earlier; kept the first")
            continue
        seen.add(key)
        out.append(p)
        report.records_kept += 1
    if not out:
        raise InputError(f"{uri}: the prompt set has no usable prompt (records need a non-empty 'prompt')")
    return out


def select_fraction(prompts: Sequence[PromptRecord], fraction: float, seed: int) -> list[PromptRecord]:
    """A seeded slice of the prompt set, the same share of every family (at least one each)."""
    if fraction >= 1.0:
        return list(prompts)
    by_family: dict[str, list[PromptRecord]] = defaultdict(list)
    for p in prompts:
        by_family[p.family].append(p)
    keep: set[str] = set()
    for recs in by_family.values():
        ordered = sorted(recs, key=lambda p: short_hash("slice", seed, prompt_key(p.prompt)))
        n = max(1, round(fraction * len(ordered)))
        keep.update(prompt_key(p.prompt) for p in ordered[:n])
    return [p for p in prompts if prompt_key(p.prompt) in keep]


# --------------------------------------------------------------------------------------
# Sampling


@dataclass
class GenerationStats:
    policy: str
    device: str
    prompts: int
    candidates: int
    new_tokens: int
    seconds: float
    candidates_per_s: float
    tokens_per_s: float
    batch_size: int
    n_candidates: int
    temperature: float
    top_p: float
    max_new_tokens: int
    prompts_truncated: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_policy(ref: str, cfg: RunConfig, storage: Any) -> str:
    """A local folder for a policy reference (demo:, models:/name@alias, s3://, a folder, a cached HF id)."""
    from preftune.models import resolve_model_ref

    return str(resolve_model_ref(ref, cfg, storage, setting="models.policy"))


def _seed_for(seed: int, batch: int) -> int:
    return int(short_hash("generate", seed, batch), 16) % (2**31 - 1)


def cut_at_eos(tokens: Sequence[int], eos_ids: set[int]) -> list[int]:
    """The tokens of a response: everything before the first EOS (padding after it included)."""
    for k, t in enumerate(tokens):
        if t in eos_ids:
            return list(tokens[:k])
    return list(tokens)


def sample_candidates(
    model_path: str,
    prompts: Sequence[PromptRecord],
    gen: GenerationSection,
    *,
    seed: int = 0,
    device: str | None = None,
    progress: bool | None = None,
    policy_ref: str | None = None,
) -> tuple[list[list[str]], GenerationStats]:
    """``gen.n_candidates`` sampled answers per prompt, in prompt order, and the throughput."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = select_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        dtype = torch.float32
        if dev.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{model_path}: cannot load the policy with from_pretrained: {first}") from None
    model.to(dev).eval()
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"  # keep the end of an over-long prompt: it is what gets answered
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos_ids = (
        model.generation_config.eos_token_id
        if model.generation_config.eos_token_id is not None
        else tokenizer.eos_token_id
    )
    eos_set = set(eos_ids if isinstance(eos_ids, list) else [eos_ids]) - {None}
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    max_prompt_tokens = None
    if max_pos:
        max_prompt_tokens = int(max_pos) - gen.max_new_tokens
        if max_prompt_tokens < 8:
            raise ConfigError(
                f"data.generation.max_new_tokens={gen.max_new_tokens} leaves no room for the prompt in the "
                f"policy's {max_pos} positions"
            )

    n = gen.n_candidates
    texts: list[list[str]] = []
    new_tokens = 0
    truncated = 0
    seconds = 0.0
    bar = tqdm(
        total=len(prompts) * n, desc="candidates", unit="cand", disable=None if progress is None else not progress
    )
    with torch.inference_mode():
        for b, start in enumerate(range(0, len(prompts), gen.batch_size)):
            batch = prompts[start : start + gen.batch_size]
            rendered = [render_prompt(p.prompt, tokenizer) for p in batch]
            full = tokenizer(rendered, add_special_tokens=False)["input_ids"]
            if max_prompt_tokens is not None:
                truncated += sum(len(ids) > max_prompt_tokens for ids in full)
            enc = tokenizer(
                rendered,
                return_tensors="pt",
                padding=True,
                truncation=max_prompt_tokens is not None,
                max_length=max_prompt_tokens,
                add_special_tokens=False,
            ).to(dev)
            torch.manual_seed(_seed_for(seed, b))
            t0 = time.perf_counter()
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=gen.temperature,
                top_p=gen.top_p,
                top_k=0,
                max_new_tokens=gen.max_new_tokens,
                num_return_sequences=n,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=sorted(eos_set) if eos_set else None,
            )
            if dev.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            new = out[:, enc["input_ids"].shape[1] :].tolist()
            for i in range(len(batch)):
                cands = []
                for row in new[i * n : (i + 1) * n]:
                    tokens = cut_at_eos(row, eos_set)
                    new_tokens += len(tokens)
                    cands.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
                texts.append(cands)
            bar.update(len(batch) * n)
    bar.close()
    total = len(prompts) * n
    stats = GenerationStats(
        policy=policy_ref or model_path,
        device=str(dev),
        prompts=len(prompts),
        candidates=total,
        new_tokens=new_tokens,
        seconds=seconds,
        candidates_per_s=total / seconds if seconds > 0 else 0.0,
        tokens_per_s=new_tokens / seconds if seconds > 0 else 0.0,
        batch_size=gen.batch_size,
        n_candidates=n,
        temperature=gen.temperature,
        top_p=gen.top_p,
        max_new_tokens=gen.max_new_tokens,
        prompts_truncated=truncated,
    )
    return texts, stats


# --------------------------------------------------------------------------------------
# The exchange format for the feedback service


def item_id_for(prompt: PromptRecord, candidates: Sequence[str]) -> str:
    """Stable id of a prompt with its candidate set (the same texts give the same id)."""
    return short_hash("item", prompt.prompt_id, [" ".join(t.split()) for t in candidates])


def candidate_records(
    prompts: Sequence[PromptRecord], texts: Sequence[Sequence[str]], policy: str, created_at: str | None = None
) -> list[dict[str, Any]]:
    """``preftune.candidates`` v1 records (what the feedback service imports as rating tasks)."""
    created_at = created_at or utc_now()
    out = []
    for p, cands in zip(prompts, texts, strict=True):
        out.append(
            {
                "format": CANDIDATES_FORMAT,
                "version": FORMAT_VERSION,
                "item_id": item_id_for(p, cands),
                "prompt_id": p.prompt_id,
                "family": p.family,
                "tags": list(p.tags),
                "prompt": p.prompt,
                "candidates": [{"id": f"c{i}", "text": t} for i, t in enumerate(cands)],
                "policy": policy,
                "created_at": created_at,
            }
        )
    return out


def candidates_jsonl(records: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
