"""The demo world's models: a tiny GPT-2 base policy and a tiny Llama reward base, trained locally.

Why these two: the base policy must *know* every behaviour of a family and *choose* among them at
random, so that PPO has a real selection job (raise the preferred behaviour from about one third).
It is SFT-trained on a set where every behaviour is equally represented for every prompt, with the
loss on response tokens only. The reward base is a different architecture with its own tokenizer,
because a reward model scores *text*: nothing downstream may assume it shares the policy's
vocabulary. It is briefly pre-trained as a causal LM on the corpus so that its features are useful
when a scalar head is put on top (``AutoModelForSequenceClassification.from_pretrained(path,
num_labels=1)``).

Both are built from configs (no hub), trained with a fixed seed and thread count, saved with
``save_pretrained`` and only ever loaded back with ``from_pretrained(path)``.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from preftune.config import WorldSection
from preftune.world.corpus import FAMILIES, Corpus, PromptRecord, format_prompt

N_POSITIONS = 256
"""Context length of both models: prompts are ~35 tokens and responses ~40; PPO may sample longer."""

BATCH_SIZE = 32
"""Rows per reward-base pre-training step."""
BATCH_GROUPS = 8
"""Balanced groups per policy SFT step (2-3 rows each: one per behaviour of the family)."""
POLICY_LR = 1e-2
REWARD_BASE_LR = 3e-3
WARMUP_STEPS = 30
MIN_LR_RATIO = 0.02
REWARD_BASE_STEP_RATIO = 4
"""The reward base is pre-trained for ``sft_steps // REWARD_BASE_STEP_RATIO`` steps: features, not fluency."""


@dataclass(frozen=True)
class TrainStats:
    steps: int
    first_loss: float
    final_loss: float
    seconds: float
    n_params: int


def _n_heads(n_embd: int) -> int:
    """The most heads (up to 4) that divide the hidden size, so any ``n_embd`` from the config works."""
    return next(h for h in (4, 3, 2, 1) if n_embd % h == 0)


