"""Token ids and batches for a sequence-classification head: what scoring and reward training share.

Kept apart from the reward model's training data (``preftune.reward.data``) because scoring at
inference (:class:`~preftune.scoring.model.RewardScorer`, used by ppo and evaluate) needs the same
encoding and batching as training, and nothing else of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def encode_texts(texts: Sequence[str], tokenizer: Any, max_length: int) -> tuple[list[list[int]], np.ndarray]:
    """Token ids per text, at most ``max_length``; returns the ids and a was-truncated mask.

    Truncation keeps the END of the text (the tokenizer is set to truncate on the left): the
    response, and the last token a sequence-classification head reads, must survive.
    """
    if not texts:
        return [], np.zeros(0, dtype=bool)
    full = tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
    long_idx = [i for i, ids in enumerate(full) if len(ids) > max_length]
    if long_idx:
        cut = tokenizer([texts[i] for i in long_idx], add_special_tokens=True, truncation=True, max_length=max_length)[
            "input_ids"
        ]
        for i, ids in zip(long_idx, cut, strict=True):
            full[i] = ids
    mask = np.zeros(len(full), dtype=bool)
    mask[long_idx] = True
    return [list(ids) for ids in full], mask


def length_bucketed_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None, bucket_batches: int = 50
) -> list[np.ndarray]:
    """Index batches of similar length, in random order.

    Why: padding is wasted compute. Shuffling, then sorting by length inside windows of
    ``bucket_batches`` batches, keeps batches random across epochs while cutting most of the
    padding (the same idea as ``group_by_length`` in transformers). Without ``rng`` the order
    is deterministic (sorted), which is what scoring wants.
    """
    n = len(lengths)
    if n == 0:
        return []
    if rng is None:
        order = np.argsort(-lengths, kind="stable")
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    perm = rng.permutation(n)
    window = batch_size * bucket_batches
    batches: list[np.ndarray] = []
    for start in range(0, n, window):
        chunk = perm[start : start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids and attention mask (sequence-classification heads read the last real token)."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask
