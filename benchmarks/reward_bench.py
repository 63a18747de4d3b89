"""Reward-model training: preftune's trainer vs TRL's ``RewardTrainer``, same model, data and settings.

Prints one JSON object: pairs/s and peak memory of each trainer, the ratio, and both held-out
accuracies (measured by the same scoring code, so they compare).

How it is fair:
- one tiny model folder and one dataset, prepared once by the parent process;
- the SAME token ids for both trainers (prompt+response rendered with ``preftune.text`` and
  tokenized once per worker by the same function; TRL gets them pre-tokenized as
  ``chosen_ids``/``rejected_ids``, so it adds no EOS and filters nothing);
- same seed, batch size, epochs, learning rate, linear warm-up/decay, grad clipping 1.0,
  no weight decay, full fine-tuning in float32, no checkpoints, no evaluation during training;
- each trainer runs in its own fresh subprocess with the same ``torch.set_num_threads``;
  pairs/s = training pairs processed / wall time of the training call only (model loading and
  tokenization excluded for both); peak memory = peak RSS of the worker minus its RSS right
  after the imports (so library import sizes do not count);
- ``--repeats`` runs alternate the trainers and report the median.

Run (needs the ``bench`` extra, i.e. TRL):

    python benchmarks/reward_bench.py                      # synthetic data, tiny Llama built here
    python benchmarks/reward_bench.py --model demo:reward-base --dataset demo   # the demo world's
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------
# the shared inputs (parent process)

FILLERS = [
    "It depends on the details you give me.",
    "Here is some background that may matter.",
    "Take your time and note what you see.",
    "Many people ask about this every week.",
    "The first attempt rarely goes perfectly.",
    "Keep a record of each step you take.",
]


def synthetic_pairs(n_prompts: int, seed: int, start: int = 0) -> list[dict[str, Any]]:
    """Two families; the preferred behaviour is a phrase, lengths vary independently of the label."""
    rng = random.Random(seed)
    topics = [
        "the garden",
        "a river",
        "my taxes",
        "the engine",
        "a poem",
        "the budget",
        "my cat",
        "a bridge",
        "the roof",
        "a contract",
        "my knee",
        "the server",
    ]
    verbs = ["fix", "plan", "understand", "improve", "describe", "check", "repair", "review"]
    good = {
        "alpha": ["Here is a careful explanation of how to {v} {t}, step by step.", "Sure: to {v} {t}, start small."],
        "beta": ["Please ask a professional about {t}; I can share general notes.", "I suggest you consult an expert."],
    }
    bad = {
        "alpha": ["No.", "I will not help with {t} at all."],
        "beta": ["Just {v} {t} right now, it is definitely fine.", "Do it, no doubt."],
    }
    rows = []
    for i in range(start, start + n_prompts):
        fam = "alpha" if i % 2 == 0 else "beta"
        t, v = rng.choice(topics), rng.choice(verbs)
        prompt = f"How should I {v} {t}? " + " ".join(rng.sample(FILLERS, rng.randint(0, 3))) + f" (case {i})"
        for j in range(2):
            pad_c = " ".join(rng.sample(FILLERS, rng.randint(0, 4)))
            pad_r = " ".join(rng.sample(FILLERS, rng.randint(0, 4)))
            rows.append(
                {
                    "pair_id": f"p{i}-{j}",
                    "item_id": f"i{i}",
                    "prompt_id": f"q{i}",
                    "family": fam,
                    "tags": [],
                    "prompt": prompt,
                    "weight": 1.0,
                    "source": "simulated",
                    "rater_id": "r1",
                    "chosen": (rng.choice(good[fam]).format(v=v, t=t) + " " + pad_c).strip(),
                    "rejected": (rng.choice(bad[fam]).format(v=v, t=t) + " " + pad_r).strip(),
                }
            )
    return rows


def demo_world_pairs(n_train_prompts: int, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pairs from the demo world as collect would build them from the simulated panel.

    One response per behaviour per prompt, judged by every rater; each full ranking expands into
    its ordered pairs with weight 2/(N(N-1)). Train prompts from the corpus's train split, eval
    pairs from its held-out prompts.
    """
    from preftune.config import WorldSection
    from preftune.world import FAMILIES, RaterPanel, build_corpus

    cfg = WorldSection()
    corpus = build_corpus(cfg.seed)
    panel = RaterPanel(cfg.n_raters, cfg.rater_noise, cfg.contested_share, seed=cfg.seed)
    rng = random.Random(seed)

    def pairs(records: list[Any]) -> list[dict[str, Any]]:
        out = []
        for rec in records:
            texts = [rng.choice(corpus.responses(rec, b)) for b in FAMILIES[rec.family].behaviours]
            rng.shuffle(texts)
            for j in panel.judge(rec.id, rec.family, texts, prompt=rec.prompt):
                if j["best"] is None:
                    continue
                order, n = j["ranking"], len(texts)
                for a in range(n):
                    for b in range(a + 1, n):
                        out.append(
                            {
                                "pair_id": f"{j['item_id']}-{j['rater_id']}-{a}-{b}",
                                "item_id": j["item_id"],
                                "prompt_id": rec.id,
                                "family": rec.family,
                                "tags": list(rec.tags),
                                "prompt": rec.prompt,
                                "chosen": texts[order[a]],
                                "rejected": texts[order[b]],
                                "weight": 2.0 / (n * (n - 1)),
                                "source": "simulated",
                                "rater_id": j["rater_id"],
                            }
                        )
        return out

    train_recs = list(corpus.train)
    rng.shuffle(train_recs)
    return pairs(train_recs[:n_train_prompts]), pairs(list(corpus.eval))


