"""Loading, adapting, saving and scoring with a reward model.

A reward model here is any ``AutoModelForSequenceClassification`` with one output: it may
have another architecture and tokenizer than the policy, because it scores *text* (rendered
with :func:`preftune.text.render_pair` through its own tokenizer). Published reward models
hold merged weights (LoRA already folded in), so PPO and evaluate load them with a plain
``from_pretrained`` and need no peft.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preftune.common.device import select_device
from preftune.errors import InputError
from preftune.scoring.batching import encode_texts, length_bucketed_batches, pad_right
from preftune.scoring.metadata import RewardModelMeta, read_metadata
from preftune.scoring.text_view import view_prompt
from preftune.text import render_pair

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


def load_tokenizer(path: str | Path) -> Any:
    """The reward model's own tokenizer, with a pad token, right padding and left truncation.

    Right padding: the classification head reads the last non-pad token. Left truncation: an
    over-long prompt loses its beginning, never the response being judged.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot load a tokenizer ({err})") from None
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
    tok.padding_side = "right"
    tok.truncation_side = "left"
    return tok


def load_sequence_classifier(path: str | Path, tokenizer: Any, device: torch.device) -> Any:
    """``AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)`` in float32.

    A causal-LM checkpoint gets a freshly initialised one-output ``score`` head (seed first).
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised score head" notice is expected here
    try:
        model = _from_pretrained_sdpa(AutoModelForSequenceClassification, str(path), num_labels=1, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot load as a sequence-classification model ({err})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device)


def _from_pretrained_sdpa(cls: Any, path: str, **kwargs: Any) -> Any:
    """``from_pretrained`` with PyTorch's fused attention (SDPA) where the architecture has it, else its default.

    Why: the default ("eager") attention of several encoders (BERT, MiniLM) keeps every
    ``heads x length x length`` attention-probability tensor for the backward pass: ~100 MB per
    256-token row for MiniLM-L6, i.e. gigabytes per batch. SDPA without attention dropout does not.
    """
    try:
        return cls.from_pretrained(path, attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError) as err:
        if "sdpa" not in str(err).lower() and "attention" not in str(err).lower():
            raise
        return cls.from_pretrained(path, **kwargs)


def enable_gradient_checkpointing(model: Any) -> bool:
    """Recompute activations in the backward pass (non-reentrant); False when the architecture cannot."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        log.warning("%s does not support gradient checkpointing; training without it", type(model).__name__)
        return False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return True


def add_lora(model: Any, r: int, alpha: int, dropout: float) -> Any:
    """Wrap with LoRA on every linear layer; the score head is fully trained (modules_to_save)."""
    from peft import LoraConfig, TaskType, get_peft_model

    head = [name for name in ("score", "classifier") if getattr(model, name, None) is not None]
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules="all-linear",
        modules_to_save=head or None,
    )
    return get_peft_model(model, config)


def is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a runtime dependency
        return False
    return isinstance(model, PeftModel)


