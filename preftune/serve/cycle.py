"""The hot path of the feedback service: hand out a task, store a judgement, undo it.

A rater's cycle is "store my judgement, give me the next task". It runs in one transaction
and a handful of statements:

- the task row keeps its counters (``n_done``; ``n_taken`` = slots held by open or done
  assignments), so handing out a task needs no count over ``assignments``;
- on PostgreSQL each step is one statement (data-modifying CTEs): the candidate task row is
  taken with ``FOR NO KEY UPDATE SKIP LOCKED`` and its counter re-checked by the lock
  (READ COMMITTED re-evaluates ``n_taken < k`` on the newest row version), the assignment
  inserted and the counter bumped in the same statement;
- on SQLite (one writer at a time: every transaction is ``BEGIN IMMEDIATE``, see
  :mod:`preftune.serve.db`) the same steps are plain statements, safe because nothing
  interleaves with them;
- the constraints back every rule up: one assignment per (task, rater), one judgement per
  (task, rater) and per ``uid``, at most one open assignment per rater. A statement that
  loses a race on one of them fails, the transaction is rolled back and retried.

Functions here never commit: the caller (:mod:`preftune.serve.service`) owns the
transaction, which is what lets the API store a judgement and reserve the next task with
one commit.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, exists, func, insert, select, text, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from preftune.serve import pgsql
from preftune.serve.models import (
    ASSIGNMENT_DONE,
    ASSIGNMENT_EXPIRED,
    ASSIGNMENT_OPEN,
    ASSIGNMENT_SKIPPED,
    Assignment,
    Judgement,
    Rater,
    Task,
)
from preftune.serve.schemas import FORMAT_VERSION, JUDGEMENT_FORMAT, JudgementIn
from preftune.serve.support import clean_judgement, iso_utc, pick_best

A = Assignment.__table__
J = Judgement.__table__
T = Task.__table__
R = Rater.__table__


class CycleError(Exception):
    """Raised with a kind the service turns into its own error (404, 409, 422)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class RaterRef:
    """The authenticated rater: what the hot path needs, without an ORM object."""

    id: int
    name: str


@dataclass
class Reserved:
    """A task as handed to one rater (the assignment and the task's content)."""

    assignment_id: int
    task_id: int
    rater_id: int
    status: str
    expires_at: datetime
    item_id: str
    family: str
    tags: list[str]
    prompt: str
    candidates: list[dict[str, Any]]
    n_candidates: int

    def order(self) -> list[int]:
        """The random order this rater sees the candidates in; the same on every reload."""
        order = list(range(self.n_candidates))
        random.Random(f"{self.assignment_id}:{self.task_id}:{self.rater_id}").shuffle(order)
        return order

    def view(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "item_id": self.item_id,
            "family": self.family,
            "tags": list(self.tags),
            "prompt": self.prompt,
            "candidates": [
                {"index": i, "id": self.candidates[i]["id"], "text": self.candidates[i]["text"]} for i in self.order()
            ],
            "status": self.status,
            "expires_at": iso_utc(self.expires_at),
        }


