"""How like the suite a production prompt is: the family of its nearest suite prompt (used when the
record names none), and whether it is a *new prompt type* (no suite prompt is similar enough).

Similarity is the cosine between prompt vectors: sentence embeddings when ``observe.encoder``
names an encoder folder (the embedding judge's mean-pooled encoder), else hashed word and
character-trigram counts (no model; it finds reworded templates, not paraphrases). The same
similarities serve both purposes, so one pass over the prompts answers both questions.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

HASH_DIM = 2**18
_WORD = re.compile(r"\w+")


def hashed_vectors(texts: Sequence[str]):
    """L2-normalised sparse vectors of hashed words and character trigrams (crc32: stable across runs)."""
    from scipy.sparse import csr_matrix

    rows, cols, vals = [], [], []
    for i, text in enumerate(texts):
        low = " ".join(_WORD.findall(text.lower()))
        feats = low.split() + [low[j : j + 3] for j in range(max(len(low) - 2, 0))]
        counts: dict[int, float] = {}
        for f in feats:
            h = zlib.crc32(f.encode("utf-8")) % HASH_DIM
            counts[h] = counts.get(h, 0.0) + 1.0
        norm = float(np.sqrt(sum(v * v for v in counts.values()))) or 1.0
        for h, v in counts.items():
            rows.append(i)
            cols.append(h)
            vals.append(v / norm)
    return csr_matrix((vals, (rows, cols)), shape=(len(texts), HASH_DIM))


def similarity(prompts: Sequence[str], references: Sequence[str], encoder: str | None = None) -> np.ndarray:
    """``len(prompts) x len(references)`` cosine similarities."""
    if not prompts or not references:
        return np.zeros((len(prompts), len(references)))
    if encoder:
        from preftune.behaviour.judges.embedding import Encoder

        enc = Encoder(encoder, "cpu", max_length=128, batch_size=64)
        a, b = enc(list(prompts)).numpy(), enc(list(references)).numpy()
        return a @ b.T
    a, b = hashed_vectors(prompts), hashed_vectors(references)
    return np.asarray((a @ b.T).todense())


@dataclass(frozen=True)
class Nearest:
    family: str | None  # the nearest suite prompt's family (None only when the suite has no prompts)
    similarity: float
    new: bool  # no suite prompt reaches the threshold: a new prompt type


def nearest_families(
    prompts: Sequence[str],
    suite_prompts: Sequence[str],
    suite_families: Sequence[str],
    threshold: float,
    encoder: str | None = None,
) -> list[Nearest]:
    """For each prompt: its nearest suite prompt's family (the best guess, judged with that family's
    judge even for a new prompt type), and whether any suite prompt reaches ``threshold``."""
    sims = similarity(prompts, suite_prompts, encoder)
    out = []
    for row in sims:
        j = int(row.argmax()) if row.size else -1
        best = float(row[j]) if j >= 0 else 0.0
        new = best < threshold
        out.append(Nearest(suite_families[j] if j >= 0 else None, best, new))
    return out
