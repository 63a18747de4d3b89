"""Judgements out: the ``preftune.judgement`` v1 record, the export, agreement and counts."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from preftune.serve.models import ASSIGNMENT_OPEN, Assignment, Judgement, Rater, Task
from preftune.serve.schemas import FORMAT_VERSION, JUDGEMENT_FORMAT
from preftune.serve.support import iso_utc, to_naive_utc, utcnow

EXPORT_BATCH = 1000


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
    if j.written is not None:  # only where the rater wrote one (the exchange format's optional field)
        rec["written"] = j.written
    if with_uid:
        rec["judgement_id"] = j.uid
        rec["task_id"] = j.task_id
    return rec


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
