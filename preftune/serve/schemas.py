"""Request and record shapes of the feedback service (pydantic, validated at the edge).

``CandidatesRecord`` is one line of collect's candidates JSONL (exchange format 1 of the
brief); ``JudgementIn`` is what the rater page posts. Limits that depend on settings
(text length) are checked in :mod:`preftune.serve.service`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

CANDIDATES_FORMAT = "preftune.candidates"
JUDGEMENT_FORMAT = "preftune.judgement"
FORMAT_VERSION = 1
MIN_CANDIDATES = 2
MAX_CANDIDATES = 16

# A judgement id chosen by the client (the rater page uses crypto.randomUUID()).
JUDGEMENT_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
# Rater names end up in exports and logs: printable, no spaces at the ends, no control characters.
RATER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,99}$"


class CandidateText(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=100)
    text: str


class CandidatesRecord(BaseModel):
    """One task: a prompt and its candidate answers, as written by collect."""

    model_config = ConfigDict(extra="ignore")

    format: Literal["preftune.candidates"]
    version: Literal[1]
    item_id: str = Field(min_length=1, max_length=200)
    prompt_id: str = Field(min_length=1, max_length=200)
    family: str = Field(min_length=1, max_length=100)
    tags: list[str] = Field(default_factory=list, max_length=50)
    prompt: str = Field(min_length=1)
    candidates: list[CandidateText] = Field(min_length=MIN_CANDIDATES, max_length=MAX_CANDIDATES)
    policy: str | None = Field(None, max_length=500)
    created_at: datetime | None = None


class JudgementIn(BaseModel):
    """A rater's judgement of one task, as posted by the rater page.

    Indexes refer to the task's candidates in their original (imported) order, whatever
    order the page showed them in.
    """

    model_config = ConfigDict(extra="forbid")

    task_id: int = Field(ge=1)
    judgement_id: str | None = Field(
        None,
        pattern=JUDGEMENT_ID_PATTERN,
        description="Client-chosen id; posting the same id again returns the stored judgement (idempotent).",
    )
    best: int | None = Field(None, ge=0, lt=MAX_CANDIDATES)
    ranking: list[int] | None = Field(None, max_length=MAX_CANDIDATES)
    all_unacceptable: bool = False
    unsafe: list[int] = Field(default_factory=list, max_length=MAX_CANDIDATES)
    written: str | None = Field(
        None,
        description="With all_unacceptable: the answer the rater would want, written by them (collect prefers it "
        "to every candidate). Up to PREFTUNE_MAX_TEXT_CHARS characters.",
    )


class RaterIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=RATER_NAME_PATTERN, description="Letters, digits and _.@+- ; up to 100 characters.")
