"""Production conversations, read once each: logs under a watermark, or MLflow traces in a window.

A conversation is reduced to an :class:`Observed` record: the prompt (the conversation up to the
answer, flattened as imported prompts are), the answer, the serving model version, an optional
family, and when it happened. Fields on the PII list are dropped from the raw record before
anything is kept.

Log records (JSONL or Parquet, optionally compressed; one file, a folder or an s3:// prefix) are
in OpenAI chat format, either ``{"messages": [..., {"role": "assistant", ...}]}`` (the last
assistant message is the answer) or ``{"request": {"messages": [...]}, "response": {"choices":
[{"message": {...}}]}}``. The watermark remembers, per file, the byte offset read up to (and what
identifies the file, so a rotated or truncated file is read from the start again): each record is
judged once however often observe runs, and a window reads only the appended bytes
(:mod:`.tail`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from preftune.common.timestamps import utc_stamp
from preftune.data.formats import expand_inputs, read_raw_records
from preftune.data.formats.fields import _content, flatten_turns
from preftune.data.validation import RecordError, ValidationReport
from preftune.errors import ConfigError, InputError
from preftune.observe import tail

log = logging.getLogger(__name__)

ROLES = {"user": "user", "human": "user", "assistant": "assistant", "system": "system"}


@dataclass
class Observed:
    """One production answer to observe."""

    id: str
    prompt: str
    response: str
    model_version: str | None
    family: str | None
    at: str | None  # ISO 8601 UTC
    where: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def drop_pii(record: Any, fields: list[str]) -> Any:
    """``record`` without the fields on the PII list (dotted paths reach into nested objects)."""
    if not isinstance(record, dict):
        return record
    out = json.loads(json.dumps(record, default=str))
    for path in fields:
        parts = path.split(".")
        node = out
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return out


def _turns(messages: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RecordError("schema_error", "'messages' must be a non-empty list of chat messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or str(m.get("role", "")).lower() not in ROLES:
            raise RecordError("schema_error", f"messages[{i}] needs a role of system, user or assistant")
        if m.get("content") is None:  # tool-call turns carry no text
            continue
        turns.append((ROLES[str(m["role"]).lower()], _content(m["content"], f"messages[{i}]")))
    return turns


def conversation(rec: dict, where: str) -> tuple[str, str]:
    """(prompt, answer) of one logged exchange in either OpenAI shape."""
    if "request" in rec and "response" in rec:
        req, resp = rec["request"], rec["response"]
        turns = _turns(req.get("messages") if isinstance(req, dict) else None, where)
        try:
            answer = resp["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RecordError("schema_error", "'response' must be a chat completion with choices[0].message") from None
        turns.append(("assistant", _content(answer, "response")))
    else:
        turns = _turns(rec.get("messages"), where)
    if not turns or turns[-1][0] != "assistant":
        raise RecordError("schema_error", "the conversation must end with the assistant's answer")
    prompt_turns = turns[:-1]
    if not any(r == "user" for r, _ in prompt_turns):
        raise RecordError("schema_error", "no user message before the answer")
    return flatten_turns(prompt_turns), turns[-1][1]


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return utc_stamp(value / 1000.0 if value > 1e11 else float(value))  # epoch milliseconds or seconds
    if isinstance(value, datetime):
        return utc_stamp(value)
    return str(value)


def _get(rec: dict, dotted: str) -> Any:
    node: Any = rec
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _chunk_records(chunk: Any, report: ValidationReport) -> Any:
    """``(file:line, parsed value)`` of a chunk's records (JSONL lines numbered from the file's start)."""
    if chunk.whole:
        yield from read_raw_records(chunk.uri, chunk.data, report)
        return
    for lineno, raw in enumerate(chunk.data.split(b"\n"), start=chunk.first_line + 1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        where = f"{chunk.uri}:{lineno}"
        report.records_read += 1
        try:
            yield where, json.loads(raw.decode("utf-8").lstrip("\ufeff"))
        except UnicodeDecodeError as err:
            report.drop("invalid_utf8", where, f"byte {err.start} of the line: {err.reason}")
        except json.JSONDecodeError as err:
            report.drop("schema_error", where, f"not valid JSON ({err.msg} at column {err.colno})")


def _count(chunk: Any, report: ValidationReport) -> int:
    return sum(1 for _ in read_raw_records(chunk.uri, chunk.data, ValidationReport(max_chars=report.max_chars)))


def read_logs(
    path: str,
    storage: Any,
    watermark: dict[str, Any],
    *,
    pii_fields: list[str],
    version_field: str,
    family_field: str,
    report: ValidationReport,
) -> tuple[list[Observed], dict[str, Any]]:
    """New records of every log file under ``path`` since ``watermark`` (a byte offset per file, see
    :mod:`preftune.observe.tail`); returns them and the new watermark."""
    out: list[Observed] = []
    new_mark = dict(watermark)
    for uri in expand_inputs(path, storage):
        chunk = tail.next_chunk(uri, storage, watermark.get(uri))
        report.sources.append(uri)
        if chunk.whole and chunk.skip_records and _count(chunk, report) < chunk.skip_records:
            chunk = tail.from_start(chunk)  # fewer records than read before: a new file under the old name
        if chunk.reset:
            log.warning("observe: %s was %s since the last window: read from the beginning again", uri, chunk.reset)
        n = 0
        for where, raw in _chunk_records(chunk, report):
            n += 1
            if n <= chunk.skip_records:
                report.records_read -= 1  # read before: not part of this window
                continue
            rec = drop_pii(raw, pii_fields)
            try:
                if not isinstance(rec, dict):
                    raise RecordError("schema_error", "expected a JSON object")
                prompt, answer = conversation(rec, where)
            except RecordError as err:
                report.drop(err.reason, where, err.detail)
                continue
            version, family = _get(rec, version_field), _get(rec, family_field)
            out.append(
                Observed(
                    id=str(rec.get("id") or where),
                    prompt=prompt,
                    response=answer,
                    model_version=str(version) if version is not None else None,
                    family=str(family) if family else None,
                    at=_iso(rec.get("created_at") or rec.get("timestamp") or rec.get("created")),
                    where=where,
                )
            )
            report.records_kept += 1
        mark = dict(chunk.mark)
        if chunk.whole:
            mark["records"] = max(n, chunk.skip_records)
        new_mark[uri] = mark
    return out, new_mark


def read_traces(
    experiment: str,
    start_ms: int,
    end_ms: int,
    *,
    pii_fields: list[str],
    version_tag: str,
    family_tag: str,
    report: ValidationReport,
    max_results: int | None = None,
) -> list[Observed]:
    """The serving application's MLflow traces with ``start_ms <= request time < end_ms``.

    The root span's inputs are the request (OpenAI ``messages``), its outputs the response (a chat
    completion, or a plain string); the model version and family come from trace tags.
    """
    import mlflow

    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"observe.source.experiment: no MLflow experiment named {experiment!r}")
    traces = mlflow.search_traces(
        locations=[exp.experiment_id],
        filter_string=f"attributes.timestamp_ms >= {int(start_ms)} AND attributes.timestamp_ms < {int(end_ms)}",
        order_by=["timestamp_ms ASC"],
        max_results=max_results,
        return_type="list",
    )
    out = []
    for trace in traces:
        info = trace.info
        where = f"trace {info.trace_id}"
        report.records_read += 1
        try:
            request = json.loads(trace.data.request) if trace.data.request else None
            response = json.loads(trace.data.response) if trace.data.response else None
        except (TypeError, json.JSONDecodeError):
            report.drop("schema_error", where, "the root span's inputs/outputs are not JSON")
            continue
        rec: dict[str, Any] = {"request": request if isinstance(request, dict) else {"messages": request}}
        if isinstance(response, str):
            response = {"choices": [{"message": {"role": "assistant", "content": response}}]}
        rec["response"] = response
        rec = drop_pii(rec, pii_fields)
        try:
            prompt, answer = conversation(rec, where)
        except RecordError as err:
            report.drop(err.reason, where, err.detail)
            continue
        tags = info.tags or {}
        out.append(
            Observed(
                id=info.trace_id,
                prompt=prompt,
                response=answer,
                model_version=tags.get(version_tag),
                family=tags.get(family_tag) or None,
                at=_iso(info.request_time),
                where=where,
            )
        )
        report.records_kept += 1
    return out


def require_source(kind: str, path: str | None, experiment: str | None) -> None:
    if kind == "logs" and not path:
        raise ConfigError("observe.source.path: give the log file, folder or s3:// prefix to read (or --source)")
    if kind == "mlflow" and not experiment:
        raise ConfigError("observe.source.experiment: give the serving application's MLflow experiment")
    if kind not in ("logs", "mlflow"):
        raise InputError(f"observe.source.kind {kind!r}: expected logs or mlflow")
