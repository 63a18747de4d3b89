"""What the feedback service does, independent of HTTP: the API and the CLI both call these.

Transactions are explicit: every function that writes commits before it returns, so a
caller that got a result back knows the data is durable (the API answers only after that).

Handing out tasks is the one place where concurrent raters compete; the statements live in
:mod:`preftune.serve.cycle` (the hot path: a task row keeps its counters, PostgreSQL takes
the candidate row with ``FOR NO KEY UPDATE SKIP LOCKED``, SQLite serialises writers with
``BEGIN IMMEDIATE``). The rules: a task wants ``ratings_per_task`` judgements; a slot is
taken by a judgement or by an open assignment; a rater never gets a task they were ever
assigned and holds at most one open task. Unique constraints back every rule up.

This module keeps raters, the hand-out and the judgements; it re-exports the rest so callers
use one name: :mod:`preftune.serve.support` (errors, UTC time, tokens, the judgement rules),
:mod:`preftune.serve.imports` (tasks in) and :mod:`preftune.serve.exports` (judgements out).
"""

from __future__ import annotations

import hmac
import random
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from preftune.serve import cycle
from preftune.serve.cycle import RaterRef
from preftune.serve.exports import (  # noqa: F401 - re-exported: the API, CLI and tests call service.*
    EXPORT_BATCH,
    agreement,
    iter_export,
    judgement_record,
    pending_tasks,
    stats,
)
from preftune.serve.imports import ImportResult, import_tasks, parse_candidates_jsonl  # noqa: F401
from preftune.serve.models import Assignment, Judgement, Rater
from preftune.serve.schemas import JudgementIn
from preftune.serve.support import (  # noqa: F401
    TOKEN_PREFIX,
    CleanJudgement,
    ConflictError,
    InvalidError,
    NotFoundError,
    ServiceError,
    clean_judgement,
    hash_token,
    iso_utc,
    new_token,
    parse_iso,
    to_naive_utc,
    token_matches,
    utcnow,
)

# ----------------------------------------------------------------------------- raters


def create_rater(session: Session, name: str) -> tuple[Rater, str]:
    """Add a rater; returns the row and the token, which is shown once and never stored in clear."""
    if session.scalar(select(Rater.id).where(Rater.name == name)) is not None:
        raise ConflictError(f"rater {name!r} already exists; pick another name")
    token = new_token()
    rater = Rater(name=name, token_hash=hash_token(token), created_at=utcnow(), disabled=False)
    session.add(rater)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise ConflictError(f"rater {name!r} already exists; pick another name") from None
    return rater, token


def authenticate_rater(session: Session, token: str) -> Rater | None:
    """The active rater holding ``token``, or None."""
    digest = hash_token(token)
    rater = session.scalar(select(Rater).where(Rater.token_hash == digest))
    if rater is None or rater.disabled or not hmac.compare_digest(rater.token_hash, digest):
        return None
    return rater


def authenticate(session: Session, token: str) -> RaterRef | None:
    """The active rater holding ``token`` as a light reference (one indexed query), or None."""
    return cycle.authenticate(session, hash_token(token))


def disable_rater(session: Session, name: str) -> Rater:
    """Revoke a rater's token: their judgements stay, their open tasks go back to the pool."""
    rater = session.scalar(select(Rater).where(Rater.name == name).with_for_update(key_share=True))
    if rater is None:
        raise NotFoundError(f"no rater named {name!r}")
    rater.disabled = True
    session.flush()
    cycle.expire_rater(session, rater.id)
    session.commit()
    return rater


def list_raters(session: Session) -> list[dict[str, Any]]:
    counts = dict(
        session.execute(select(Judgement.rater_id, func.count(Judgement.id)).group_by(Judgement.rater_id)).all()
    )
    return [
        {"name": r.name, "created_at": iso_utc(r.created_at), "disabled": r.disabled, "judgements": counts.get(r.id, 0)}
        for r in session.scalars(select(Rater).order_by(Rater.id))
    ]


# ----------------------------------------------------------------------------- handing out tasks


