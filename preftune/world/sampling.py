"""Sampling a policy on demo prompts and measuring which behaviours it chooses.

Why here: the demo command, the world's manifest and the tests all need the same measurement
("what share of answers is each behaviour, per family"), done the way collect and PPO sample:
batched, prompts left-padded, KV cache on, seeded, stop at EOS.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from preftune.errors import InputError
from preftune.world.classifier import UNKNOWN, classify
from preftune.world.corpus import FAMILIES, format_prompt


def sample_responses(
    policy_path: str | Path,
    prompts: Sequence[Mapping[str, Any]],
    n_samples: int,
    *,
    batch_size: int = 64,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    num_threads: int = 1,
    progress: bool | None = None,
) -> list[list[str]]:
    """``n_samples`` decoded responses per prompt record (``{"prompt": user text, ...}``), in order.

    ``batch_size`` counts sequences (prompt copies), so memory does not grow with ``n_samples``.
    Results depend only on the model, the prompts, the arguments and ``seed``: the torch thread
    count is pinned to ``num_threads`` for the call. One thread is the default because generation
    with a tiny model is many small steps: a second OpenMP thread gains little on an idle machine,
    and on a busy one (or a pod at its CPU limit) spinning OpenMP barriers made it ten times slower
    in our measurements.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if n_samples < 1:
        raise InputError(f"n_samples must be at least 1, got {n_samples}")
    tokenizer = AutoTokenizer.from_pretrained(str(policy_path))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(policy_path))
    model.eval()

    flat = [str(rec["prompt"]) for rec in prompts for _ in range(n_samples)]
    out: list[str] = []
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        torch.manual_seed(seed)
        bar = tqdm(
            total=len(flat),
            desc="sampling",
            unit="seq",
            disable=None if progress is None else not progress,
            leave=False,
        )
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            enc = tokenizer([format_prompt(p) for p in chunk], return_tensors="pt", padding=True)
            with torch.no_grad():
                gen = model.generate(
                    **enc,
                    do_sample=True,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=0,
                    max_new_tokens=max_new_tokens,
                    use_cache=True,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = gen[:, enc["input_ids"].shape[1] :]
            out.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
            bar.update(len(chunk))
        bar.close()
    finally:
        torch.set_num_threads(prev_threads)
    return [out[i * n_samples : (i + 1) * n_samples] for i in range(len(prompts))]


def behaviour_shares(
    prompts: Sequence[Mapping[str, Any]], responses: Sequence[Sequence[str]]
) -> dict[str, dict[str, float]]:
    """Per family, the share of each behaviour (and of ``"unknown"``) among the responses."""
    counts: dict[str, Counter[str]] = {}
    for rec, texts in zip(prompts, responses, strict=True):
        family = str(rec["family"])
        c = counts.setdefault(family, Counter())
        for text in texts:
            c[classify(family, text)] += 1
    shares: dict[str, dict[str, float]] = {}
    for family in sorted(counts, key=lambda f: list(FAMILIES).index(f)):
        total = sum(counts[family].values())
        names = (*FAMILIES[family].behaviours, UNKNOWN)
        shares[family] = {b: counts[family][b] / total for b in names}
    return shares


def sample_behaviour_shares(
    policy_path: str | Path,
    prompts: Sequence[Mapping[str, Any]],
    n_samples: int = 8,
    *,
    batch_size: int = 64,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    num_threads: int = 1,
    progress: bool | None = None,
) -> dict[str, dict[str, float]]:
    """Sample ``n_samples`` answers per prompt and return ``{family: {behaviour: share, "unknown": share}}``.

    ``prompts`` are records with ``"family"`` and ``"prompt"`` (user text), such as the lines of
    ``prompts_eval.jsonl``. Shares within a family sum to 1.
    """
    responses = sample_responses(
        policy_path,
        prompts,
        n_samples,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        num_threads=num_threads,
        progress=progress,
    )
    return behaviour_shares(prompts, responses)
