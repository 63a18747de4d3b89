"""The ``reward`` section of the run config: training knobs and the calibrated reward gate.

Imported by the run config, so it stays light (pydantic only).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from preftune.configbase import Section
from preftune.scoring.text_view import TextView


class RewardGateSection(Section):
    """The reward gate, calibrated to the data (see docs/architecture.md, train-reward).

    The reward model must beat the best trivial baseline (length rule, bag-of-words) on the
    held-out pairs, judged by the lower confidence bound of the accuracy difference (a paired
    bootstrap over held-out prompts); where check-fit measured agreement it must also reach a
    share of that agreement ceiling; ``reward.min_accuracy`` is an optional absolute floor.
    """

    enabled: bool = Field(
        True,
        description="Stop the run (exit 11, nothing published) when a gate check fails. False: the figures are "
        "still measured, logged and reported, but never stop the step (the pilot reports a weak reward model).",
    )
    baselines: list[Literal["length", "bag_of_words"]] = Field(
        default_factory=lambda: ["length", "bag_of_words"],
        description="Trivial baselines the reward model must beat on the held-out pairs: 'length' (the longer, or "
        "if the training pairs say so the shorter, answer wins) and 'bag_of_words' (a hashed word/bigram "
        "Bradley-Terry model fitted on the training pairs). Empty: no baseline check.",
    )
    min_lift: float = Field(
        0.0,
        ge=-1.0,
        le=1.0,
        description="The lower confidence bound of (reward accuracy - best baseline accuracy) must exceed this.",
    )
    confidence: float = Field(
        0.95, gt=0.5, lt=1.0, description="One-sided level of the lower confidence bound of the lift."
    )
    bootstrap_resamples: int = Field(
        2000, ge=100, le=100000, description="Paired bootstrap resamples (held-out prompts resampled with replacement)."
    )
    min_headroom: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="When the best baseline is within this of the ceiling (measured agreement, else 1.0) there is "
        "no room to beat it: the baseline check becomes 'accuracy reaches min_ceiling_share of that ceiling'.",
    )
    min_ceiling_share: float = Field(
        0.85,
        ge=0.0,
        le=2.0,
        description="Where check-fit measured agreement (repeated ratings or an audit): held-out accuracy on those "
        "families must reach this share of their agreement ceiling (pair-weighted); also the bar when the best "
        "baseline leaves no headroom. 0: no ceiling check.",
    )
    cross_fit_folds: int = Field(
        0,
        ge=0,
        le=20,
        description="0 (off): the gate judges the published model on the held-out pairs. k >= 2: cross-fitting "
        "for small datasets: all pairs (training and held-out) are split by prompt into k folds, k extra reward "
        "models (and the baselines) are each trained on k-1 folds and score the fold they did not see, and the "
        "paired bootstrap runs over ALL pairs (a bound about sqrt(all pairs / held-out pairs) narrower). The gate then "
        "judges the training procedure; the published model is still the one trained on the training split. "
        "Costs k extra trainings. 1 is not allowed (one fold has nothing to train on).",
    )

    @field_validator("cross_fit_folds")
    @classmethod
    def _folds(cls, v: int) -> int:
        if v == 1:
            raise ValueError("1 fold leaves nothing to train on: 0 (off) or at least 2")
        return v


class RewardSection(Section):
    """The pairwise (Bradley-Terry) reward model."""

    mode: Literal["lora", "full"] = Field("full", description="Train LoRA adapters (peft) or all weights.")
    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    epochs: int = Field(3, ge=1, description="Passes over the training pairs.")
    batch_size: int = Field(32, ge=1, description="Pairs per optimisation step (before accumulation).")
    grad_accum: int = Field(1, ge=1, description="Batches accumulated per optimiser step.")
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of steps with linear lr warm-up.")
    max_length: int = Field(160, ge=8, description="Longest prompt+response, in reward-model tokens.")
    margin: float = Field(0.0, ge=0.0, description="Bradley-Terry margin: chosen must beat rejected by this much.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="Chance the label is wrong (conservative BT).")
    early_stopping_patience: int = Field(
        2, ge=0, description="Evaluations without eval-loss improvement before stopping (0: never)."
    )
    eval_every: int = Field(50, ge=1, description="Optimiser steps between held-out evaluations.")
    max_tokens_per_forward: int = Field(
        2048,
        ge=64,
        description="Token budget (rows x padded length, chosen and rejected together) of one forward/backward: "
        "a batch of long pairs is split into micro-batches under it (same gradient), which bounds activation "
        "memory whatever reward.max_length is.",
    )
    disable_dropout: bool = Field(
        True,
        description="Train with every dropout off (as TRL's RewardTrainer does): the pairwise difference of two "
        "forwards is not blurred by dropout noise, and fused attention kernels (less memory) apply.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (less memory, ~30% more compute)."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Compute precision of forward/backward: 'auto' = bf16 autocast on a GPU that supports it, else "
        "float32; 'bf16' = bf16 autocast on any device (weights and optimiser stay float32); 'fp32' = float32.",
    )
    pooling: Literal["auto", "last_token", "cls", "mean"] = Field(
        "auto",
        description="How a text's hidden states become its reward, saved in reward_model.json so scoring pools "
        "the same way: 'auto' = the architecture's own classification head (decoders: the last non-pad token; "
        "BERT-type encoders: the tanh pooler over [CLS], which sentence-embedding encoders such as "
        "all-MiniLM-L6-v2 never trained); 'last_token', 'cls' (first token, no pooler) or 'mean' (mask-weighted "
        "mean, how sentence-transformers encoders were trained) of the last hidden states, then the head's "
        "linear layer. Needs a head that is one linear layer over the hidden state (BERT, Llama-type decoders, GPT-2).",
    )
    text_view: TextView = Field(
        "full",
        description="Which part of the prompt the reward model reads, saved in reward_model.json so RewardScorer "
        "(PPO, evaluate, the MLflow pyfunc) reads the same: 'full' = the whole prompt (a multi-turn prompt with all "
        "its turns) + the response; 'last_turn' = only the last user turn of a multi-turn prompt (earlier turns and "
        "a system message dropped) + the response; a single-turn prompt is the same in both. The gate's baselines "
        "get the pairs in the same view (a fair comparison); the length rule and bag-of-words read only the two "
        "responses, so their features do not change with the view.",
    )
    min_accuracy: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Optional absolute floor: held-out pairwise accuracy below this fails the gate (on top of the "
        "calibrated checks in reward.gate). 0: no floor.",
    )
    gate: RewardGateSection = Field(default_factory=lambda: RewardGateSection())