def _retry_on_race(session: Session, work):  # noqa: ANN001, ANN202
    """Run ``work()`` and commit; a lost race on a unique constraint is rolled back and run again."""
    for attempt in range(4):
        try:
            result = work()
            session.commit()
            return result
        except IntegrityError:
            session.rollback()
            if attempt == 3:
                raise
        except BaseException:
            session.rollback()
            raise
    raise AssertionError("unreachable")


def next_task_view(
    session: Session, rater: Rater | RaterRef, *, ratings_per_task: int, ttl_seconds: int
) -> dict[str, Any] | None:
    """What ``GET /api/tasks/next`` answers: the rater's task as the page shows it, or None (committed)."""

    def work() -> dict[str, Any] | None:
        got = cycle.reserve(session, rater.id, ratings_per_task=ratings_per_task, ttl_seconds=ttl_seconds, now=utcnow())
        return got.view() if got is not None else None

    return _retry_on_race(session, work)


def next_task(
    session: Session, rater: Rater | RaterRef, *, ratings_per_task: int, ttl_seconds: int
) -> Assignment | None:
    """The task this rater should judge now (their open one, else a newly reserved one), or None.

    Committed on return. The assignment comes back as an ORM object (one more query than
    :func:`next_task_view`, which the API uses).
    """

    def work() -> int | None:
        got = cycle.reserve(session, rater.id, ratings_per_task=ratings_per_task, ttl_seconds=ttl_seconds, now=utcnow())
        return got.assignment_id if got is not None else None

    assignment_id = _retry_on_race(session, work)
    if assignment_id is None:
        return None
    assignment = session.get(Assignment, assignment_id, populate_existing=True)
    session.commit()
    return assignment


def release_expired(session: Session) -> int:
    """Free the slots of every assignment whose lease ran out (committed); returns how many."""
    return _retry_on_race(session, lambda: cycle.release_expired(session, utcnow()))


def display_order(assignment: Assignment) -> list[int]:
    """The random order this rater sees the candidates in; the same on every reload of the task."""
    order = list(range(assignment.task.n_candidates))
    random.Random(f"{assignment.id}:{assignment.task_id}:{assignment.rater_id}").shuffle(order)
    return order


def task_view(assignment: Assignment) -> dict[str, Any]:
    """What the rater page shows: candidates in display order, each with its original index."""
    task = assignment.task
    return {
        "task_id": task.id,
        "item_id": task.item_id,
        "family": task.family,
        "tags": list(task.tags),
        "prompt": task.prompt,
        "candidates": [
            {"index": i, "id": task.candidates[i]["id"], "text": task.candidates[i]["text"]}
            for i in display_order(assignment)
        ],
        "status": assignment.status,
        "expires_at": iso_utc(assignment.expires_at),
    }


def get_own_task(session: Session, rater: Rater, task_id: int) -> Assignment:
    """A task this rater was assigned; anything else is "not found" (existence is not revealed)."""
    assignment = session.scalar(
        select(Assignment).where(Assignment.task_id == task_id, Assignment.rater_id == rater.id)
    )
    if assignment is None:
        raise NotFoundError(f"task {task_id} is not assigned to you")
    return assignment


def skip_task(session: Session, rater: Rater | RaterRef, task_id: int) -> Assignment:
    """Give a task back: it is never shown to this rater again, and its slot goes to someone else."""
    try:
        cycle.skip(session, rater.id, task_id)
    except cycle.CycleError as err:
        session.rollback()
        raise _service_error(err) from None
    session.commit()
    assignment = session.scalar(
        select(Assignment).where(Assignment.task_id == task_id, Assignment.rater_id == rater.id)
    )
    session.commit()
    assert assignment is not None
    return assignment


def _service_error(err: cycle.CycleError) -> ServiceError:
    if err.kind == "not_found":
        return NotFoundError(err.message)
    return ConflictError(err.message)