def _is_pg(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _json(value: Any) -> Any:
    """JSON columns read through ``text()`` come back decoded on psycopg2, as strings elsewhere."""
    return json.loads(value) if isinstance(value, str) else value


# ----------------------------------------------------------------------------- auth


_AUTH_PG = pgsql.statement(
    "preftune_auth", "SELECT id, name, disabled FROM raters WHERE token_hash = :token_hash", {"token_hash": "text"}
)


def authenticate(session: Session, token_hash: str) -> RaterRef | None:
    """The active rater whose token has this sha256 (one indexed lookup), or None."""
    if _is_pg(session):
        row = pgsql.run(session, _AUTH_PG, {"token_hash": token_hash}).first()
    else:
        row = session.execute(select(R.c.id, R.c.name, R.c.disabled).where(R.c.token_hash == token_hash)).first()
    if row is None or row.disabled:
        return None
    return RaterRef(id=row.id, name=row.name)


# ----------------------------------------------------------------------------- hand out

_RESERVE_PG = """
WITH own AS (
    SELECT a.id, a.task_id, a.expires_at FROM assignments a
    WHERE a.rater_id = :rater AND a.status = 'open'
    ORDER BY a.id LIMIT 1
), pick AS (
    SELECT t.id FROM tasks t
    WHERE NOT EXISTS (SELECT 1 FROM own)
      AND t.n_taken < :k
      AND NOT EXISTS (SELECT 1 FROM assignments m WHERE m.task_id = t.id AND m.rater_id = :rater)
    ORDER BY t.n_taken DESC, t.id
    LIMIT 1
    FOR NO KEY UPDATE OF t {skip_locked}
), ins AS (
    INSERT INTO assignments (task_id, rater_id, status, assigned_at, expires_at)
    SELECT pick.id, :rater, 'open', :now, :expires FROM pick
    RETURNING id, task_id, expires_at
), bump AS (
    UPDATE tasks SET n_taken = tasks.n_taken + 1 FROM ins WHERE tasks.id = ins.task_id
    RETURNING tasks.id
)
SELECT x.kind, x.aid, x.expires_at, t.id AS task_id, t.item_id, t.family, t.tags, t.prompt,
       t.candidates, t.n_candidates
FROM (
    SELECT 'own' AS kind, own.id AS aid, own.task_id AS tid, own.expires_at FROM own
    UNION ALL
    SELECT 'new', ins.id, ins.task_id, ins.expires_at FROM ins JOIN bump ON bump.id = ins.task_id
) x JOIN tasks t ON t.id = x.tid
"""
_RESERVE_TYPES = {"rater": "integer", "k": "integer", "now": "timestamp", "expires": "timestamp"}
RESERVE_PG_SKIP = pgsql.statement("preftune_reserve", _RESERVE_PG.format(skip_locked="SKIP LOCKED"), _RESERVE_TYPES)
RESERVE_PG_WAIT = pgsql.statement("preftune_reserve_wait", _RESERVE_PG.format(skip_locked=""), _RESERVE_TYPES)

_CONTENT = (T.c.id.label("task_id"), T.c.item_id, T.c.family, T.c.tags, T.c.prompt, T.c.candidates, T.c.n_candidates)


def _reserved(row: Any, rater_id: int, assignment_id: int, expires_at: datetime) -> Reserved:
    return Reserved(
        assignment_id=assignment_id,
        task_id=row.task_id,
        rater_id=rater_id,
        status=ASSIGNMENT_OPEN,
        expires_at=expires_at,
        item_id=row.item_id,
        family=row.family,
        tags=_json(row.tags),
        prompt=row.prompt,
        candidates=_json(row.candidates),
        n_candidates=row.n_candidates,
    )


def _expire_one(session: Session, assignment_id: int, task_id: int) -> None:
    """An open assignment whose lease ran out: its slot is free again (the rater may still submit)."""
    done = session.execute(
        update(A).where(A.c.id == assignment_id, A.c.status == ASSIGNMENT_OPEN).values(status=ASSIGNMENT_EXPIRED)
    )
    if done.rowcount:
        session.execute(update(T).where(T.c.id == task_id).values(n_taken=T.c.n_taken - 1))


def _reserve_pg(session: Session, rater_id: int, k: int, now: datetime, expires: datetime, wait: bool):
    params = {"rater": rater_id, "k": k, "now": now, "expires": expires}
    return pgsql.run(session, RESERVE_PG_WAIT if wait else RESERVE_PG_SKIP, params).first()


def _reserve_generic(session: Session, rater_id: int, k: int, now: datetime, expires: datetime):
    own = session.execute(
        select(A.c.id, A.c.task_id, A.c.expires_at)
        .where(A.c.rater_id == rater_id, A.c.status == ASSIGNMENT_OPEN)
        .order_by(A.c.id)
        .limit(1)
    ).first()
    if own is not None:
        content = session.execute(select(*_CONTENT).where(T.c.id == own.task_id)).first()
        return _Row("own", own.id, own.expires_at, content)
    mine = exists().where(A.c.task_id == T.c.id, A.c.rater_id == rater_id)
    picked = session.execute(
        select(*_CONTENT)
        .where(T.c.n_taken < k, ~mine)
        .order_by(T.c.n_taken.desc(), T.c.id)
        .limit(1)
        .with_for_update(of=T, skip_locked=True, key_share=True)
    ).first()
    if picked is None:
        return None
    aid = session.execute(
        insert(A)
        .values(task_id=picked.task_id, rater_id=rater_id, status=ASSIGNMENT_OPEN, assigned_at=now, expires_at=expires)
        .returning(A.c.id)
    ).scalar_one()
    session.execute(update(T).where(T.c.id == picked.task_id).values(n_taken=T.c.n_taken + 1))
    return _Row("new", aid, expires, picked)


class _Row:
    """The generic path's answer in the shape of the PostgreSQL statement's row."""

    def __init__(self, kind: str, aid: int, expires_at: datetime, content: Any):
        self.kind, self.aid, self.expires_at = kind, aid, expires_at
        for key in ("task_id", "item_id", "family", "tags", "prompt", "candidates", "n_candidates"):
            setattr(self, key, getattr(content, key))


def reserve(
    session: Session, rater_id: int, *, ratings_per_task: int, ttl_seconds: int, now: datetime
) -> Reserved | None:
    """The rater's open task, else a newly reserved one, else None (not committed here).

    One statement on PostgreSQL in the common case. Rare paths: the rater's own lease ran
    out (expire it, try again); nothing free and unlocked (release every expired lease, then
    wait for rows other raters hold locked instead of answering "no task" wrongly).
    """
    expires = now + timedelta(seconds=ttl_seconds)
    pg = _is_pg(session)
    wait = False
    for _attempt in range(4):
        if pg:
            row = _reserve_pg(session, rater_id, ratings_per_task, now, expires, wait)
        else:
            row = _reserve_generic(session, rater_id, ratings_per_task, now, expires)
        if row is not None and row.kind == "own" and row.expires_at <= now:
            _expire_one(session, row.aid, row.task_id)
            continue
        if row is not None:
            return _reserved(row, rater_id, row.aid, row.expires_at)
        if wait:
            return None
        release_expired(session, now)
        wait = True
    return None


def release_expired(session: Session, now: datetime) -> int:
    """Mark every open assignment whose lease ran out as expired and free its slot; returns how many."""
    if _is_pg(session):
        return int(
            session.execute(
                text(
                    "WITH e AS (UPDATE assignments SET status = 'expired' "
                    "WHERE status = 'open' AND expires_at <= :now RETURNING task_id), "
                    "c AS (SELECT task_id, count(*) AS n FROM e GROUP BY task_id), "
                    "u AS (UPDATE tasks SET n_taken = tasks.n_taken - c.n FROM c WHERE tasks.id = c.task_id "
                    "RETURNING tasks.id) "
                    "SELECT coalesce(sum(n), 0) FROM c"
                ),
                {"now": now},
            ).scalar_one()
        )
    task_ids = (
        session.execute(
            update(A)
            .where(A.c.status == ASSIGNMENT_OPEN, A.c.expires_at <= now)
            .values(status=ASSIGNMENT_EXPIRED)
            .returning(A.c.task_id)
        )
        .scalars()
        .all()
    )
    _release_slots(session, task_ids)
    return len(task_ids)


def _release_slots(session: Session, task_ids: list[int]) -> None:
    counts: dict[int, int] = {}
    for tid in task_ids:
        counts[tid] = counts.get(tid, 0) + 1
    for tid, n in sorted(counts.items()):
        session.execute(update(T).where(T.c.id == tid).values(n_taken=T.c.n_taken - n))


# ----------------------------------------------------------------------------- judgements

_STORE_PG = pgsql.statement(
    "preftune_store",
    """
WITH old AS (
    SELECT a.id, a.status FROM assignments a
    WHERE a.task_id = :task AND a.rater_id = :rater
    FOR NO KEY UPDATE
), ins AS (
    INSERT INTO judgements (uid, task_id, rater_id, best, ranking, all_unacceptable, unsafe, source, created_at,
                            written)
    SELECT :uid, :task, :rater, :best, CAST(:ranking AS json), :all_unacceptable, CAST(:unsafe AS json),
           'service', :now, :written
    FROM old WHERE old.status IN ('open', 'expired')
    ON CONFLICT DO NOTHING
    RETURNING id
), fin AS (
    UPDATE assignments SET status = 'done' FROM old, ins WHERE assignments.id = old.id
    RETURNING assignments.id
), cnt AS (
    UPDATE tasks SET n_done = tasks.n_done + 1,
                     n_taken = tasks.n_taken + CASE WHEN old.status = 'open' THEN 0 ELSE 1 END
    FROM old, ins WHERE tasks.id = :task
    RETURNING tasks.id
)
SELECT t.item_id, t.prompt_id, t.family, t.tags, t.prompt, t.candidates, t.n_candidates,
       (SELECT status FROM old) AS old_status, (SELECT id FROM ins) AS judgement_pk
FROM tasks t WHERE t.id = :task
""",
    {
        "uid": "text",
        "task": "integer",
        "rater": "integer",
        "best": "integer",
        "ranking": "text",
        "all_unacceptable": "boolean",
        "unsafe": "text",
        "now": "timestamp",
        "written": "text",
    },
)


@dataclass
class Normalised:
    best: int | None
    ranking: list[int] | None
    all_unacceptable: bool
    unsafe: list[int]
    written: str | None = None


def normalise(payload: JudgementIn) -> Normalised:
    """The stored form of a judgement, before the task is known (the index checks come after)."""
    best, ranking = pick_best(payload), payload.ranking
    return Normalised(
        best=best,
        ranking=list(ranking) if ranking else None,
        all_unacceptable=payload.all_unacceptable,
        unsafe=sorted(set(payload.unsafe)),
        written=payload.written,
    )


@dataclass
class Stored:
    """What a submission did: the stored record, or the existing judgement's id when it was a resubmission."""

    record: dict[str, Any] | None
    created: bool
    existing_uid: str | None = None


def store(session: Session, rater: RaterRef, payload: JudgementIn, *, now: datetime) -> Stored:
    """Insert the judgement, close the assignment and bump the task's counters (not committed here).

    Raises :class:`CycleError` ("not_found", "skipped", "uid_taken") and the service's
    ``InvalidError`` (the transaction must then be rolled back: the indexes are checked
    against the task after the insert, which saves a round trip in the common case). When
    the rater already judged the task, nothing is written and ``existing_uid`` is set.
    """
    norm = normalise(payload)
    uid = payload.judgement_id or str(uuid.uuid4())
    values = {
        "uid": uid,
        "task": payload.task_id,
        "rater": rater.id,
        "best": norm.best,
        "all_unacceptable": norm.all_unacceptable,
        "now": now,
        "written": norm.written,
    }
    if _is_pg(session):
        row = pgsql.run(
            session,
            _STORE_PG,
            {
                **values,
                "ranking": json.dumps(norm.ranking) if norm.ranking is not None else None,
                "unsafe": json.dumps(norm.unsafe),
            },
        ).first()
        old_status = row.old_status if row is not None else None
        judgement_pk = row.judgement_pk if row is not None else None
    else:
        row, old_status, judgement_pk = _store_generic(session, rater.id, payload.task_id, uid, norm, now)
    if row is None or old_status is None:
        raise CycleError("not_found", f"task {payload.task_id} is not assigned to you")
    if old_status == ASSIGNMENT_DONE:
        existing = session.execute(
            select(J.c.uid).where(J.c.task_id == payload.task_id, J.c.rater_id == rater.id)
        ).scalar()
        return Stored(record=None, created=False, existing_uid=existing)
    if old_status == ASSIGNMENT_SKIPPED:
        raise CycleError("skipped", f"task {payload.task_id} was skipped; ask for the next task")
    if judgement_pk is None:
        raise CycleError("uid_taken", f"judgement_id {payload.judgement_id!r} is already used by another judgement")
    clean_judgement(payload, row.n_candidates)  # raises InvalidError: the caller rolls back
    return Stored(
        record={
            "format": JUDGEMENT_FORMAT,
            "version": FORMAT_VERSION,
            "item_id": row.item_id,
            "prompt_id": row.prompt_id,
            "family": row.family,
            "tags": list(_json(row.tags)),
            "prompt": row.prompt,
            "candidates": [{"id": c["id"], "text": c["text"]} for c in _json(row.candidates)],
            "rater_id": rater.name,
            "best": norm.best,
            "ranking": norm.ranking,
            "all_unacceptable": norm.all_unacceptable,
            "unsafe": norm.unsafe,
            "source": "service",
            "created_at": iso_utc(now),
            "judgement_id": uid,
            "task_id": payload.task_id,
            **({"written": norm.written} if norm.written is not None else {}),
        },
        created=True,
    )


def _store_generic(session: Session, rater_id: int, task_id: int, uid: str, norm: Normalised, now: datetime):
    row = session.execute(
        select(
            A.c.id.label("aid"),
            A.c.status.label("old_status"),
            T.c.item_id,
            T.c.prompt_id,
            T.c.family,
            T.c.tags,
            T.c.prompt,
            T.c.candidates,
            T.c.n_candidates,
        )
        .join(T, T.c.id == A.c.task_id)
        .where(A.c.task_id == task_id, A.c.rater_id == rater_id)
        .with_for_update(of=A, key_share=True)
    ).first()
    if row is None or row.old_status not in (ASSIGNMENT_OPEN, ASSIGNMENT_EXPIRED):
        return row, (row.old_status if row is not None else None), None
    pk = session.execute(
        sqlite_insert(J)
        .values(
            uid=uid,
            task_id=task_id,
            rater_id=rater_id,
            best=norm.best,
            ranking=norm.ranking,
            all_unacceptable=norm.all_unacceptable,
            unsafe=norm.unsafe,
            source="service",
            created_at=now,
            written=norm.written,
        )
        .on_conflict_do_nothing()
        .returning(J.c.id)
    ).scalar()
    if pk is None:  # the uid belongs to another judgement
        return row, row.old_status, None
    session.execute(update(A).where(A.c.id == row.aid).values(status=ASSIGNMENT_DONE))
    taken = 0 if row.old_status == ASSIGNMENT_OPEN else 1
    session.execute(update(T).where(T.c.id == task_id).values(n_done=T.c.n_done + 1, n_taken=T.c.n_taken + taken))
    return row, row.old_status, pk


# ----------------------------------------------------------------------------- skip, undo, disable


def skip(session: Session, rater_id: int, task_id: int) -> str:
    """Give a task back (status ``skipped``; its slot is freed). Returns the new status."""
    old = session.execute(
        select(A.c.id, A.c.status)
        .where(A.c.task_id == task_id, A.c.rater_id == rater_id)
        .with_for_update(of=A, key_share=True)
    ).first()
    if old is None:
        raise CycleError("not_found", f"task {task_id} is not assigned to you")
    if old.status == ASSIGNMENT_DONE:
        raise CycleError("conflict", f"task {task_id} is already judged; a judgement cannot be skipped")
    if old.status != ASSIGNMENT_SKIPPED:
        session.execute(update(A).where(A.c.id == old.id).values(status=ASSIGNMENT_SKIPPED))
        if old.status == ASSIGNMENT_OPEN:
            session.execute(update(T).where(T.c.id == task_id).values(n_taken=T.c.n_taken - 1))
    return ASSIGNMENT_SKIPPED


def expire_rater(session: Session, rater_id: int) -> None:
    """A disabled rater's open tasks go back to the pool."""
    task_ids = (
        session.execute(
            update(A)
            .where(A.c.rater_id == rater_id, A.c.status == ASSIGNMENT_OPEN)
            .values(status=ASSIGNMENT_EXPIRED)
            .returning(A.c.task_id)
        )
        .scalars()
        .all()
    )
    _release_slots(session, list(task_ids))


def undo(
    session: Session, rater: RaterRef, uid: str, *, window_seconds: int, ttl_seconds: int, now: datetime
) -> Reserved:
    """Take back the rater's last judgement within ``window_seconds`` of storing it (not committed here).

    The judgement is deleted, its task is open for this rater again (a fresh lease) and
    comes back as their next task; the task they were handed after it, if any, is given
    back unseen (its assignment removed, so it may come to them again later).
    """
    if window_seconds <= 0:
        raise CycleError("conflict", "undo is turned off on this service (PREFTUNE_UNDO_SECONDS=0)")
    j = session.execute(
        select(J.c.id, J.c.task_id, J.c.created_at)
        .where(J.c.uid == uid, J.c.rater_id == rater.id)
        .with_for_update(of=J)
    ).first()
    if j is None:
        raise CycleError("not_found", f"judgement {uid!r} not found among your judgements")
    last = session.execute(select(func.max(J.c.id)).where(J.c.rater_id == rater.id)).scalar()
    if last != j.id:
        raise CycleError("conflict", "only your last judgement can be undone")
    if (now - j.created_at).total_seconds() > window_seconds:
        raise CycleError(
            "conflict", f"judgement {uid!r} is older than the undo window of {window_seconds} s; it is kept"
        )
    later = (
        session.execute(
            delete(A)
            .where(A.c.rater_id == rater.id, A.c.status == ASSIGNMENT_OPEN, A.c.task_id != j.task_id)
            .returning(A.c.task_id)
        )
        .scalars()
        .all()
    )
    _release_slots(session, list(later))
    session.execute(delete(J).where(J.c.id == j.id))
    expires = now + timedelta(seconds=ttl_seconds)
    aid = session.execute(
        update(A)
        .where(A.c.task_id == j.task_id, A.c.rater_id == rater.id)
        .values(status=ASSIGNMENT_OPEN, assigned_at=now, expires_at=expires)
        .returning(A.c.id)
    ).scalar_one()
    session.execute(update(T).where(T.c.id == j.task_id).values(n_done=T.c.n_done - 1))
    content = session.execute(select(*_CONTENT).where(T.c.id == j.task_id)).first()
    return _reserved(content, rater.id, aid, expires)


def remaining(session: Session, rater_id: int, ratings_per_task: int) -> int:
    """Tasks this rater may still be given (their open one included)."""
    mine = exists().where(A.c.task_id == T.c.id, A.c.rater_id == rater_id)
    fresh = session.execute(select(func.count(T.c.id)).where(T.c.n_done < ratings_per_task, ~mine)).scalar()
    own = session.execute(
        select(func.count(A.c.id)).where(A.c.rater_id == rater_id, A.c.status == ASSIGNMENT_OPEN)
    ).scalar()
    return int(fresh or 0) + int(own or 0)
