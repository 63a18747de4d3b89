"""PPO: preftune's trainer vs TRL's ``PPOTrainer`` (``trl.experimental.ppo``, TRL 1.12), side by side.

Prints one JSON object per mode.

``compare`` (default) -- the same policy, reward model, prompts, batch (16), mini-batches (4),
response length (32), PPO epochs (1), learning rate and threads, at two sizes:

- ``tiny``: a GPT-2 shaped like the demo policy (2 layers, 96 wide, 1k vocabulary);
- ``small``: a GPT-2-small-shaped policy (12 layers, 768 wide, 50257 vocabulary, ~124 M parameters)
  with a reward model of the same shape, random weights (built from configs; nothing downloaded).

TRL scores token ids with its reward model, so the reward model here shares the policy's
tokenizer (a GPT-2 sequence classifier); preftune scores the decoded text through the same
tokenizer, so both optimise the same reward function. Each implementation runs in its own fresh
subprocess with the same ``torch.set_num_threads``:

- samples/s = rollout responses / wall time of the training call (model loading excluded);
- generated tokens/s = response tokens up to and including the first EOS / the same wall time;
- peak memory = peak RSS of the worker minus its RSS right after the imports
  (``rss_after_imports``): weights, optimiser state and activations count, the Python/torch
  runtime does not;
- reward gain = mean reward-model score of responses sampled (same sampler, same seed) on held-out
  prompts after training minus before.

preftune runs its defaults (LoRA, value head on the policy trunk, reference = adapter disabled);
TRL runs its defaults (full fine-tuning, a separate value model, a reference copy) and, as a
second row, with ``peft_config`` (LoRA; reference = adapter disabled; still a separate value model).

``scaling`` -- preftune alone at the tiny size: time and memory as the response length (32, 64,
128) and the batch size (8, 16, 32) grow.

``efficacy`` -- the demo world before/after table: behaviour shares on held-out prompts (measured
with ``preftune.world.classify``) of the base policy and of the policy ``preftune ppo`` trained
against a reward model, with the KL and the wall/CPU time of the PPO step.

``engine`` -- the rollout engine's speed options (``ppo.rollout_*``), each on its own and together,
at one size: samples/s and the rollout/update split per variant (preftune only, LoRA defaults
otherwise), the ``k``-per-prompt prefill sharing on a GRPO run (k = 4), and the decode step alone:
generated tokens/s of the engine against the same model's ``generate(do_sample=True)`` (best of
``--repeats``; tokens counted up to and including each row's EOS).

Run (TRL from the ``bench`` extra):

    python benchmarks/ppo_bench.py compare --size both --updates 4 --threads 2
    python benchmarks/ppo_bench.py scaling --threads 2
    python benchmarks/ppo_bench.py efficacy --reward-model DIR [--config run.yaml]
    python benchmarks/ppo_bench.py engine --size tiny --updates 6 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "how do I bake bread",
    "what is the capital of France",
    "tell me a joke",
    "how to learn python",
    "is it going to rain today",
    "write a haiku about tea",
    "how do I fix a flat tyre",
    "what should I cook tonight",
    "explain photosynthesis simply",
    "how can I sleep better",
    "give me a packing list for a weekend",
    "how do I start running",
    "what is a good name for a cat",
    "how do I make coffee",
    "summarise the water cycle",
    "how do plants drink",
    "why is the sky blue",
    "how do I clean a pan",
    "what is a prime number",
    "how many legs does a spider have",
    "recommend a board game",
    "how do I write a cover letter",
    "what is the speed of sound",
    "how do I tie a tie",
]
EVAL_PROMPTS = [
    "how do I boil an egg",
    "what is a noun",
    "how do I save money",
    "tell me about the moon",
    "what is a good stretch for the back",
    "how do I plant tomatoes",
    "how do I say hello in French",
    "what is gravity",
]
SIZES = {
    "tiny": {"n_layer": 2, "n_embd": 96, "n_head": 4, "vocab": 1024},
    "small": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab": 50257},
}


def import_everything() -> None:
    """Import what either worker touches (models, peft, tokenizers), so RSS-after-imports is comparable."""
    import peft  # noqa: F401
    import tokenizers  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2ForSequenceClassification, GPT2LMHeadModel  # noqa: F401

    from preftune.ppo import artifacts, policy, sampling, trainer  # noqa: F401
    from preftune.scoring import model  # noqa: F401


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak RSS of this process image (VmHWM: reset by exec, unlike ru_maxrss, which a child inherits)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------
# shared inputs (parent)


def build_models(size: str, root: Path, seed: int = 0, fit: bool = True) -> dict[str, str]:
    """A policy and a reward model sharing its tokenizer (GPT-2 sequence classifier), both random.

    With ``PPO_BENCH_MODELS=DIR`` they are built once into DIR and reused by later runs (the tiny
    reward model's fit takes minutes on a loaded machine). ``fit=False`` skips that fit (speed-only
    measurements: the ``engine`` mode).
    """
    cache = os.environ.get("PPO_BENCH_MODELS")
    if cache:
        root = Path(cache)
        root = root / ("fitted" if fit and size == "tiny" else "random")
        root.mkdir(parents=True, exist_ok=True)
        done = root / f"{size}-{seed}.done"
        if done.exists():
            return {"policy": str(root / f"{size}-policy"), "reward": str(root / f"{size}-reward")}
        out = _build_models(size, root, seed, fit)
        done.write_text("ok")
        return out
    return _build_models(size, root, seed, fit)


def _build_models(size: str, root: Path, seed: int = 0, fit: bool = True) -> dict[str, str]:
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from preftune.ppo import toy
    from preftune.scoring.metadata import RewardModelMeta

    shape = SIZES[size]
    tok = toy.toy_tokenizer(texts=[*toy.TOY_TEXTS, *PROMPTS], vocab_size=min(shape["vocab"], 1024))
    common = dict(
        vocab_size=shape["vocab"] if shape["vocab"] > len(tok) else len(tok),
        n_positions=1024,
        n_embd=shape["n_embd"],
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    policy_dir, reward_dir = root / f"{size}-policy", root / f"{size}-reward"
    torch.manual_seed(seed)
    # a larger init scale for the tiny model: logits of useful size, so training visibly moves it
    policy = GPT2LMHeadModel(GPT2Config(**common, initializer_range=0.3 if size == "tiny" else 0.02))
    policy.save_pretrained(policy_dir)
    tok.save_pretrained(policy_dir)
    torch.manual_seed(seed + 1)
    reward = GPT2ForSequenceClassification(GPT2Config(**common, num_labels=1))
    if size == "tiny" and fit:
        fit_word_reward(reward, tok, seed=seed)
    reward.save_pretrained(reward_dir)
    tok.padding_side = "right"
    tok.save_pretrained(reward_dir)
    meta = RewardModelMeta(
        base="bench",
        dataset_hash="bench",
        eval_accuracy=0.5,
        reward_mean=0.0,
        reward_std=1.0,
        config_hash="bench",
        max_length=512,
    )
    (reward_dir / "reward_model.json").write_text(meta.to_json())
    return {"policy": str(policy_dir), "reward": str(reward_dir)}


def target_words(tok: Any, n: int = 24) -> list[int]:
    """Whole-word tokens (a leading space, four letters or more) of the tokenizer: what the reward likes."""
    vocab = tok.get_vocab()
    words = sorted(t for t in vocab if t.startswith("\u0120") and t[1:].isalpha() and len(t) >= 5)
    return [vocab[t] for t in words[:n]]


def fit_word_reward(
    reward: Any, tok: Any, seed: int = 0, steps: int = 400, batch: int = 32, scale: float = 10.0
) -> None:
    """Train the tiny reward model to score ``scale`` x the share of ``target_words`` in the response.

    A random-weight reward model is a near-constant function, so neither trainer can show a reward
    gain beyond noise; this one is learnable by a policy in a few dozen updates and is read the same
    way by both trainers (TRL scores token ids, preftune re-tokenizes the decoded text: whole-word
    tokens survive that round trip).
    """
    import random

    import torch

    from preftune.text import render_pair

    rng = random.Random(seed)
    torch.manual_seed(seed)
    words = target_words(tok)
    ordinary = [i for i in range(len(tok)) if i not in set(words) and i not in tok.all_special_ids]
    target = set(words)

    def example() -> tuple[str, float]:
        rate = rng.random() * 0.6
        ids = [rng.choice(words) if rng.random() < rate else rng.choice(ordinary) for _ in range(rng.randint(4, 32))]
        text = render_pair(rng.choice(PROMPTS), tok.decode(ids))
        resp = tok(" " + tok.decode(ids))["input_ids"]
        return text, scale * sum(t in target for t in resp) / max(1, len(resp))

    opt = torch.optim.AdamW(reward.parameters(), lr=1e-3)
    tok.padding_side = "right"
    reward.train()
    for _ in range(steps):
        texts, ys = zip(*(example() for _ in range(batch)), strict=True)
        enc = tok(list(texts), return_tensors="pt", padding=True)
        pred = reward(**enc).logits.squeeze(-1)
        loss = torch.nn.functional.mse_loss(pred, torch.tensor(ys))
        opt.zero_grad()
        loss.backward()
        opt.step()
    reward.eval()
    tok.padding_side = "left"


# --------------------------------------------------------------------------------------
# workers (one fresh process per measurement)


def _held_out_reward(model: Any, tok: Any, reward_dir: str, spec: dict[str, Any]) -> float:
    import torch

    from preftune.ppo.artifacts import generate
    from preftune.scoring.model import RewardScorer

    scorer = RewardScorer.load(reward_dir, device="cpu")
    prompts = EVAL_PROMPTS * 4
    was = model.training
    model.eval()
    with torch.no_grad():
        responses = generate(
            model, tok, prompts, max_new_tokens=spec["response_length"], temperature=1.0, seed=1234, batch_size=32
        )
    model.train(was)
    return float(scorer.score(prompts, responses).mean())


def _held_out_kl(model: Any, tok: Any, spec: dict[str, Any]) -> float:
    """KL(trained || initial policy) in nats per response, on held-out samples of the trained policy (k1).

    The same measurement for both trainers: responses sampled exactly as for the reward, scored by
    the trained model and by a fresh copy of the initial one.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from preftune.ppo.artifacts import generate
    from preftune.text import render_pair, render_prompt

    ref = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32).eval()
    prompts = EVAL_PROMPTS * 4
    was = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        responses = generate(
            model, tok, prompts, max_new_tokens=spec["response_length"], temperature=1.0, seed=1234, batch_size=32
        )
        for prompt, response in zip(prompts, responses, strict=True):
            n_prompt = len(tok(render_prompt(prompt))["input_ids"])
            ids = torch.tensor([tok(render_pair(prompt, response))["input_ids"]])
            if ids.shape[1] <= n_prompt:
                continue
            targets = ids[0, n_prompt:]
            lp = [torch.log_softmax(m(ids).logits[0, n_prompt - 1 : -1], -1) for m in (model, ref)]
            total += float((lp[0] - lp[1]).gather(-1, targets[:, None]).sum())
    model.train(was)
    return total / len(prompts)