def save_reward_model(model: Any, tokenizer: Any, out_dir: Path) -> str | None:
    """Save merged weights + tokenizer into ``out_dir``; a LoRA model also keeps its adapter.

    Returns the adapter's sub-folder name (or None). Merging costs one copy of the weights but
    means every consumer loads the folder with plain ``from_pretrained``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter = None
    if is_peft(model):
        model.save_pretrained(str(out_dir / ADAPTER_DIR))
        adapter = ADAPTER_DIR
        model = model.merge_and_unload()
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return adapter


POOLINGS = ("auto", "last_token", "cls", "mean")


def rewards_of(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "auto"
) -> torch.Tensor:
    """One scalar reward per row.

    ``pooling`` (``reward.pooling``, saved in ``reward_model.json``): ``auto`` runs the
    architecture's own classification head (decoders: the last non-pad token; BERT-type
    encoders: the tanh pooler over [CLS]); ``last_token``, ``cls`` and ``mean`` read the
    backbone's last hidden states, pool them (last non-pad token, first token, or the
    mask-weighted mean) and apply the head's final linear layer to the pooled vector. The
    weights are the same ``from_pretrained`` folder either way; only the forward differs.
    """
    if pooling == "auto":
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits.squeeze(-1).float()
    hf = model.get_base_model() if is_peft(model) else model
    backbone_kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if getattr(hf.config, "is_decoder", False) or getattr(hf.config, "use_cache", None) is not None:
        backbone_kwargs["use_cache"] = False
    hidden = hf.base_model(**backbone_kwargs).last_hidden_state
    pooled = pool_hidden(hidden, attention_mask, pooling)
    return reward_head(hf)(pooled.to(hidden.dtype)).squeeze(-1).float()


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(rows, length, hidden) -> (rows, hidden): last non-pad token, first token, or masked mean (right padding)."""
    mask = attention_mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last_token":
        last = (attention_mask.long().sum(dim=1) - 1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {pooling!r}; one of {', '.join(POOLINGS)}")


def reward_head(model: Any) -> Any:
    """The one-output linear layer of a sequence classifier (``score`` or ``classifier``), for explicit pooling.

    Raises :class:`InputError` for heads that are not a single linear layer over the hidden
    state (RoBERTa's dense+tanh+out_proj head reads [CLS] itself): ``reward.pooling: auto`` then.
    """
    hidden_size = getattr(model.config, "hidden_size", None)
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if head is None:
            continue
        linear = getattr(head, "original_module", head)  # peft's modules_to_save wrapper forwards to a copy
        if isinstance(linear, torch.nn.Linear) and (hidden_size is None or linear.in_features == hidden_size):
            return head
        break
    raise InputError(
        f"{type(model).__name__}: its classification head is not one linear layer over the hidden state, so "
        "reward.pooling other than 'auto' cannot apply it to a pooled vector; set reward.pooling: auto"
    )


def check_pooling(model: Any, pooling: str) -> None:
    """Fail early (before training) when ``pooling`` cannot apply to this architecture."""
    if pooling not in POOLINGS:
        raise InputError(f"reward.pooling {pooling!r}: one of {', '.join(POOLINGS)}")
    if pooling != "auto":
        reward_head(model.get_base_model() if is_peft(model) else model)


class RewardScorer:
    """Scores (prompt, response) pairs with a published reward model; what PPO calls.

    Batched (length-sorted to avoid padding), no gradients, on GPU when present. With
    ``normalize=True`` rewards are standardised with the held-out mean and std saved in
    ``reward_model.json``, so PPO sees rewards of unit scale whatever the reward model.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_length: int,
        meta: RewardModelMeta | None = None,
        device: torch.device | None = None,
        batch_size: int = 32,
    ) -> None:
        self.device = device or next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.meta = meta
        self.batch_size = batch_size
        self.pooling = meta.pooling if meta is not None else "auto"
        self.text_view = meta.text_view if meta is not None else "full"  # reward.text_view at training time

    @classmethod
    def load(
        cls,
        folder: str | Path,
        *,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        storage: Any | None = None,
    ) -> RewardScorer:
        """Load a folder written by ``preftune train-reward`` (metadata required).

        ``folder`` may be an ``s3://`` URI: it is fetched (and cached) through ``storage``
        (a :class:`preftune.storage.Storage`; default: one with environment settings).
        """
        if "://" in str(folder):
            from preftune.storage import Storage

            folder = (storage or Storage()).local_path(str(folder))
        folder = Path(folder)
        meta = read_metadata(folder)
        dev = device if isinstance(device, torch.device) else select_device(device)
        tok = load_tokenizer(folder)
        model = load_sequence_classifier(folder, tok, dev)
        return cls(model, tok, max_length=meta.max_length, meta=meta, device=dev, batch_size=batch_size)

    def normalize(self, rewards: torch.Tensor) -> torch.Tensor:
        """(r - mean) / std with the held-out statistics saved at training time."""
        if self.meta is None:
            raise InputError("this reward model has no reward_model.json: no saved mean/std to normalise with")
        return (rewards - self.meta.reward_mean) / self.meta.reward_std

    @torch.inference_mode()
    def score_texts(self, texts: Sequence[str], *, batch_size: int | None = None) -> torch.Tensor:
        """Rewards for already rendered texts (float32, on CPU, in input order)."""
        ids, _ = encode_texts(list(texts), self.tokenizer, self.max_length)
        return self.score_ids(ids, batch_size=batch_size)

    @torch.inference_mode()
    def score_ids(self, ids: Sequence[Sequence[int]], *, batch_size: int | None = None) -> torch.Tensor:
        bs = batch_size or self.batch_size
        out = np.zeros(len(ids), dtype=np.float32)
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        pad_id = self.tokenizer.pad_token_id
        for idx in length_bucketed_batches(lengths, bs, rng=None):
            arr, mask = pad_right([ids[i] for i in idx], pad_id)
            r = rewards_of(
                self.model,
                torch.from_numpy(arr).to(self.device),
                torch.from_numpy(mask).to(self.device),
                self.pooling,
            )
            out[idx] = r.cpu().numpy()
        if not np.all(np.isfinite(out)):
            bad = int((~np.isfinite(out)).sum())
            raise InputError(f"reward model produced {bad} non-finite rewards; the model folder is corrupt or diverged")
        return torch.from_numpy(out)

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        *,
        normalize: bool = False,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """Reward of each response to its prompt (raw user text; viewed as at training time, then rendered here)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        texts = [
            render_pair(view_prompt(p, self.text_view), r, self.tokenizer)  # type: ignore[arg-type]
            for p, r in zip(prompts, responses, strict=True)
        ]
        rewards = self.score_texts(texts, batch_size=batch_size)
        return self.normalize(rewards) if normalize else rewards

    __call__ = score

    def __repr__(self) -> str:
        acc = f", eval_accuracy={self.meta.eval_accuracy:.3f}" if self.meta else ""
        return f"RewardScorer(device={self.device}, max_length={self.max_length}, text_view={self.text_view}{acc})"


def finite_std(values: np.ndarray) -> float:
    """Population std, never 0 (a constant reward would make normalisation divide by zero)."""
    s = float(np.std(values)) if values.size else 0.0
    return s if math.isfinite(s) and s > 1e-6 else 1.0
