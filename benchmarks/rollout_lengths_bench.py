"""Rollout prompts of mixed length and with a shared system text: length batching and prefix reuse, on and off.

Three questions of issue 20, measured on the KV-cache engine (``preftune.ppo.engine.KVCacheEngine``):

- ``ppo.rollout_length_batching``: a rollout of ``--batch`` prompts whose lengths differ (a mix of
  short questions and long, pasted-in prompts), decoded in forward chunks of ``--forward-batch``
  rows; without the option every chunk carries the longest prompt's columns, with it the prompts
  are grouped by length and each chunk is cut to its own longest.
- How much a shared-prefix cache could save: the share of the rollout's time spent in the prefill
  (one forward over the prompts, as the engine runs it); reusing a shared prefix saves at most
  that share times the prefix's share of the prompt tokens.
- ``ppo.rollout_share_prefix``: the same prompts behind one system text (``--system-words`` words,
  as a chat template's system prompt puts before every prompt), with and without prefilling the
  shared text once per chunk.

Random-weight models from ``ppo_bench.py`` (``--size tiny``: 0.3 M, ``small``: GPT-2 small's config,
124 M; ``PPO_BENCH_MODELS=DIR`` caches them), the base model (no adapter), T = 1, best of
``--repeats`` after one untimed call. Prints one JSON object.

    python benchmarks/rollout_lengths_bench.py --size small --threads 2
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

#: Prompt lengths in words: most prompts short, a few long (a pasted document, a long conversation).
LENGTH_MIX = (4, 6, 8, 12, 16, 24, 48, 96)


def mixed_prompts(n: int, seed: int) -> list[str]:
    from ppo_bench import PROMPTS

    rng = random.Random(seed)
    words = " ".join(PROMPTS).split()
    return [" ".join(rng.choice(words) for _ in range(rng.choice(LENGTH_MIX))) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="small", choices=["tiny", "small"])
    ap.add_argument("--batch", type=int, default=32, help="prompts per rollout")
    ap.add_argument("--forward-batch", type=int, default=8, help="rows per forward chunk (ppo.forward_batch_size)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--system-words", type=int, default=40, help="words of the shared system text")
    args = ap.parse_args()

    import torch
    from ppo_bench import build_models
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.ppo.engine import KVCacheEngine, SamplingParams
    from preftune.ppo.policy import position_ids_from_mask
    from preftune.text import render_prompt

    torch.set_num_threads(args.threads)
    models = build_models(args.size, Path(tempfile.mkdtemp(prefix="rollout-lengths-")), fit=False)
    tok = AutoTokenizer.from_pretrained(models["policy"])
    model = AutoModelForCausalLM.from_pretrained(models["policy"], dtype=torch.float32).eval()
    tok.padding_side = "left"
    texts = [render_prompt(p, tok) for p in mixed_prompts(args.batch, args.seed)]
    enc = tok(texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    lengths = mask.sum(dim=1)
    params = SamplingParams(
        args.new_tokens, 1.0, tok.eos_token_id, tok.pad_token_id, with_scores=True, batch_size=args.forward_batch
    )

    def best(fn: Any) -> tuple[float, Any]:
        fn(args.repeats)  # one untimed call first: allocator and kernel warm-up are nobody's cost
        times, out = [], None
        for r in range(args.repeats):
            t0 = time.perf_counter()
            out = fn(r)
            times.append(time.perf_counter() - t0)
        return min(times), out

    rows: dict[str, Any] = {}
    for name, opts in {"chunks as given": {}, "length batching": {"length_batching": True}}.items():
        engine = KVCacheEngine(model, **opts)

        def run(r: int, engine: Any = engine) -> Any:
            return engine.generate(ids, mask, params, torch.Generator().manual_seed(r))

        sec, gen = best(run)
        rows[name] = {
            "seconds": sec,
            "forward_tokens": gen.n_forward_tokens,
            "response_tokens": int(gen.response_ids.numel()),
            "samples_per_s": args.batch / sec,
        }

    @torch.no_grad()
    def prefill(_: int) -> int:  # the engine's prefill alone, chunk by chunk, as given (no length batching)
        for start in range(0, ids.shape[0], args.forward_batch):
            sl = slice(start, start + args.forward_batch)
            model(
                input_ids=ids[sl],
                attention_mask=mask[sl],
                position_ids=position_ids_from_mask(mask[sl]),
                use_cache=True,
                logits_to_keep=1,
                output_hidden_states=True,
            )
        return 0

    prefill_s, _ = best(prefill)
    base = rows["chunks as given"]["seconds"]

    from ppo_bench import PROMPTS

    words = " ".join(PROMPTS).split()
    system = "System: " + " ".join(words[i % len(words)] for i in range(args.system_words)) + ".\n"
    enc = tok([system + t for t in texts], padding=True, return_tensors="pt")
    sys_ids, sys_mask = enc["input_ids"], enc["attention_mask"]
    shared: dict[str, Any] = {}
    for name, opts in {"system text, prefilled per row": {}, "system text prefilled once": {"share_prefix": 8}}.items():
        engine = KVCacheEngine(model, **opts)

        def run_sys(r: int, engine: Any = engine) -> Any:
            return engine.generate(sys_ids, sys_mask, params, torch.Generator().manual_seed(r))

        sec, gen = best(run_sys)
        shared[name] = {"seconds": sec, "forward_tokens": gen.n_forward_tokens, "samples_per_s": args.batch / sec}
    print(
        json.dumps(
            {
                "size": args.size,
                "batch": args.batch,
                "forward_batch": args.forward_batch,
                "new_tokens": args.new_tokens,
                "threads": args.threads,
                "prompt_tokens": {
                    "min": int(lengths.min()),
                    "max": int(lengths.max()),
                    "mean": float(lengths.float().mean()),
                },
                "rows": rows,
                "length_batching_speedup": base / rows["length batching"]["seconds"],
                "prefill_seconds": prefill_s,
                "prefill_share_of_rollout": prefill_s / base,
                "system_text_tokens": len(tok(system)["input_ids"]),
                "shared_prefix_rows": shared,
                "share_prefix_speedup": shared["system text, prefilled per row"]["seconds"]
                / shared["system text prefilled once"]["seconds"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