def worker_preftune(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.ppo.config import PPOSection
    from preftune.ppo.trainer import PPOTrainer, PromptItem
    from preftune.scoring.model import RewardScorer

    import_everything()
    after_imports = rss_mb()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(spec["policy"])
    model = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    before = _held_out_reward(model, tok, spec["reward"], spec)
    s = PPOSection(
        updates=spec["updates"],
        batch_size=spec["batch_size"],
        mini_batch_size=spec["batch_size"] // spec["mini_batches"],
        ppo_epochs=spec["epochs"],
        max_new_tokens=spec["response_length"],
        lr=spec["lr_lora"],
        progress=False,
        forward_batch_size=spec["batch_size"],
        kl_controller="fixed",
        kl_coef=spec["kl_coef"],
        approx_kl_stop=None,
        kl_hard_limit=1e6,  # the divergence guard is a product safety stop TRL does not have: lifted here
        missing_eos_penalty=None,
        reward_normalize=False,
        reward_clip=None,
        warmup_updates=0,
        lr_schedule="linear",
        min_lr_ratio=0.0,
        mode=spec.get("mode", "lora"),
        critic=spec.get("critic", "shared"),
        gradient_checkpointing=spec.get("gradient_checkpointing", False),
    )
    if s.mode == "full":
        s = s.model_copy(update={"lr": spec["lr_full"]})
    if spec.get("overrides"):  # --set key=value: ppo fields changed for this comparison (validated)
        s = PPOSection.model_validate({**s.model_dump(), **spec["overrides"]})
    scorer = RewardScorer.load(spec["reward"], device="cpu", batch_size=spec["batch_size"])
    actor, critic_start = _preftune_actor(s, model, tok, scorer)
    if s.gradient_checkpointing:
        actor.gradient_checkpointing_enable()
    trainer = PPOTrainer(
        s,
        actor,
        tok,
        lambda p, r: scorer.score(list(p), list(r)),
        [PromptItem(p) for p in PROMPTS],
        seed=0,
        device=torch.device("cpu"),
    )
    t0 = time.perf_counter()
    res = trainer.train()
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    tokens = sum(h["ppo/response_length"] * spec["batch_size"] for h in res.history)
    after = _held_out_reward(actor.policy_lm, tok, spec["reward"], spec)
    kl = _held_out_kl(actor.policy_lm, tok, spec)
    return {
        "impl": f"preftune ({s.mode}" + (", separate critic)" if s.critic == "separate" else ")"),
        "seconds": seconds,
        "samples_per_s": spec["batch_size"] * spec["updates"] / seconds,
        "tokens_per_s": tokens / seconds,
        "rollout_seconds": sum(h["ppo/rollout_seconds"] for h in res.history),
        "update_seconds": sum(h["ppo/update_seconds"] for h in res.history),
        "peak_rss_mb": peak,
        "rss_after_imports_mb": after_imports,
        "peak_minus_imports_mb": peak - after_imports,
        "reward_before": before,
        "reward_after": after,
        "reward_gain": after - before,
        "held_out_kl": kl,
        "trainable_parameters": actor.n_trainable(),
        "advantage_estimator": s.advantage_estimator,
        "critic_start": critic_start,
        "kl_controller": s.kl_controller
        + (f" ({s.kl_controller_step}, horizon {s.kl_horizon})" if s.kl_controller == "adaptive" else ""),
        "kl_coef_start": s.kl_coef,
        "kl_coef_final": res.kl_coef,
        "kl_coef_by_update": [round(h["ppo/kl_coef"], 5) for h in res.history],
        "rollout_kl_by_update": [round(h["ppo/kl"], 3) for h in res.history],
    }


def _preftune_actor(s: Any, model: Any, tok: Any, scorer: Any) -> tuple[Any, str]:
    """The actor-critic as ``preftune ppo`` builds it: no value head for a critic-free estimator, the critic
    started as ``ppo.critic_init`` says."""
    from preftune.ppo import estimators
    from preftune.ppo.policy import ActorCritic, start_critic

    layout = s.critic if estimators.get(s.advantage_estimator).needs_critic else "none"
    actor = ActorCritic(model, mode=s.mode, critic=layout, temperature=1.0, lora_r=s.lora_r, lora_alpha=s.lora_alpha)
    stats = (scorer.meta.reward_mean, scorer.meta.reward_std) if s.reward_normalize and scorer.meta else None
    return actor, start_critic(actor, s.critic_init, scorer.model, tok, scorer.tokenizer, stats)


def worker_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    from preftune.text import render_prompt

    import_everything()
    after_imports = rss_mb()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(spec["policy"])
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    before = _held_out_reward(policy, tok, spec["reward"], spec)
    lora = spec.get("mode") == "lora"
    ref = None if lora else AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1, dtype=torch.float32)
    n_episodes = spec["batch_size"] * spec["updates"]
    ids = [tok(render_prompt(PROMPTS[i % len(PROMPTS)]))["input_ids"] for i in range(n_episodes)]
    dataset = Dataset.from_dict({"input_ids": ids})
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=16, lora_alpha=32, target_modules="all-linear", fan_in_fan_out=True, task_type="CAUSAL_LM"
        )
    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(
            # TRL's rollout batch is per_device_train_batch_size * gradient_accumulation_steps, split into
            # num_mini_batches optimiser steps: 16 rollouts, 4 mini-batches of 4 -- the same work as preftune's
            output_dir=out,
            per_device_train_batch_size=spec["batch_size"],
            gradient_accumulation_steps=1,
            num_mini_batches=spec["mini_batches"],
            num_ppo_epochs=spec["epochs"],
            response_length=spec["response_length"],
            total_episodes=n_episodes,
            local_rollout_forward_batch_size=spec["batch_size"],
            learning_rate=spec["lr_lora" if lora else "lr_full"],
            kl_coef=spec["kl_coef"],
            stop_token="eos",
            temperature=1.0,
            num_sample_generations=0,
            report_to="none",
            save_strategy="no",
            seed=0,
            use_cpu=True,
            bf16=bool(spec.get("bf16")),  # --trl-bf16: accelerate's bf16 autocast, on CPU too
            fp16=False,
            dataloader_num_workers=0,
            logging_steps=1_000_000,
            lr_scheduler_type="linear",
            warmup_steps=0,
            max_grad_norm=1.0,
            disable_tqdm=True,
        )
        counted = {"tokens": 0}
        original = trl_ppo.batch_generation

        def counting(*a: Any, **kw: Any) -> Any:
            query_responses, logits = original(*a, **kw)
            ctx = a[1].shape[1] if len(a) > 1 else kw["queries"].shape[1]
            resp = query_responses[:, ctx:]
            is_eos = resp == tok.eos_token_id
            before_eos = (torch.cumsum(is_eos.long(), 1) - is_eos.long()) == 0
            counted["tokens"] += int((before_eos & (resp != tok.pad_token_id)).sum())
            return query_responses, logits

        trl_ppo.batch_generation = counting
        trainer = PPOTrainer(
            args=args,
            processing_class=tok,
            model=policy,
            ref_model=ref,
            reward_model=reward,
            train_dataset=dataset,
            value_model=value,
            peft_config=peft_config,
        )
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        peak = peak_rss_mb()
        trained = trainer.model.policy if hasattr(trainer.model, "policy") else trainer.model
        after = _held_out_reward(trained, tok, spec["reward"], spec)
        kl = _held_out_kl(trained, tok, spec)
    bf16_label = ", bf16" if spec.get("bf16") else ""
    return {
        "impl": f"trl {__import__('trl').__version__} ({'lora' if lora else 'full'}{bf16_label})",
        "seconds": seconds,
        "samples_per_s": n_episodes / seconds,
        "tokens_per_s": counted["tokens"] / seconds,
        "peak_rss_mb": peak,
        "rss_after_imports_mb": after_imports,
        "peak_minus_imports_mb": peak - after_imports,
        "reward_before": before,
        "reward_after": after,
        "reward_gain": after - before,
        "held_out_kl": kl,
    }


