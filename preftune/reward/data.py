"""Preference pairs for the reward model: read the dataset folder, tokenize, batch.

The dataset layout is the one collect publishes (``dataset.json``, ``train.jsonl``,
``eval.jsonl``). Records are checked here again, at the edge of this step, because a
dataset folder may also be written by hand or by another tool; a bad record fails with its
file and line. Text is rendered with :func:`preftune.text.render_pair` through the reward
model's own tokenizer, so the reward model scores exactly what the policy will write.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from preftune.common.metadata import read_dataset_json
from preftune.errors import InputError
from preftune.scoring.batching import encode_texts
from preftune.text import render_pair


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: ``chosen`` was preferred to ``rejected`` for ``prompt``."""

    pair_id: str
    prompt_id: str
    family: str
    prompt: str
    chosen: str
    rejected: str
    weight: float = 1.0
    where: str = ""  # file:line, for messages


@dataclass
class PreferenceDataset:
    """A dataset folder as read by train-reward."""

    root: Path
    meta: dict[str, Any]
    train: list[PreferencePair]
    eval: list[PreferencePair]

    @property
    def hash(self) -> str:
        return str(self.meta.get("hash") or "")


def _pair_from_record(rec: Any, where: str) -> PreferencePair:
    if not isinstance(rec, dict):
        raise InputError(f"{where}: expected a JSON object (a preference pair), got {type(rec).__name__}")
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(rec.get(key), str):
            raise InputError(f"{where}: field {key!r} must be a string (pair records need prompt, chosen, rejected)")
    if not rec["chosen"].strip() or not rec["rejected"].strip():
        raise InputError(f"{where}: empty 'chosen' or 'rejected' text")
    weight = rec.get("weight", 1.0)
    if weight is None:
        weight = 1.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise InputError(f"{where}: 'weight' must be a positive finite number, got {weight!r}")
    family = rec.get("family") or "unknown"
    if not isinstance(family, str):
        raise InputError(f"{where}: 'family' must be a string, got {family!r}")
    prompt_id = rec.get("prompt_id") or hashlib.sha256(rec["prompt"].encode()).hexdigest()[:16]
    pair_id = rec.get("pair_id") or where
    return PreferencePair(
        pair_id=str(pair_id),
        prompt_id=str(prompt_id),
        family=family,
        prompt=rec["prompt"],
        chosen=rec["chosen"],
        rejected=rec["rejected"],
        weight=float(weight),
        where=where,
    )


def read_pairs(path: Path) -> list[PreferencePair]:
    """Read a pairs JSONL file; blank lines are skipped, anything else malformed fails with file:line."""
    pairs: list[PreferencePair] = []
    try:
        with path.open("r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(f"{where}: not valid JSON: {err.msg}") from None
                pairs.append(_pair_from_record(rec, where))
    except FileNotFoundError:
        raise InputError(f"{path}: missing (a preference dataset has train.jsonl and eval.jsonl)") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    return pairs


def load_dataset(root: str | Path) -> PreferenceDataset:
    """Read a local dataset folder (``dataset.json``, ``train.jsonl``, ``eval.jsonl``)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: dataset folder not found (create one with `preftune collect`)")
    meta = read_dataset_json(root)
    train = read_pairs(root / "train.jsonl")
    eval_ = read_pairs(root / "eval.jsonl")
    if not train:
        raise InputError(f"{root / 'train.jsonl'}: no training pairs")
    if not eval_:
        raise InputError(
            f"{root / 'eval.jsonl'}: no held-out pairs; the reward gate needs some (raise data.eval_fraction)"
        )
    return PreferenceDataset(root=root, meta=meta, train=train, eval=eval_)


def split_by_prompt(
    pairs: Sequence[PreferencePair], fraction: float, seed: int, min_prompts: int = 10
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Hold out ``fraction`` of the prompts (never single pairs) for early stopping.

    Why a separate split: the held-out eval set decides the gate, so it must not also pick the
    stopping point (that would make the gate's figure optimistic). With fewer than
    ``min_prompts`` prompts there is nothing sensible to hold out and the split is empty.
    """
    prompt_ids = sorted({p.prompt_id for p in pairs})
    if len(prompt_ids) < min_prompts or fraction <= 0:
        return list(pairs), []
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(prompt_ids))
    n_val = max(1, int(round(fraction * len(prompt_ids))))
    val_ids = {prompt_ids[i] for i in order[:n_val]}
    return [p for p in pairs if p.prompt_id not in val_ids], [p for p in pairs if p.prompt_id in val_ids]


@dataclass
class TokenizedPairs:
    """Token ids of chosen and rejected texts (prompt included), ready to batch."""

    chosen: list[list[int]]
    rejected: list[list[int]]
    weights: np.ndarray
    families: list[str]
    truncated: int = 0
    response_chars: tuple[np.ndarray, np.ndarray] = field(default_factory=lambda: (np.zeros(0), np.zeros(0)))

    def __len__(self) -> int:
        return len(self.chosen)

    def lengths(self) -> np.ndarray:
        return np.array([max(len(c), len(r)) for c, r in zip(self.chosen, self.rejected, strict=True)], dtype=np.int64)

    def swapped(self) -> TokenizedPairs:
        """The same pairs with chosen and rejected exchanged (the swap sanity check)."""
        return TokenizedPairs(
            chosen=self.rejected,
            rejected=self.chosen,
            weights=self.weights,
            families=self.families,
            truncated=self.truncated,
            response_chars=(self.response_chars[1], self.response_chars[0]),
        )




def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer: Any, max_length: int) -> TokenizedPairs:
    """Render each side with :func:`render_pair` and tokenize with the reward model's tokenizer."""
    chosen_texts = [render_pair(p.prompt, p.chosen, tokenizer) for p in pairs]
    rejected_texts = [render_pair(p.prompt, p.rejected, tokenizer) for p in pairs]
    chosen, cut_c = encode_texts(chosen_texts, tokenizer, max_length)
    rejected, cut_r = encode_texts(rejected_texts, tokenizer, max_length)
    return TokenizedPairs(
        chosen=chosen,
        rejected=rejected,
        weights=np.array([p.weight for p in pairs], dtype=np.float32),
        families=[p.family for p in pairs],
        truncated=int((cut_c | cut_r).sum()),
        response_chars=(
            np.array([len(p.chosen) for p in pairs], dtype=np.float64),
            np.array([len(p.rejected) for p in pairs], dtype=np.float64),
        ),
    )