def submit_and_next(
    session: Session,
    rater: Rater | RaterRef,
    payload: JudgementIn,
    *,
    next_task: bool = False,
    ratings_per_task: int = 3,
    ttl_seconds: int = 900,
) -> tuple[dict[str, Any], bool, dict[str, Any] | None]:
    """Store a judgement and, with ``next_task``, reserve the rater's next task: one transaction.

    Returns the stored record (``preftune.judgement`` v1 plus ``judgement_id`` and
    ``task_id``), whether it is new, and the next task's view (None when there is none or
    it was not asked for). Committed on return. Idempotent as :func:`submit_judgement`.
    """
    ref = RaterRef(id=rater.id, name=rater.name)

    def work() -> tuple[dict[str, Any], bool, dict[str, Any] | None]:
        now = utcnow()
        try:
            stored = cycle.store(session, ref, payload, now=now)
        except cycle.CycleError as err:
            raise _service_error(err) from None
        if stored.record is None:
            existing = session.scalar(select(Judgement).where(Judgement.uid == stored.existing_uid))
            assert existing is not None
            _check_resubmission(existing, payload)
            record, created = judgement_record(existing, with_uid=True), False
        else:
            record, created = stored.record, True
        view = None
        if next_task:
            got = cycle.reserve(session, ref.id, ratings_per_task=ratings_per_task, ttl_seconds=ttl_seconds, now=now)
            view = got.view() if got is not None else None
        return record, created, view

    return _retry_on_race(session, work)


def submit_judgement(session: Session, rater: Rater | RaterRef, payload: JudgementIn) -> tuple[Judgement, bool]:
    """Store a judgement (committed on return); returns it and whether it is new.

    Idempotent: the same judgement posted again (same ``judgement_id``, or same content for
    the same task) returns the stored one with ``created=False``; a different judgement of
    a task this rater already judged is a conflict.
    """
    record, created, _ = submit_and_next(session, rater, payload)
    judgement = session.scalar(select(Judgement).where(Judgement.uid == record["judgement_id"]))
    session.commit()
    assert judgement is not None
    return judgement, created


def undo_judgement(
    session: Session, rater: Rater | RaterRef, judgement_id: str, *, window_seconds: int, ttl_seconds: int
) -> dict[str, Any]:
    """Take back the rater's last judgement within the undo window; returns its task, open again (committed)."""
    ref = RaterRef(id=rater.id, name=rater.name)

    def work() -> dict[str, Any]:
        try:
            got = cycle.undo(
                session, ref, judgement_id, window_seconds=window_seconds, ttl_seconds=ttl_seconds, now=utcnow()
            )
        except cycle.CycleError as err:
            raise _service_error(err) from None
        return got.view()

    return _retry_on_race(session, work)


def rater_progress(session: Session, rater: Rater | RaterRef, ratings_per_task: int) -> dict[str, int]:
    """Tasks this rater judged and tasks they may still be given."""
    done = count_own_judgements(session, rater)
    left = cycle.remaining(session, rater.id, ratings_per_task)
    session.commit()
    return {"judgements": done, "remaining": left}


def _check_resubmission(existing: Judgement, payload: JudgementIn) -> None:
    clean = clean_judgement(payload, existing.task.n_candidates)
    if payload.judgement_id is not None and payload.judgement_id != existing.uid:
        raise ConflictError(
            f"task {payload.task_id} is already judged by you (judgement {existing.uid}); a task is judged once"
        )
    if not clean.same_as(existing):
        raise ConflictError(
            f"task {payload.task_id} is already judged by you with a different answer (judgement {existing.uid})"
        )


def get_own_judgement(session: Session, rater: Rater, uid: str) -> Judgement:
    j = session.scalar(select(Judgement).where(Judgement.uid == uid, Judgement.rater_id == rater.id))
    if j is None:
        raise NotFoundError(f"judgement {uid!r} not found among your judgements")
    return j


def count_own_judgements(session: Session, rater: Rater) -> int:
    return int(session.scalar(select(func.count(Judgement.id)).where(Judgement.rater_id == rater.id)) or 0)


def list_own_judgements(session: Session, rater: Rater, *, limit: int, offset: int) -> list[Judgement]:
    return list(
        session.scalars(
            select(Judgement)
            .where(Judgement.rater_id == rater.id)
            .order_by(Judgement.id.desc())
            .limit(limit)
            .offset(offset)
        )
    )
