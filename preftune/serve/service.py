"""What the feedback service does, independent of HTTP: the API and the CLI both call these.

Transactions are explicit: every function that writes commits before it returns, so a
caller that got a result back knows the data is durable (the API answers only after that).

Handing out tasks is the one place where concurrent raters compete; the statements live in
:mod:`preftune.serve.cycle` (the hot path: a task row keeps its counters, PostgreSQL takes
the candidate row with ``FOR NO KEY UPDATE SKIP LOCKED``, SQLite serialises writers with
``BEGIN IMMEDIATE``). The rules: a task wants ``ratings_per_task`` judgements; a slot is
taken by a judgement or by an open assignment; a rater never gets a task they were ever
assigned and holds at most one open task. Unique constraints back every rule up.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from preftune.errors import ExitCode, InputError, PreftuneError
from preftune.serve import cycle
from preftune.serve.cycle import RaterRef
from preftune.serve.models import (
    ASSIGNMENT_OPEN,
    Assignment,
    Judgement,
    Rater,
    Task,
)
from preftune.serve.schemas import (
    FORMAT_VERSION,
    JUDGEMENT_FORMAT,
    CandidatesRecord,
    JudgementIn,
)

TOKEN_PREFIX = "ptr_"
EXPORT_BATCH = 1000


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


# ----------------------------------------------------------------------------- import


@dataclass
class ImportResult:
    received: int
    imported: int
    unchanged: int

    def to_dict(self) -> dict[str, int]:
        return {"received": self.received, "imported": self.imported, "unchanged": self.unchanged}


def parse_candidates_jsonl(lines: Iterable[str], *, source: str, max_text_chars: int) -> list[CandidatesRecord]:
    """Validate every line of a candidates JSONL; the first bad line fails the whole import.

    Errors name the source and line, e.g. ``tasks.jsonl:12: candidates.1.text: 9000 characters,
    the limit is 8000``.
    """
    records: list[CandidatesRecord] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(raw, dict):
            raise InputError(f"{where}: expected a JSON object (a preftune.candidates record)")
        if raw.get("format") != "preftune.candidates" or raw.get("version") != FORMAT_VERSION:
            raise InputError(
                f"{where}: expected format 'preftune.candidates' version 1, "
                f"got format {raw.get('format')!r} version {raw.get('version')!r}"
            )
        try:
            rec = CandidatesRecord.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise InputError(f"{where}: {field}: {first['msg']}") from None
        _check_lengths(rec, where, max_text_chars)
        records.append(rec)
    if not records:
        raise InputError(f"{source}: no candidates records (the file is empty)")
    return records


def _check_lengths(rec: CandidatesRecord, where: str, max_chars: int) -> None:
    if len(rec.prompt) > max_chars:
        raise InputError(
            f"{where}: prompt: {len(rec.prompt)} characters, the limit is {max_chars} (PREFTUNE_MAX_TEXT_CHARS)"
        )
    for i, cand in enumerate(rec.candidates):
        if len(cand.text) > max_chars:
            raise InputError(
                f"{where}: candidates.{i}.text: {len(cand.text)} characters, the limit is {max_chars} "
                "(PREFTUNE_MAX_TEXT_CHARS)"
            )
    ids = [c.id for c in rec.candidates]
    if len(set(ids)) != len(ids):
        raise InputError(f"{where}: candidates: ids must be unique within a record, got {ids}")
    for i, tag in enumerate(rec.tags):
        if len(tag) > 100:
            raise InputError(f"{where}: tags.{i}: longer than 100 characters")


def _task_content(rec: CandidatesRecord) -> dict[str, Any]:
    return {
        "prompt_id": rec.prompt_id,
        "family": rec.family,
        "tags": list(rec.tags),
        "prompt": rec.prompt,
        "candidates": [{"id": c.id, "text": c.text} for c in rec.candidates],
        "policy": rec.policy,
    }


def _same_content(task: Task, content: dict[str, Any]) -> bool:
    return (
        task.prompt_id == content["prompt_id"]
        and task.family == content["family"]
        and list(task.tags) == content["tags"]
        and task.prompt == content["prompt"]
        and list(task.candidates) == content["candidates"]
    )


def import_tasks(session: Session, records: list[CandidatesRecord], *, source: str = "import") -> ImportResult:
    """Add the records as tasks in one transaction; records already present unchanged are skipped.

    Re-importing a file is therefore harmless; an ``item_id`` that exists with different
    content is refused (ids are stable ids of a prompt and candidate set), and nothing is
    imported then.
    """
    now = utcnow()
    seen: dict[str, dict[str, Any]] = {}
    new: list[Task] = []
    unchanged = 0
    for start in range(0, len(records), 500):
        chunk = records[start : start + 500]
        existing = {
            t.item_id: t for t in session.scalars(select(Task).where(Task.item_id.in_([r.item_id for r in chunk])))
        }
        for offset, rec in enumerate(chunk):
            content = _task_content(rec)
            if rec.item_id in seen:
                if seen[rec.item_id] != content:
                    raise ConflictError(
                        f"{source}: record {start + offset + 1}: item_id {rec.item_id!r} appears twice "
                        "with different content"
                    )
                unchanged += 1
                continue
            seen[rec.item_id] = content
            old = existing.get(rec.item_id)
            if old is not None:
                if not _same_content(old, content):
                    raise ConflictError(
                        f"{source}: record {start + offset + 1}: item_id {rec.item_id!r} is already imported with "
                        "different content; item ids must identify one prompt and candidate set"
                    )
                unchanged += 1
                continue
            new.append(
                Task(
                    item_id=rec.item_id,
                    n_candidates=len(rec.candidates),
                    created_at=to_naive_utc(rec.created_at) if rec.created_at else None,
                    imported_at=now,
                    n_done=0,
                    **content,
                )
            )
    session.add_all(new)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise ConflictError(f"{source}: another import added some of these items at the same time; retry") from None
    return ImportResult(received=len(records), imported=len(new), unchanged=unchanged)


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


# ----------------------------------------------------------------------------- judgements


@dataclass
class CleanJudgement:
    best: int | None
    ranking: list[int] | None
    all_unacceptable: bool
    unsafe: list[int]

    def same_as(self, j: Judgement) -> bool:
        return (
            self.best == j.best
            and (self.ranking or None) == (list(j.ranking) if j.ranking else None)
            and self.all_unacceptable == j.all_unacceptable
            and self.unsafe == sorted(j.unsafe or [])
        )


def clean_judgement(payload: JudgementIn, n_candidates: int) -> CleanJudgement:
    """Check the indexes against the task and the rules of the judgement format (422 otherwise)."""
    n = n_candidates
    best, ranking = payload.best, payload.ranking
    if payload.all_unacceptable:
        if best is not None:
            raise InvalidError("best must be null when all_unacceptable is true")
    elif best is None:
        if not ranking:
            raise InvalidError("pick the best candidate (best), rank them all (ranking) or set all_unacceptable")
        best = ranking[0]
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
        best=best, ranking=list(ranking) if ranking else None, all_unacceptable=payload.all_unacceptable, unsafe=unsafe
    )


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


def judgement_record(j: Judgement, *, with_uid: bool = False) -> dict[str, Any]:
    """A judgement in the ``preftune.judgement`` v1 exchange format (what collect reads)."""
    task = j.task
    rec: dict[str, Any] = {
        "format": JUDGEMENT_FORMAT,
        "version": FORMAT_VERSION,
        "item_id": task.item_id,
        "prompt_id": task.prompt_id,
        "family": task.family,
        "tags": list(task.tags),
        "prompt": task.prompt,
        "candidates": [{"id": c["id"], "text": c["text"]} for c in task.candidates],
        "rater_id": j.rater.name,
        "best": j.best,
        "ranking": list(j.ranking) if j.ranking is not None else None,
        "all_unacceptable": bool(j.all_unacceptable),
        "unsafe": list(j.unsafe or []),
        "source": j.source,
        "created_at": iso_utc(j.created_at),
    }
    if with_uid:
        rec["judgement_id"] = j.uid
        rec["task_id"] = j.task_id
    return rec


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


# ----------------------------------------------------------------------------- export, agreement, stats


def iter_export(
    factory: sessionmaker[Session],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    family: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Judgement records, oldest first, read in short transactions of ``EXPORT_BATCH`` rows.

    ``since`` is inclusive, ``until`` exclusive (both on the time the service stored the
    judgement). Short batches keep a long export from holding SQLite's write lock.
    """
    last_id = 0
    while True:
        with factory() as session:
            query = select(Judgement).where(Judgement.id > last_id)
            if since is not None:
                query = query.where(Judgement.created_at >= to_naive_utc(since))
            if until is not None:
                query = query.where(Judgement.created_at < to_naive_utc(until))
            if family is not None:
                query = query.join(Task, Task.id == Judgement.task_id).where(Task.family == family)
            batch = list(session.scalars(query.order_by(Judgement.id).limit(EXPORT_BATCH)))
            records = [judgement_record(j) for j in batch]
            session.commit()
        yield from records
        if len(batch) < EXPORT_BATCH:
            return
        last_id = batch[-1].id


