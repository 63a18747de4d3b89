"""Tasks in: candidates JSONL (collect's output) checked line by line, then stored in one transaction."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from preftune.errors import InputError
from preftune.serve.models import Task
from preftune.serve.schemas import FORMAT_VERSION, CandidatesRecord
from preftune.serve.support import ConflictError, to_naive_utc, utcnow


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