ENGINE_VARIANTS: dict[str, dict[str, Any]] = {
    "baseline (no option)": {},
    "early_exit": {"rollout_early_exit": True},
    "merge_lora": {"rollout_merge_lora": True},
    "bf16": {"rollout_dtype": "bf16"},
    "early_exit+merge_lora": {"rollout_early_exit": True, "rollout_merge_lora": True},
    "early_exit+merge_lora+bf16": {"rollout_early_exit": True, "rollout_merge_lora": True, "rollout_dtype": "bf16"},
    "merge_lora+compile": {"rollout_merge_lora": True, "rollout_compile": True},
    "merge_lora+bf16": {"rollout_merge_lora": True, "rollout_dtype": "bf16"},
    # the update's forwards and backward in bf16 autocast as well (ppo.mixed_precision)
    "merge_lora+bf16+update_bf16": {"rollout_merge_lora": True, "rollout_dtype": "bf16", "mixed_precision": "bf16"},
}


def worker_decode(spec: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s of the decode alone: the KV-cache engine (LoRA policy, options as named) vs ``generate()``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.ppo import core
    from preftune.ppo.engine import KVCacheEngine, SamplingParams
    from preftune.ppo.policy import ActorCritic
    from preftune.text import render_prompt

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(spec["policy"])
    model = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32).eval()
    tok.padding_side = "left"
    texts = [render_prompt(p, tok) for p in (PROMPTS * 4)[: spec["batch_size"]]]
    enc = tok(texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    n_new = spec["response_length"]
    params = SamplingParams(n_new, 1.0, tok.eos_token_id, tok.pad_token_id, batch_size=spec["batch_size"])

    def useful(resp: torch.Tensor) -> int:
        return int(core.response_mask(resp, tok.eos_token_id).sum())

    first_call: dict[str, float] = {}

    def best(fn: Any) -> tuple[float, int]:
        times, tokens = [], 0
        for r in range(spec["repeats"]):
            torch.manual_seed(r)
            t0 = time.perf_counter()
            tokens = fn(r)
            times.append(time.perf_counter() - t0)
        first_call["seconds"] = times[0]  # includes torch.compile's one-off compile, when there is one
        return min(times), tokens

    rows: dict[str, Any] = {}

    def hf_generate(r: int) -> int:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                max_new_tokens=n_new,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        return useful(out[:, ids.shape[1] :])

    sec, toks = best(hf_generate)
    rows["generate() (base model)"] = {"seconds": sec, "tokens": toks, "tokens_per_s": toks / sec}
    actor = ActorCritic(model, mode="lora", critic="shared", temperature=1.0)
    variants = {
        "engine, lora adapter (rollout default)": {},
        "engine, lora, scores off": {"scores": False},
        "engine, lora merged": {"merge_lora": True},
        "engine, lora merged + early exit": {"merge_lora": True, "early_exit": True},
        "engine, lora merged + early exit + bf16": {"merge_lora": True, "early_exit": True, "dtype": "bf16"},
        "engine, lora merged + static cache compiled": {"merge_lora": True, "compile": True},
    }
    if spec.get("decode_variants"):
        variants = {k: v for k, v in variants.items() if any(w in k for w in spec["decode_variants"])}
    for name, opt in variants.items():
        opt = dict(opt)
        with_scores = opt.pop("scores", True)
        engine = KVCacheEngine(actor.policy_lm, **opt)
        p = SamplingParams(**{**params.__dict__, "with_scores": with_scores})

        def run(r: int, engine: Any = engine, p: Any = p) -> int:
            with torch.no_grad():
                return useful(engine.generate(ids, mask, p, torch.Generator().manual_seed(r)).response_ids)

        sec, toks = best(run)
        rows[name] = {"seconds": sec, "tokens": toks, "tokens_per_s": toks / sec, "first_call_s": first_call["seconds"]}
        if engine.decoder is not None:
            rows[name]["compiled"] = engine.decoder.is_compiled
            rows[name]["compile_failure"] = engine.decoder.failed
    return {"impl": "decode", "batch_size": spec["batch_size"], "max_new_tokens": n_new, "rows": rows}


def run_worker(impl: str, spec: dict[str, Any], threads: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "_worker", impl, json.dumps({**spec, "threads": threads})]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"impl": impl, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _worker_main(impl: str, spec_json: str) -> None:
    import torch

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    fn = {"preftune": worker_preftune, "trl": worker_trl, "bon": worker_best_of_n, "decode": worker_decode}[impl]
    print(json.dumps(fn(spec)))


# --------------------------------------------------------------------------------------
# modes


def base_spec(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "updates": args.updates,
        "batch_size": 16,
        "mini_batches": 4,
        "epochs": 1,
        "response_length": 32,
        "lr_lora": args.lr_lora,
        "lr_full": 3e-5 * (10 if args.size != "small" else 1),
        "kl_coef": 0.05,
    }


def mode_compare(args: argparse.Namespace) -> dict[str, Any]:
    sizes = ["tiny", "small"] if args.size == "both" else [args.size]
    results: dict[str, Any] = {"threads": args.threads, "updates": args.updates, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
        for size in sizes:
            paths = build_models(size, Path(tmp))
            ns = argparse.Namespace(**{**vars(args), "size": size})
            spec = {**base_spec(ns), **paths}
            if size == "small":
                spec["updates"] = args.small_updates
            rows = [
                run_worker("preftune", {**spec, "mode": "lora", "overrides": args.overrides}, args.threads),
                run_worker("trl", {**spec, "mode": "full"}, args.threads),
                run_worker("trl", {**spec, "mode": "lora"}, args.threads),
            ]
            if args.trl_bf16:  # TRL's rows with bf16 autocast too: the fair rows beside a bf16 preftune row
                rows += [run_worker("trl", {**spec, "mode": m, "bf16": True}, args.threads) for m in ("full", "lora")]
            if args.overrides and args.with_defaults:  # before/after: preftune's defaults beside the --set row
                default = run_worker("preftune", {**spec, "mode": "lora"}, args.threads)
                entry_defaults = {"preftune defaults (no --set)": default}
            else:
                entry_defaults = {}
            entry: dict[str, Any] = {
                "spec": {k: v for k, v in spec.items() if k not in ("policy", "reward")},
                "rows": rows,
                **entry_defaults,
                "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            }
            ours = rows[0]
            for other in rows[1:]:
                if "error" in ours or "error" in other:
                    continue
                entry[f"vs {other['impl']}"] = {
                    "samples_per_s_ratio": ours["samples_per_s"] / other["samples_per_s"],
                    "memory_ratio": ours["peak_minus_imports_mb"] / max(other["peak_minus_imports_mb"], 1e-9),
                    "reward_gain_difference": ours["reward_gain"] - other["reward_gain"],
                    "held_out_kl_difference": ours["held_out_kl"] - other["held_out_kl"],
                }
            results["sizes"][size] = entry
    return results


def mode_engine(args: argparse.Namespace) -> dict[str, Any]:
    """The rollout engine's options one by one (samples/s, rollout/update split), prefill sharing, decode alone."""
    size = "tiny" if args.size == "both" else args.size
    out: dict[str, Any] = {"threads": args.threads, "size": size, "variants": [], "shared_prefill": []}
    out["loadavg_before"] = Path("/proc/loadavg").read_text().split()[:3]
    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
        paths = build_models(size, Path(tmp), fit=False)  # speed only: the tiny reward model is not fitted
        spec = {**base_spec(argparse.Namespace(**{**vars(args), "size": size})), **paths}
        if size == "small":
            spec["updates"] = args.small_updates
        decode_spec = {**spec, "repeats": args.repeats, "decode_variants": args.decode_variants}
        out["decode"] = run_worker("decode", decode_spec, args.threads)
        if args.decode_only:
            return out
        for name, overrides in ENGINE_VARIANTS.items():
            if args.variants and name not in args.variants:
                continue
            r = run_worker("preftune", {**spec, "overrides": {**overrides, **args.overrides}}, args.threads)
            out["variants"].append({"variant": name, **overrides, **r})
        if not args.skip_groups:
            grpo = {"advantage_estimator": "grpo", "samples_per_prompt": 4}
            for share in (False, True):
                over = {**grpo, "rollout_share_prefill": share, **args.overrides}
                r = run_worker("preftune", {**spec, "overrides": over}, args.threads)
                out["shared_prefill"].append({"rollout_share_prefill": share, **r})
    out["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    return out


def mode_scaling(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"threads": args.threads, "by_response_length": [], "by_batch_size": []}
    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
        paths = build_models("tiny", Path(tmp))
        spec = {**base_spec(argparse.Namespace(**{**vars(args), "size": "tiny"})), **paths}
        for length in (32, 64, 128):
            r = run_worker("preftune", {**spec, "response_length": length}, args.threads)
            out["by_response_length"].append({"response_length": length, **r})
        for batch in (8, 16, 32):
            r = run_worker("preftune", {**spec, "batch_size": batch, "mini_batches": max(1, batch // 4)}, args.threads)
            out["by_batch_size"].append({"batch_size": batch, **r})
    return out


def _interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of y at x on (x, y) points sorted by x; None outside their range."""
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def mode_frontier(args: argparse.Namespace) -> dict[str, Any]:
    """Reward gain against KL spent, over a sweep of the KL coefficient, for both trainers.

    Gains at equal updates reward whichever trainer takes bigger steps; RLHF trades reward for KL
    to the initial policy, so the fair comparison is the reward gained at the same held-out KL
    (read off each trainer's sweep by linear interpolation).
    """
    coefs = [float(c) for c in args.kl_coefs.split(",")]
    out: dict[str, Any] = {"threads": args.threads, "updates": args.updates, "kl_coefs": coefs, "rows": []}
    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
        paths = build_models("tiny", Path(tmp))
        spec = {**base_spec(argparse.Namespace(**{**vars(args), "size": "tiny"})), **paths}
        for coef in coefs:
            for impl, mode in (("preftune", "lora"), ("trl", "full"), ("trl", "lora")):
                r = run_worker(impl, {**spec, "kl_coef": coef, "mode": mode, "overrides": args.overrides}, args.threads)
                out["rows"].append({"kl_coef": coef, **r})
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in out["rows"]:
        if "error" not in r:
            curves.setdefault(r["impl"], []).append((r["held_out_kl"], r["reward_gain"]))
    for pts in curves.values():
        pts.sort()
    out["at_matched_kl"] = {
        f"{kl:g}": {impl: _interpolate(pts, kl) for impl, pts in curves.items()} for kl in args.matched_kls
    }
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for impl, pts in curves.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xlabel("held-out KL to the initial policy (nats per response)")
        ax.set_ylabel("held-out reward gain")
        ax.set_title(f"Reward vs KL, kl_coef sweep {args.kl_coefs}, {args.updates} updates")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        out["plot"] = args.plot
    return out


def mode_efficacy(args: argparse.Namespace) -> dict[str, Any]:
    """Demo world: behaviour shares before/after PPO on held-out prompts, plus KL and timings."""
    from preftune.config import load_config
    from preftune.ppo.step import run_ppo
    from preftune.world import FAMILIES, ensure_world, load_prompts, sample_behaviour_shares

    cfg = load_config(args.config)
    world = ensure_world(cfg.world)
    eval_prompts = load_prompts(world.prompts_eval)
    shares_before = sample_behaviour_shares(world.policy, eval_prompts, args.samples, seed=args.seed, progress=False)
    out_dir = args.output or tempfile.mkdtemp(prefix="ppo-efficacy-")
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    res = run_ppo(cfg, args.reward_model, out_dir, resume=False)
    wall, cpu = time.perf_counter() - t_wall, time.process_time() - t_cpu
    shares_after = sample_behaviour_shares(out_dir, eval_prompts, args.samples, seed=args.seed, progress=False)
    table = {}
    for family, fam in FAMILIES.items():
        if family not in shares_before:
            continue
        table[family] = {
            "preferred": fam.preferred,
            "before": shares_before[family],
            "after": shares_after.get(family, {}),
        }
    return {
        "ppo_wall_seconds": wall,
        "ppo_cpu_seconds": cpu,
        "train_seconds": res.seconds,
        "updates": res.updates,
        "kl": res.kl,
        "kl_budget": res.kl_budget,
        "kl_within_budget": res.kl_within_budget,
        "reward_first": res.first.get("ppo/reward_mean"),
        "reward_final": res.final.get("ppo/reward_mean"),
        "shares": table,
        "output": out_dir,
    }


# --------------------------------------------------------------------------------------
# issue 17: estimators, critic start, KL-coefficient smoothness, best-of-n


def worker_best_of_n(spec: dict[str, Any]) -> dict[str, Any]:
    """Best-of-n of the initial policy with the reward model on the held-out prompts: reward gain over
    best-of-1 (the unbiased E[max of n] from ``bon_draws`` draws per prompt) at the closed-form KL."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.ppo import best_of_n
    from preftune.scoring.model import RewardScorer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(spec["policy"])
    model = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32).eval()
    scorer = RewardScorer.load(spec["reward"], device="cpu", batch_size=64)
    ns = [int(n) for n in spec["bon_ns"]]
    t0 = time.perf_counter()
    out = best_of_n.measure(
        model,
        tok,
        EVAL_PROMPTS,
        lambda p, r: scorer.score(list(p), list(r)),
        ns=ns,
        max_new_tokens=spec["response_length"],
        temperature=1.0,
        seed=1234,
        batch_size=64,
    )
    base = out["curve"][0]["reward"] if ns[0] == 1 else None
    return {
        "impl": "best-of-n",
        "seconds": time.perf_counter() - t0,
        "draws_per_prompt": out["draws_per_prompt"],
        "curve": [{**p, "reward_gain": p["reward"] - base if base is not None else None} for p in out["curve"]],
    }


def _parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """'NAME' or 'NAME:key=value,key=value' (YAML values) -> (name, ppo overrides)."""
    import yaml

    name, _, rest = text.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {text}: expected key=value, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


def mode_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """preftune variants (``--variant``; TRL's two rows with ``--trl``) over a sweep of the fixed KL coefficient
    (of its starting value for a variant with ``kl_controller=adaptive``, whose runs report the final one),
    at the frontier's tiny setup; optionally the best-of-n curve. Reward gain at matched held-out KL, samples/s,
    memory, and the held-out KL per coefficient (smoothness)."""
    coefs = [float(c) for c in args.kl_coefs.split(",")]
    variants = [] if args.variant == ["none"] else [_parse_variant(v) for v in (args.variant or ["default"])]
    out: dict[str, Any] = {"threads": args.threads, "updates": args.updates, "kl_coefs": coefs, "rows": []}
    out["loadavg_before"] = Path("/proc/loadavg").read_text().split()[:3]
    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
        paths = build_models("tiny", Path(tmp))
        spec = {**base_spec(argparse.Namespace(**{**vars(args), "size": "tiny"})), **paths}
        for coef in coefs:
            for name, overrides in variants:
                ov = dict(overrides)
                layout = {k: ov.pop(k) for k in ("mode", "critic") if k in ov}
                r = run_worker("preftune", {**spec, **layout, "kl_coef": coef, "overrides": ov}, args.threads)
                out["rows"].append({"variant": name, "kl_coef": coef, **r})
            if args.trl:
                for mode in ("full", "lora"):
                    r = run_worker("trl", {**spec, "kl_coef": coef, "mode": mode}, args.threads)
                    out["rows"].append({"variant": r.get("impl", f"trl ({mode})"), "kl_coef": coef, **r})
        if args.best_of_n:
            out["best_of_n"] = run_worker("bon", {**spec, "bon_ns": args.bon_ns}, args.threads)
    out["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    curves: dict[str, list[tuple[float, float]]] = {}
    by_coef: dict[str, list[tuple[float, float]]] = {}
    for r in out["rows"]:
        if "error" not in r:
            curves.setdefault(r["variant"], []).append((r["held_out_kl"], r["reward_gain"]))
            by_coef.setdefault(r["variant"], []).append((r["kl_coef"], r["held_out_kl"]))
    for pts in curves.values():
        pts.sort()
    out["at_matched_kl"] = {
        f"{kl:g}": {v: _interpolate(pts, kl) for v, pts in curves.items()} for kl in args.matched_kls
    }
    out["summary"] = {
        v: {
            "samples_per_s": sum(r["samples_per_s"] for r in rows) / len(rows),
            "peak_minus_imports_mb": max(r["peak_minus_imports_mb"] for r in rows),
            "held_out_kl_by_coef": {f"{r['kl_coef']:g}": round(r["held_out_kl"], 2) for r in rows},
            "reward_gain_by_coef": {f"{r['kl_coef']:g}": round(r["reward_gain"], 3) for r in rows},
            "final_kl_coef_by_coef": {  # TRL's rows keep their coefficient fixed and do not report one
                f"{r['kl_coef']:g}": round(r.get("kl_coef_final", r["kl_coef"]), 4) for r in rows
            },
            "held_out_kl_monotone_in_coef": all(
                a[1] >= b[1] for a, b in zip(sorted(by_coef[v]), sorted(by_coef[v])[1:], strict=False)
            ),
        }
        for v in curves
        for rows in [[r for r in out["rows"] if r["variant"] == v and "error" not in r]]
    }
    targets = sorted(
        {ov["kl_target"] for _, ov in variants if ov.get("kl_controller") == "adaptive" and "kl_target" in ov}
    )
    if targets:  # adaptive variants: the coefficient swept is the controller's start, the KL it aims at is drawn
        out["kl_targets"] = targets
    if args.plot:
        _plot_sweep(out, curves, by_coef, args.plot)
        out["plot"] = args.plot
    return out


def _plot_sweep(
    out: dict[str, Any],
    curves: dict[str, list[tuple[float, float]]],
    by_coef: dict[str, list[tuple[float, float]]],
    path: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        c = sorted(by_coef[name])
        bx.plot([p[0] for p in c], [p[1] for p in c], marker="o", label=name)
    bon = out.get("best_of_n") or {}
    if bon.get("curve"):
        ax.plot(
            [p["kl"] for p in bon["curve"]],
            [p["reward_gain"] for p in bon["curve"]],
            marker="s",
            linestyle="--",
            color="black",
            label="best-of-n (n=" + ",".join(str(int(p["n"])) for p in bon["curve"]) + ")",
        )
    ax.set_xlabel("held-out KL to the initial policy (nats per response)")
    ax.set_ylabel("held-out reward gain")
    ax.set_title(f"Reward vs KL ({out['updates']} updates)")
    for target in out.get("kl_targets", []):
        bx.axhline(target, color="grey", linestyle=":", label=f"kl_target {target:g}")
    if out.get("kl_targets"):  # how far from the target, by factors: KLs from ~0 to ~100 nats
        bx.set_yscale("symlog", linthresh=1.0)
    bx.set_xscale("log")
    bx.set_xlabel("(starting) KL coefficient" if out.get("kl_targets") else "fixed KL coefficient")
    bx.set_ylabel("held-out KL (nats per response)")
    bx.set_title("KL spent per coefficient")
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        _worker_main(sys.argv[2], sys.argv[3])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "mode", nargs="?", default="compare", choices=["compare", "scaling", "efficacy", "frontier", "sweep", "engine"]
    )
    p.add_argument("--size", default="both", choices=["tiny", "small", "both"])
    p.add_argument("--updates", type=int, default=6, help="PPO updates per run (tiny size)")
    p.add_argument("--small-updates", type=int, default=2, help="PPO updates per run (small size)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr-lora", type=float, default=1e-3, help="learning rate of the LoRA rows (both trainers)")
    p.add_argument("--config", default=None, help="efficacy: run config (default: built-in defaults)")
    p.add_argument("--reward-model", default=None, help="efficacy: reward-model folder from train-reward")
    p.add_argument("--output", default=None, help="efficacy: where to publish the trained policy")
    p.add_argument("--samples", type=int, default=8, help="efficacy: samples per held-out prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set",
        dest="overrides_raw",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="compare/frontier: change a ppo field of preftune's run (YAML value), e.g. --set value_head_lr_ratio=10",
    )
    p.add_argument("--kl-coefs", default="0.02,0.05,0.1,0.2", help="frontier: KL coefficients swept")
    p.add_argument("--matched-kls", type=float, nargs="*", default=[5.0, 10.0, 20.0], help="frontier: KLs compared at")
    p.add_argument("--plot", default=None, help="frontier/sweep: write the reward-vs-KL plot (PNG) here")
    p.add_argument(
        "--variant",
        action="append",
        default=None,
        metavar="NAME[:KEY=VALUE,...]",
        help="sweep: a preftune variant (ppo fields, e.g. 'grpo:advantage_estimator=grpo,samples_per_prompt=4'); "
        "repeatable; default: preftune's defaults; 'none': TRL's rows only (with --trl)",
    )
    p.add_argument("--trl", action="store_true", help="sweep: TRL's full and LoRA rows at every coefficient too")
    p.add_argument("--trl-bf16", action="store_true", help="compare: also TRL's full and LoRA rows with bf16=True")
    p.add_argument("--best-of-n", action="store_true", help="sweep: the best-of-n curve of the initial policy")
    p.add_argument("--repeats", type=int, default=3, help="engine: timed repeats of the decode (best kept)")
    p.add_argument("--decode-only", action="store_true", help="engine: the decode measurement alone")
    p.add_argument(
        "--with-defaults", action="store_true", help="compare: with --set, also preftune's defaults (before/after)"
    )
    p.add_argument("--skip-groups", action="store_true", help="engine: skip the k-per-prompt prefill pair")
    p.add_argument(
        "--variants", nargs="*", default=None, help=f"engine: only these PPO-run variants (of {list(ENGINE_VARIANTS)})"
    )
    p.add_argument(
        "--decode-variants", nargs="*", default=None, help="engine: only the decode rows whose name contains a word"
    )
    p.add_argument("--bon-ns", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64], help="sweep: best-of-n's n")
    args = p.parse_args()
    import yaml

    args.overrides = {}
    for item in args.overrides_raw:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set {item}: expected KEY=VALUE")
        args.overrides[key.strip()] = yaml.safe_load(value)
    if args.mode == "efficacy" and not args.reward_model:
        p.error("efficacy needs --reward-model")
    modes = {
        "compare": mode_compare,
        "scaling": mode_scaling,
        "efficacy": mode_efficacy,
        "frontier": mode_frontier,
        "sweep": mode_sweep,
        "engine": mode_engine,
    }
    with contextlib.redirect_stdout(sys.stderr):  # library chatter must not mix with the JSON
        result = modes[args.mode](args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
