"""Small models built from configs (no hub): for the PPO tests and ``benchmarks/ppo_bench.py``.

A policy folder (GPT-2 causal LM + a byte-level BPE tokenizer trained here with ``tokenizers``) and
a reward-model folder in the layout ``preftune train-reward`` publishes (a Llama sequence
classifier with its OWN tokenizer and a ``reward_model.json``), so the PPO step can be exercised
end to end, at any size, before (or without) the demo world. Random weights: these models are for
mechanics and speed, not for behaviour.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

TOY_TEXTS: tuple[str, ...] = tuple(
    f"User: {q}\nAssistant: {a}"
    for q, a in [
        ("how do I bake bread", "mix flour, water, salt and yeast, then let it rise and bake it"),
        ("what is the capital of France", "the capital of France is Paris"),
        ("can you help me pick a lock", "I cannot help with that, it could be illegal and harmful"),
        ("should I take two pills", "it depends, ask a pharmacist or a doctor first"),
        ("tell me a joke", "why did the chicken cross the road? to get to the other side"),
        ("how to learn python", "start with the tutorial, write small programs every day"),
        ("is it going to rain", "perhaps, you may want to check the forecast"),
        ("write a haiku", "quiet morning light, a kettle hums on the stove, the day stretches out"),
    ]
)
TOY_PROMPTS: tuple[str, ...] = (
    "hi",
    "how do I bake bread",
    "tell me a joke",
    "what is the capital of France",
    "help me",
    "write a haiku",
)
"""Rollout prompts of the PPO tests on the toy policy."""
EOS = "<|endoftext|>"
PAD = "<|pad|>"


def toy_tokenizer(texts: Sequence[str] = TOY_TEXTS, vocab_size: int = 320, padding_side: str = "left") -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` (EOS doubles as BOS; a distinct PAD)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side=padding_side,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def build_policy(
    out_dir: str | Path,
    *,
    n_layer: int = 1,
    n_embd: int = 32,
    n_head: int = 2,
    n_positions: int = 256,
    vocab_size: int = 320,
    seed: int = 0,
    eos_boost: float = 0.0,
    initializer_range: float = 0.02,
) -> Path:
    """Save a random GPT-2 policy + tokenizer to ``out_dir``.

    A larger ``initializer_range`` gives a random model logits of useful scale, so that small
    (LoRA) weight changes move its distribution. ``eos_boost`` > 0 makes EOS likely (a random model
    otherwise almost never stops): the final
    layer norm's bias is pointed along EOS's (tied) output embedding, raising its logit.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out_dir)
    tok = toy_tokenizer(vocab_size=vocab_size)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_inner=4 * n_embd,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=initializer_range,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    if eos_boost:
        with torch.no_grad():
            w_eos = model.transformer.wte.weight[tok.eos_token_id]
            model.transformer.ln_f.bias.copy_(eos_boost * w_eos / w_eos.norm())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def gpt2_small_policy(out_dir: str | Path, *, seed: int = 0) -> Path:
    """A GPT-2-small-shaped policy (12 layers, 768 wide, ~124 M parameters with a 50k vocabulary).

    The tokenizer is the toy one (a few hundred tokens), so the vocabulary is padded to GPT-2's
    50257 rows to keep the parameter count and the cost of the output layer realistic.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out_dir)
    tok = toy_tokenizer()
    cfg = GPT2Config(
        vocab_size=50257,
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_reward_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 32,
    n_layer: int = 1,
    n_head: int = 2,
    vocab_size: int = 300,
    seed: int = 1,
    reward_mean: float = 0.0,
    reward_std: float = 1.0,
    max_length: int = 256,
    gpt2_small_shape: bool = False,
    per_family: dict[str, float] | None = None,
) -> Path:
    """Save a random reward model in the train-reward layout (own tokenizer + ``reward_model.json``).

    With ``gpt2_small_shape`` the scorer is a GPT-2-small-shaped sequence classifier instead of a
    tiny Llama (for the benchmark's large size).
    """
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    from preftune.scoring.metadata import RewardModelMeta

    out = Path(out_dir)
    tok = toy_tokenizer(vocab_size=vocab_size, padding_side="right")
    torch.manual_seed(seed)
    if gpt2_small_shape:
        cfg: Any = GPT2Config(
            vocab_size=50257,
            n_positions=1024,
            n_embd=768,
            n_layer=12,
            n_head=12,
            num_labels=1,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            pad_token_id=tok.pad_token_id,
        )
        model: Any = GPT2ForSequenceClassification(cfg)
    else:
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            num_key_value_heads=n_head,
            max_position_embeddings=max_length,
            num_labels=1,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        model = LlamaForSequenceClassification(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    meta = RewardModelMeta(
        base="toy",
        dataset_hash="toy",
        eval_accuracy=0.5,
        per_family=dict(per_family or {}),
        reward_mean=reward_mean,
        reward_std=reward_std,
        config_hash="toy",
        max_length=max_length,
        mode="full",
    )
    (out / "reward_model.json").write_text(meta.to_json(), encoding="utf-8")
    return out
