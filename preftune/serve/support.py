"""What every part of the feedback service shares: its errors, time in UTC, tokens, the judgement rules.

Kept apart from :mod:`preftune.serve.service` so that the hot path (:mod:`preftune.serve.cycle`)
imports them without a cycle.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from preftune.errors import ExitCode, InputError, PreftuneError
from preftune.serve.schemas import JudgementIn

if TYPE_CHECKING:
    from preftune.serve.models import Judgement

TOKEN_PREFIX = "ptr_"


class ServiceError(PreftuneError):
    """A request the service refuses, with the HTTP status the API answers with."""

    status: int = 400
    exit_code = ExitCode.INPUT


class NotFoundError(ServiceError):
    status = 404


class ConflictError(ServiceError):
    status = 409


class InvalidError(ServiceError):
    status = 422


# ----------------------------------------------------------------------------- time and tokens


def utcnow() -> datetime:
    """Naive UTC: the database columns hold UTC without a zone (the same on SQLite and PostgreSQL)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def to_naive_utc(value: datetime) -> datetime:
    """A datetime in naive UTC; naive input is taken to be UTC already."""
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value


def iso_utc(value: datetime) -> str:
    return to_naive_utc(value).isoformat(timespec="microseconds") + "Z"


def parse_iso(value: str, what: str) -> datetime:
    """Parse an ISO 8601 time (``Z`` or an offset; no zone means UTC) for filters given on the CLI."""
    try:
        return to_naive_utc(datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00")))
    except ValueError:
        raise InputError(f"{what}: expected an ISO 8601 time such as 2025-01-31T12:00:00Z, got {value!r}") from None


def hash_token(token: str) -> str:
    """The sha256 hex digest of a token: what the database (and memory, for the admin token) keeps."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(token: str, expected_hash: str) -> bool:
    """Constant-time comparison of a presented token with a stored hash."""
    return hmac.compare_digest(hash_token(token), expected_hash)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


# ----------------------------------------------------------------------------- judgements


@dataclass
class CleanJudgement:
    best: int | None
    ranking: list[int] | None
    all_unacceptable: bool
    unsafe: list[int]
    written: str | None = None

    def same_as(self, j: Judgement) -> bool:
        return (
            self.best == j.best
            and (self.ranking or None) == (list(j.ranking) if j.ranking else None)
            and self.all_unacceptable == j.all_unacceptable
            and self.unsafe == sorted(j.unsafe or [])
            and self.written == j.written
        )


def pick_best(payload: JudgementIn) -> int | None:
    """The best candidate a judgement names (the ranking's first when only a ranking is given; None when all
    are unacceptable); the format's rules as 422, before the task is known."""
    best, ranking = payload.best, payload.ranking
    if payload.written is not None:
        if not payload.written.strip():
            raise InvalidError("written: an empty answer; leave it out, or write the answer you would want")
        if not payload.all_unacceptable:
            raise InvalidError("written: a written answer goes with all_unacceptable (no candidate is acceptable)")
    if payload.all_unacceptable:
        if best is not None:
            raise InvalidError("best must be null when all_unacceptable is true")
    elif best is None:
        if not ranking:
            raise InvalidError("pick the best candidate (best), rank them all (ranking) or set all_unacceptable")
        best = ranking[0]
    return best


def clean_judgement(payload: JudgementIn, n_candidates: int) -> CleanJudgement:
    """Check the indexes against the task and the rules of the judgement format (422 otherwise)."""
    n = n_candidates
    best, ranking = pick_best(payload), payload.ranking
    if best is not None and not 0 <= best < n:
        raise InvalidError(f"best: {best} is not a candidate index of this task (0..{n - 1})")
    if ranking is not None:
        if sorted(ranking) != list(range(n)):
            raise InvalidError(f"ranking: must list every candidate index 0..{n - 1} exactly once, best first")
        if best is not None and ranking[0] != best:
            raise InvalidError(f"ranking: starts with {ranking[0]} but best is {best}; the best must come first")
    unsafe = sorted(set(payload.unsafe))
    if len(unsafe) != len(payload.unsafe) or any(not 0 <= i < n for i in unsafe):
        raise InvalidError(f"unsafe: candidate indexes 0..{n - 1}, each at most once")
    return CleanJudgement(
        best=best,
        ranking=list(ranking) if ranking else None,
        all_unacceptable=payload.all_unacceptable,
        unsafe=unsafe,
        written=payload.written,
    )
