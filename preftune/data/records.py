"""The normalised records every source is turned into: judgements and pairs, with provenance.

Two shapes, because the public formats carry two kinds of information:

- a :class:`Judgement` is one rater's view of a set of N candidates (best pick, optional full
  ranking, "all unacceptable", unsafe flags). The simulated panel, the feedback service's
  export and best-of-N files give judgements; check-fit measures agreement and coverage on them,
  and :mod:`preftune.collect.pairs` expands them into pairs.
- a :class:`Pair` is one comparison, ``chosen`` preferred to ``rejected``. TRL and HH-RLHF files
  give pairs directly (there is nothing to measure coverage on).

Provenance on both: ``source`` (``simulated``, ``service``, ``judge``, or the import format
``trl``, ``hh``, ``best-of-n``), ``rater_id`` and ``created_at`` (ISO 8601 UTC, or ``None`` when
the input had no timestamp).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from preftune.common.timestamps import utc_now  # noqa: F401 (collect's records and fit stamp with it)

JUDGEMENT_FORMAT = "preftune.judgement"
CANDIDATES_FORMAT = "preftune.candidates"
FORMAT_VERSION = 1
DEFAULT_FAMILY = "default"


def short_hash(*parts: Any, n: int = 16) -> str:
    """A stable id from text parts (sha256, hex, ``n`` characters)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        digest.update(b"\x1f")
    return digest.hexdigest()[:n]


def prompt_key(prompt: str) -> str:
    """The identity of a prompt for splitting: its text, whitespace-normalised."""
    return short_hash(" ".join(prompt.split()))


@dataclass
class Judgement:
    """One rater's judgement of one item (a prompt with N candidates)."""

    item_id: str
    prompt_id: str
    family: str
    tags: list[str]
    prompt: str
    candidates: list[dict[str, str]]  # [{"id": "c0", "text": "..."}]
    rater_id: str
    best: int | None
    ranking: list[int] | None
    all_unacceptable: bool
    unsafe: list[int]
    source: str
    created_at: str | None
    where: str = field(default="", compare=False)  # file:line, for messages only (not stored)
    # A rater-written acceptable answer, given when every candidate is unacceptable (annotation tools'
    # "rewrite"): it becomes the chosen side against every candidate (collect/pairs.py). None: not written.
    written: str | None = None

    def to_record(self) -> dict[str, Any]:
        """The ``preftune.judgement`` v1 record (the exchange format of the brief)."""
        rec = {
            "format": JUDGEMENT_FORMAT,
            "version": FORMAT_VERSION,
            "item_id": self.item_id,
            "prompt_id": self.prompt_id,
            "family": self.family,
            "tags": list(self.tags),
            "prompt": self.prompt,
            "candidates": [dict(c) for c in self.candidates],
            "rater_id": self.rater_id,
            "best": self.best,
            "ranking": list(self.ranking) if self.ranking is not None else None,
            "all_unacceptable": self.all_unacceptable,
            "unsafe": list(self.unsafe),
            "source": self.source,
            "created_at": self.created_at,
        }
        if self.written is not None:  # only where a rater wrote one (older records and hashes unchanged)
            rec["written"] = self.written
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Judgement:
        """From a record of a published dataset (already validated when it was collected)."""
        return cls(
            item_id=str(rec["item_id"]),
            prompt_id=str(rec.get("prompt_id") or prompt_key(rec["prompt"])),
            family=str(rec.get("family") or DEFAULT_FAMILY),
            tags=list(rec.get("tags") or []),
            prompt=rec["prompt"],
            candidates=[dict(c) for c in rec["candidates"]],
            rater_id=str(rec["rater_id"]),
            best=rec.get("best"),
            ranking=list(rec["ranking"]) if rec.get("ranking") is not None else None,
            all_unacceptable=bool(rec.get("all_unacceptable", False)),
            unsafe=list(rec.get("unsafe") or []),
            source=str(rec.get("source") or "unknown"),
            created_at=rec.get("created_at"),
            written=rec.get("written"),
        )


@dataclass
class Pair:
    """One comparison: ``chosen`` was preferred to ``rejected`` for ``prompt``."""

    pair_id: str
    item_id: str
    prompt_id: str
    family: str
    tags: list[str]
    prompt: str
    chosen: str
    rejected: str
    weight: float
    source: str
    rater_id: str | None
    created_at: str | None
    where: str = field(default="", compare=False)
    # How much better ``chosen`` is, in the source's own score units (UltraFeedback and HelpSteer
    # score differences, SHP's log score ratio); ``None`` when the source gives only a choice.
    margin: float | None = None

    def to_record(self) -> dict[str, Any]:
        rec = {
            "pair_id": self.pair_id,
            "item_id": self.item_id,
            "prompt_id": self.prompt_id,
            "family": self.family,
            "tags": list(self.tags),
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "weight": self.weight,
            "source": self.source,
            "rater_id": self.rater_id,
            "created_at": self.created_at,
        }
        if self.margin is not None:  # only where the source scored its answers (older hashes unchanged)
            rec["margin"] = self.margin
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Pair:
        return cls(
            pair_id=str(rec["pair_id"]),
            item_id=str(rec.get("item_id") or rec["pair_id"]),
            prompt_id=str(rec.get("prompt_id") or prompt_key(rec["prompt"])),
            family=str(rec.get("family") or DEFAULT_FAMILY),
            tags=list(rec.get("tags") or []),
            prompt=rec["prompt"],
            chosen=rec["chosen"],
            rejected=rec["rejected"],
            weight=float(rec.get("weight", 1.0)),
            source=str(rec.get("source") or "unknown"),
            rater_id=rec.get("rater_id"),
            created_at=rec.get("created_at"),
            margin=float(rec["margin"]) if rec.get("margin") is not None else None,
        )


_KEY_UNSAFE = re.compile(r"[^\w\- ]")


def metric_key(prefix: str, *parts: Any) -> str:
    """An MLflow metric/tag name: ``prefix`` then ``parts`` joined by ``.``; each part keeps only word
    characters, ``-`` and spaces (a family called ``tone/persona`` would otherwise be an invalid or
    path-like name)."""
    return ".".join([prefix, *(_KEY_UNSAFE.sub("_", str(p)) or "_" for p in parts)])