def agreement(
    factory: sessionmaker[Session],
    *,
    family: str | None = None,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Agreement per family over the stored judgements: the same function (and figures) as check-fit."""
    from preftune.agreement import agreement_by_family

    records = list(iter_export(factory, family=family))
    by_family = agreement_by_family(records, confidence=confidence, n_resamples=n_resamples, seed=seed)
    return {
        "n_judgements": len(records),
        "confidence": confidence,
        "n_resamples": n_resamples,
        "seed": seed,
        "families": {name: fa.to_dict() for name, fa in by_family.items()},
    }


def pending_tasks(session: Session, ratings_per_task: int) -> int:
    """Tasks that still want judgements."""
    return int(session.scalar(select(func.count(Task.id)).where(Task.n_done < ratings_per_task)) or 0)


def stats(session: Session, ratings_per_task: int) -> dict[str, Any]:
    now = utcnow()
    total = int(session.scalar(select(func.count(Task.id))) or 0)
    pending = pending_tasks(session, ratings_per_task)
    by_family = {
        fam: {"tasks": int(n_tasks), "judgements": int(n_j or 0)}
        for fam, n_tasks, n_j in session.execute(
            select(Task.family, func.count(Task.id), func.sum(Task.n_done)).group_by(Task.family).order_by(Task.family)
        )
    }
    return {
        "ratings_per_task": ratings_per_task,
        "tasks": total,
        "tasks_pending": pending,
        "tasks_complete": total - pending,
        "judgements": int(session.scalar(select(func.count(Judgement.id))) or 0),
        "raters": int(session.scalar(select(func.count(Rater.id))) or 0),
        "open_assignments": int(
            session.scalar(
                select(func.count(Assignment.id)).where(
                    Assignment.status == ASSIGNMENT_OPEN, Assignment.expires_at > now
                )
            )
            or 0
        ),
        "families": by_family,
    }