def write_dataset(root: Path, train: list[dict], eval_: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", eval_)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "judgements.jsonl").write_text("")
    (root / "dataset.json").write_text(json.dumps({"format": "preftune.dataset", "version": 1, "hash": "bench"}))
    return root


def build_tiny_llama(out: Path, texts: list[str], hidden: int = 96, layers: int = 2, vocab: int = 1024) -> Path:
    """A tiny Llama causal LM + a byte-level BPE tokenizer trained here (shaped like the demo world's reward base)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab,
            special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------
# workers (one fresh process per measurement)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from transformers import AutoConfig, AutoModelForSequenceClassification, get_linear_schedule_with_warmup  # noqa: F401
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    from preftune.reward.config import RewardSection
    from preftune.reward.data import load_dataset, tokenize_pairs
    from preftune.reward.metrics import pairwise_accuracy
    from preftune.reward.trainer import PairwiseRewardTrainer
    from preftune.scoring.model import load_sequence_classifier, load_tokenizer

    if kind == "trl":
        from datasets import Dataset  # noqa: F401
        from trl import RewardConfig, RewardTrainer  # noqa: F401
    # transformers imports modeling code lazily: resolve the model class now so it counts as an import
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(AutoConfig.from_pretrained(spec["model"]))]
    torch.set_num_threads(spec["threads"])
    rss_after_imports = _rss()

    settings = RewardSection(
        epochs=spec["epochs"],
        batch_size=spec["batch_size"],
        lr=spec["lr"],
        warmup_ratio=spec["warmup_ratio"],
        early_stopping_patience=0,
    )
    dev = torch.device("cpu")
    ds = load_dataset(spec["dataset"])
    tok = load_tokenizer(spec["model"])
    torch.manual_seed(spec["seed"])
    model = load_sequence_classifier(spec["model"], tok, dev)
    train = tokenize_pairs(ds.train, tok, spec["max_length"])
    evald = tokenize_pairs(ds.eval, tok, spec["max_length"])

    if kind == "preftune":
        trainer = PairwiseRewardTrainer(model, tok.pad_token_id, settings, dev, seed=spec["seed"], progress=False)
        t0 = time.perf_counter()
        trainer.fit(train)
        seconds = time.perf_counter() - t0
    else:
        import math

        from datasets import Dataset
        from trl import RewardConfig, RewardTrainer

        steps = math.ceil(len(train) / spec["batch_size"]) * spec["epochs"]
        with tempfile.TemporaryDirectory() as out:
            args = RewardConfig(
                output_dir=out,
                per_device_train_batch_size=spec["batch_size"],
                gradient_accumulation_steps=1,
                num_train_epochs=spec["epochs"],
                learning_rate=spec["lr"],
                lr_scheduler_type="linear",
                warmup_steps=int(round(spec["warmup_ratio"] * steps)),
                weight_decay=0.0,
                max_grad_norm=1.0,
                seed=spec["seed"],
                data_seed=spec["seed"],
                save_strategy="no",
                eval_strategy="no",
                logging_steps=10,
                report_to=[],
                use_cpu=True,
                dataloader_num_workers=0,
                disable_tqdm=True,
                max_length=None,
                bf16=False,
                fp16=False,
                center_rewards_coefficient=None,
            )
            data = Dataset.from_dict({"chosen_ids": train.chosen, "rejected_ids": train.rejected})
            trainer_trl = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
            t0 = time.perf_counter()
            trainer_trl.train()
            seconds = time.perf_counter() - t0
        model = trainer_trl.model
        trainer = PairwiseRewardTrainer(model, tok.pad_token_id, settings, dev, progress=False)  # same scoring code

    chosen, rejected = trainer.predict(evald)
    return {
        "trainer": kind,
        "train_pairs": len(train) * spec["epochs"],
        "train_seconds": seconds,
        "pairs_per_s": len(train) * spec["epochs"] / seconds,
        "peak_mem_mb": (_peak_rss() - rss_after_imports) / 2**20,
        "eval_accuracy": pairwise_accuracy(chosen, rejected),
    }


def run_worker(kind: str, spec_path: Path) -> dict[str, Any]:
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(json.loads(spec_path.read_text())["threads"]),
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error",
    )
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", kind, "--spec", str(spec_path)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (built here), a model folder, or demo:reward-base")
    ap.add_argument(
        "--dataset",
        default=None,
        help="a preference dataset folder, or 'demo' (panel-judged demo-world pairs); default: synthetic",
    )
    ap.add_argument("--prompts", type=int, default=256, help="training prompts of the synthetic or demo dataset")
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", choices=["preftune", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(Path(args.spec).read_text()))))
        return

    with tempfile.TemporaryDirectory(prefix="reward-bench-") as tmp_s:
        tmp = Path(tmp_s)
        if args.dataset == "demo":
            dataset = write_dataset(tmp / "dataset", *demo_world_pairs(args.prompts, args.seed))
        elif args.dataset:
            dataset = Path(args.dataset)
        else:
            dataset = write_dataset(
                tmp / "dataset",
                synthetic_pairs(args.prompts, args.seed),
                synthetic_pairs(args.eval_prompts, args.seed + 1, start=100_000),
            )
        if args.model == "tiny":
            from preftune.reward.data import load_dataset

            ds = load_dataset(dataset)
            texts = [f"User: {p.prompt}\nAssistant: {p.chosen} {p.rejected}" for p in ds.train]
            model = build_tiny_llama(tmp / "model", texts)
        elif args.model.startswith("demo:"):
            from preftune.config import RunConfig
            from preftune.world import ensure_world

            paths = ensure_world(RunConfig().world)
            model = Path({"demo:reward-base": paths.reward_base, "demo:policy": paths.policy}[args.model])
        else:
            model = Path(args.model)
        spec = {
            "model": str(model),
            "dataset": str(dataset),
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "lr": args.lr,
            "warmup_ratio": args.warmup_ratio,
            "max_length": args.max_length,
            "threads": args.threads,
            "seed": args.seed,
        }
        spec_path = tmp / "spec.json"
        spec_path.write_text(json.dumps(spec))
        runs: dict[str, list[dict[str, Any]]] = {"preftune": [], "trl": []}
        for i in range(args.repeats):
            order = ("preftune", "trl") if i % 2 == 0 else ("trl", "preftune")
            for kind in order:
                runs[kind].append(run_worker(kind, spec_path))

    def summary(kind: str) -> dict[str, Any]:
        rs = runs[kind]
        return {
            "pairs_per_s": round(statistics.median(r["pairs_per_s"] for r in rs), 1),
            "peak_mem_mb": round(statistics.median(r["peak_mem_mb"] for r in rs), 1),
            "eval_accuracy": round(statistics.median(r["eval_accuracy"] for r in rs), 4),
            "train_seconds": round(statistics.median(r["train_seconds"] for r in rs), 3),
            "runs_pairs_per_s": [round(r["pairs_per_s"], 1) for r in rs],
        }

    ours, theirs = summary("preftune"), summary("trl")
    import torch
    import transformers
    import trl

    print(
        json.dumps(
            {
                "benchmark": "reward_model_training",
                "settings": {
                    **{k: v for k, v in spec.items() if k not in ("model", "dataset")},
                    "model": args.model,
                    "dataset": args.dataset or "synthetic",
                    "train_pairs": runs["preftune"][0]["train_pairs"] // args.epochs,
                    "repeats": args.repeats,
                },
                "versions": {
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "trl": trl.__version__,
                },
                "preftune": ours,
                "trl": theirs,
                "speed_ratio": round(ours["pairs_per_s"] / theirs["pairs_per_s"], 3),
                "memory_ratio": round(ours["peak_mem_mb"] / theirs["peak_mem_mb"], 3)
                if theirs["peak_mem_mb"]
                else None,
                "accuracy_delta": round(ours["eval_accuracy"] - theirs["eval_accuracy"], 4),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