def policy_config(world: WorldSection, tokenizer: PreTrainedTokenizerFast) -> GPT2Config:
    """A tiny GPT-2 without dropout (PPO compares log-probs across passes; dropout would add noise)."""
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=N_POSITIONS,
        n_embd=world.n_embd,
        n_layer=world.n_layer,
        n_head=_n_heads(world.n_embd),
        n_inner=4 * world.n_embd,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def reward_base_config(world: WorldSection, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """A tiny Llama; ``pad_token_id`` is set so sequence classification can find the last real token."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=world.n_embd,
        intermediate_size=2 * world.n_embd,
        num_hidden_layers=world.n_layer,
        num_attention_heads=_n_heads(world.n_embd),
        num_key_value_heads=_n_heads(world.n_embd),
        max_position_embeddings=N_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        attention_dropout=0.0,
    )


def _pad_examples(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (ids, labels) pairs into tensors; padded labels are -100 (ignored by the loss)."""
    width = max(len(ids) for ids, _ in pairs)
    ids_t = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    lab_t = torch.full((len(pairs), width), -100, dtype=torch.long)
    for i, (ids, labels) in enumerate(pairs):
        ids_t[i, : len(ids)] = torch.tensor(ids)
        lab_t[i, : len(labels)] = torch.tensor(labels)
    return ids_t, lab_t


SLOT_NOISE_COPIES = 8
"""Extra copies of every training prompt with its slot value replaced by random letters (see below)."""


def _noise_slot(rng: random.Random) -> str:
    """A few pseudo-words of random letters: content the policy must not rely on."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join("".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(rng.randint(2, 8)))


def sft_prompts(corpus: Corpus, seed: int, noise_copies: int | None = None) -> list[PromptRecord]:
    """The training prompts plus ``noise_copies`` slot-noise variants of each.

    Why: with a few hundred prompts a tiny model can tell families apart by memorising slot words,
    and then a held-out prompt (unseen slot words) looks like no family at all. Training also on
    the same templates with random-letter slots makes the family a property of the *request's
    framing*, so the base policy keeps choosing uniformly among its family's behaviours on unseen
    prompts. The variants are SFT data only; they never appear in the prompt files.
    """
    rng = random.Random(f"preftune-world-slot-noise-{seed}")
    copies = SLOT_NOISE_COPIES if noise_copies is None else noise_copies
    out = list(corpus.train)
    for rec in corpus.train:
        for _ in range(copies):
            out.append(dataclasses.replace(rec, prompt=rec.template.format(x=_noise_slot(rng)), slot=""))
    return out


def sft_tensors(
    corpus: Corpus, tokenizer: PreTrainedTokenizerFast, seed: int = 0, noise_copies: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Policy SFT data: prompt tokens are context only (label -100); response tokens and EOS are learned.

    Every behaviour of the family appears with every response template for every prompt, so each
    behaviour is equally represented. Prompt and response are tokenized separately and concatenated,
    exactly as at generation time (the policy sees ``tokenizer(format_prompt(p))`` and continues it).

    Also returns the *balanced groups*: for one prompt and one template index, the rows of every
    behaviour of its family. Training on whole groups keeps every mini-batch balanced, so the
    policy's choice among behaviours does not drift towards whatever the last batches happened to
    over-sample.
    """
    pairs: list[tuple[list[int], list[int]]] = []
    groups: list[list[int]] = []
    response_cache: dict[str, list[int]] = {}
    for rec in sft_prompts(corpus, seed, noise_copies):
        p_ids = tokenizer(format_prompt(rec.prompt))["input_ids"]
        by_behaviour = [corpus.responses(rec, b) for b in FAMILIES[rec.family].behaviours]
        for j in range(len(by_behaviour[0])):
            group = []
            for texts in by_behaviour:
                text = texts[j]
                r_ids = response_cache.get(text)
                if r_ids is None:
                    r_ids = response_cache[text] = tokenizer(" " + text)["input_ids"] + [tokenizer.eos_token_id]
                group.append(len(pairs))
                pairs.append((p_ids + r_ids, [-100] * len(p_ids) + r_ids))
            groups.append(group)
    ids, labels = _pad_examples(pairs, tokenizer.pad_token_id)
    return ids, labels, groups


def lm_tensors(corpus: Corpus, tokenizer: PreTrainedTokenizerFast) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward-base pre-training data: whole prompt+response texts, every token learned."""
    pairs = []
    for text in corpus.texts():
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        pairs.append((ids, list(ids)))
    return _pad_examples(pairs, tokenizer.pad_token_id)


def _lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to ``MIN_LR_RATIO * peak``."""
    warm = min(WARMUP_STEPS, max(1, total // 10))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_causal_lm(
    model: PreTrainedModel,
    ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    lr: float,
    seed: int,
    pad_id: int,
    desc: str,
    groups: Sequence[Sequence[int]] | None = None,
    progress: bool | None = None,
) -> TrainStats:
    """Plain AdamW loop over seeded random mini-batches, trimming each batch to its longest row.

    With ``groups``, a mini-batch is ``BATCH_GROUPS`` whole groups of rows (see :func:`sft_tensors`);
    otherwise ``BATCH_SIZE`` random rows.
    """
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    first = final = float("nan")
    ema: float | None = None
    bar = tqdm(range(steps), desc=desc, disable=None if progress is None else not progress, leave=False)
    for step in bar:
        if groups is None:
            idx = torch.randint(0, ids.shape[0], (min(BATCH_SIZE, ids.shape[0]),), generator=gen)
        else:
            picked = torch.randint(0, len(groups), (BATCH_GROUPS,), generator=gen).tolist()
            idx = torch.tensor([row for g in picked for row in groups[g]])
        b_ids, b_lab = ids[idx], labels[idx]
        mask = b_ids.ne(pad_id)
        width = int(mask.sum(1).max())
        b_ids, b_lab, mask = b_ids[:, :width], b_lab[:, :width], mask[:, :width]
        for group in optim.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        loss = model(input_ids=b_ids, attention_mask=mask.long(), labels=b_lab).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        value = float(loss.detach())
        if step == 0:
            first = value
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        final = value
        if step % 20 == 0:
            bar.set_postfix(loss=f"{ema:.3f}")
    bar.close()
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    return TrainStats(steps, first, final, time.perf_counter() - start, n_params)


def build_policy(
    corpus: Corpus,
    tokenizer: PreTrainedTokenizerFast,
    world: WorldSection,
    out_dir: Path,
    *,
    progress: bool | None = None,
) -> TrainStats:
    """SFT the base policy and save it (model, tokenizer, sampling defaults) to ``out_dir``."""
    torch.manual_seed(world.seed)
    model = GPT2LMHeadModel(policy_config(world, tokenizer))
    ids, labels, groups = sft_tensors(corpus, tokenizer, seed=world.seed)
    stats = train_causal_lm(
        model,
        ids,
        labels,
        groups=groups,
        steps=world.sft_steps,
        lr=POLICY_LR,
        seed=world.seed,
        pad_id=tokenizer.pad_token_id,
        desc="demo world: SFT base policy",
        progress=progress,
    )
    # Sampling defaults saved with the model: plain ancestral sampling (no top-k), stop at EOS.
    model.generation_config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=48,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return stats


def build_reward_base(
    corpus: Corpus,
    tokenizer: PreTrainedTokenizerFast,
    world: WorldSection,
    out_dir: Path,
    *,
    progress: bool | None = None,
) -> TrainStats:
    """Pre-train the reward base briefly as a causal LM on the corpus text and save it to ``out_dir``."""
    torch.manual_seed(world.seed + 1)
    model = LlamaForCausalLM(reward_base_config(world, tokenizer))
    ids, labels = lm_tensors(corpus, tokenizer)
    stats = train_causal_lm(
        model,
        ids,
        labels,
        steps=max(20, world.sft_steps // REWARD_BASE_STEP_RATIO),
        lr=REWARD_BASE_LR,
        seed=world.seed + 1,
        pad_id=tokenizer.pad_token_id,
        desc="demo world: pre-train reward base",
        progress=progress,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return stats
