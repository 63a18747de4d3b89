"""Importers: preference data in the formats people already have, normalised with provenance.

Supported formats (``--format``; ``auto`` detects from the first record that parses):

``preftune``
    The feedback service's export, one ``preftune.judgement`` v1 record per line (see the brief).
``trl``
    TRL preference records: ``{"prompt", "chosen", "rejected"}`` as plain text, or as lists of
    chat messages (``[{"role": "user"|"assistant"|"system", "content": ...}]``); also TRL's
    implicit-prompt form (``chosen``/``rejected`` full conversations, no ``prompt``), whose shared
    leading messages are the prompt.
``hh``
    Anthropic HH-RLHF records: ``chosen`` and ``rejected`` full transcripts with ``\\n\\nHuman:`` /
    ``\\n\\nAssistant:`` turns. Everything before the final assistant turn is the shared prompt (it
    must be the same in both); the final assistant turns are the responses.
``best-of-n``
    ``{"prompt", "responses": [...], "best": i | null, "ranking": [...]?, "rater_id"}``: one rater's
    pick among N responses (``best: null`` = none acceptable), or a full ``ranking``, best first.

Optional fields on every format: ``family`` (default ``"default"``), ``tags``, ``prompt_id``,
``rater_id``, ``created_at`` (ISO 8601, or epoch seconds). Files are JSONL (UTF-8, one JSON object a
line) or Parquet (``.parquet`` or the ``PAR1`` magic; "line" then means row, 1-based).

Multi-turn prompts (HH transcripts, chat lists) become one prompt text: the first user turn as
is, later turns on their own line as ``Assistant: ...`` / ``User: ...``, so that
:func:`preftune.text.render_prompt` (``User: {prompt}\\nAssistant:``) reproduces the dialogue.

Bytes are decoded line by line, so one badly encoded line is one dropped record
(``invalid_utf8``), not a failed import.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any, Literal

from preftune.collect.records import (
    DEFAULT_FAMILY,
    JUDGEMENT_FORMAT,
    Judgement,
    Pair,
    prompt_key,
    short_hash,
)
from preftune.collect.validation import RecordError, ValidationReport
from preftune.errors import InputError

FormatName = Literal["auto", "preftune", "trl", "hh", "best-of-n"]
FORMATS: tuple[str, ...] = ("preftune", "trl", "hh", "best-of-n")
JUDGEMENT_SOURCES = ("service", "simulated", "judge")

_ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "system": "system"}
_ROLE_LABELS = {"user": "User", "assistant": "Assistant", "system": "System"}
_HH_TURN = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):[ \t]?")


# --------------------------------------------------------------------------------------
# Reading bytes into (where, object) records


def read_raw_records(uri: str, data: bytes, report: ValidationReport) -> Iterator[tuple[str, Any]]:
    """Yield ``(file:line, parsed JSON value)`` for each record; bad lines go to ``report``."""
    if uri.lower().endswith(".parquet") or data[:4] == b"PAR1":
        yield from _parquet_records(uri, data, report)
        return
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark is not content
        data = data[3:]
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        where = f"{uri}:{lineno}"
        report.records_read += 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            report.drop("invalid_utf8", where, f"byte {err.start} of the line: {err.reason}")
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            report.drop("schema_error", where, f"not valid JSON ({err.msg} at column {err.colno})")
            continue
        yield where, value


def _parquet_records(uri: str, data: bytes, report: ValidationReport) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{uri}: not a readable Parquet file ({err})") from None
    for row, rec in enumerate(table.to_pylist(), start=1):
        report.records_read += 1
        yield f"{uri}:{row}", rec


# --------------------------------------------------------------------------------------
# Format detection


def detect_format(rec: Any) -> str | None:
    """The format a record looks like, or ``None``."""
    if not isinstance(rec, dict):
        return None
    if rec.get("format") == JUDGEMENT_FORMAT:
        return "preftune"
    if "responses" in rec:
        return "best-of-n"
    if "chosen" in rec and "rejected" in rec:
        if "prompt" in rec:
            return "trl"
        if isinstance(rec["chosen"], list):
            return "trl"  # TRL's implicit-prompt conversational form
        return "hh"
    return None


# --------------------------------------------------------------------------------------
# Field helpers (raise RecordError("schema_error", ...))


def _schema(detail: str) -> RecordError:
    return RecordError("schema_error", detail)


class _Texts:
    """Truncates texts longer than ``max_chars`` and remembers which fields it cut."""

    def __init__(self, max_chars: int | None):
        self.max_chars = max_chars
        self.cut: list[str] = []

    def __call__(self, text: str, name: str) -> str:
        if self.max_chars is not None and len(text) > self.max_chars:
            self.cut.append(f"{name} ({len(text)} chars)")
            return text[: self.max_chars]
        return text


def _opt_str(rec: dict, key: str) -> str | None:
    value = rec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _schema(f"field {key!r} must be a string, got {type(value).__name__}")
    return str(value)


def _family(rec: dict) -> str:
    family = _opt_str(rec, "family")
    return family.strip() if family and family.strip() else DEFAULT_FAMILY


def _tags(rec: dict) -> list[str]:
    tags = rec.get("tags")
    if tags is None:
        return []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise _schema("field 'tags' must be a list of strings")
    return list(tags)


def _created_at(rec: dict) -> str | None:
    for key in ("created_at", "timestamp"):
        value = rec.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            if not value.strip():
                continue
            try:
                datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                raise _schema(f"field {key!r} is not an ISO 8601 timestamp: {value[:40]!r}") from None
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return datetime.fromtimestamp(float(value), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        if isinstance(value, datetime):  # Parquet timestamp columns
            value = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
            return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        raise _schema(f"field {key!r} must be an ISO 8601 string or epoch seconds")
    return None


def _content(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts: [{"type": "text", "text": ...}]
        texts = []
        for part in value:
            if isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise _schema(f"{name}: only text content parts are supported")
        return "".join(texts)
    raise _schema(f"{name}: message content must be a string")


def _messages(value: Any, name: str) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise _schema(f"field {name!r} must be a string or a non-empty list of chat messages")
    turns = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise _schema(f"{name}[{i}]: a chat message needs 'role' and 'content'")
        role = _ROLE_ALIASES.get(str(msg["role"]).lower())
        if role is None:
            raise _schema(f"{name}[{i}]: unknown role {msg['role']!r} (expected system, user or assistant)")
        turns.append((role, _content(msg["content"], f"{name}[{i}]")))
    return turns


def flatten_turns(turns: list[tuple[str, str]]) -> str:
    """A multi-turn prompt as one text (see the module docstring)."""
    parts = []
    for i, (role, text) in enumerate(turns):
        text = text.strip()
        if i == 0 and role == "user":
            parts.append(text)
        else:
            parts.append(f"{_ROLE_LABELS[role]}: {text}")
    return "\n".join(parts)


def _prompt_text(value: Any, name: str = "prompt") -> str:
    if isinstance(value, str):
        return value
    return flatten_turns(_messages(value, name))


def _response_text(value: Any, name: str) -> str:
    """A response: plain text, or a list of assistant messages."""
    if isinstance(value, str):
        return value
    turns = _messages(value, name)
    if any(role != "assistant" for role, _ in turns):
        raise _schema(f"field {name!r}: the response messages must all be assistant messages")
    return "\n\n".join(text.strip() for _, text in turns)


def _norm(text: str) -> str:
    return " ".join(text.split())


def _index(value: Any, n: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _schema(f"field {name!r} must be an integer index, got {value!r}")
    if not 0 <= value < n:
        raise _schema(f"field {name!r} = {value} is out of range for {n} candidates")
    return value


def _ranking(value: Any, n: int) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or sorted(value) != list(range(n)) or any(isinstance(v, bool) for v in value):
        raise _schema(f"field 'ranking' must list every candidate index 0..{n - 1} once, best first; got {value!r}")
    return [int(v) for v in value]


# --------------------------------------------------------------------------------------
# Per-format conversion: record -> Judgement | Pair


def _pair(rec: dict, prompt: str, chosen: str, rejected: str, source: str, texts: _Texts, where: str) -> Pair:
    prompt = texts(prompt, "prompt")
    chosen = texts(chosen, "chosen")
    rejected = texts(rejected, "rejected")
    if not prompt.strip():
        raise RecordError("empty_text", "empty prompt")
    if not chosen.strip() or not rejected.strip():
        raise RecordError("empty_text", "empty " + ("chosen" if not chosen.strip() else "rejected") + " text")
    if _norm(chosen) == _norm(rejected):
        raise RecordError("identical_chosen_rejected", "chosen and rejected are the same text")
    prompt_id = _opt_str(rec, "prompt_id") or prompt_key(prompt)
    rater = _opt_str(rec, "rater_id")
    item_id = short_hash("pair-item", prompt_id, sorted([_norm(chosen), _norm(rejected)]))
    return Pair(
        pair_id=short_hash("pair", item_id, rater, _norm(chosen), _norm(rejected)),
        item_id=item_id,
        prompt_id=prompt_id,
        family=_family(rec),
        tags=_tags(rec),
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        weight=1.0,
        source=source,
        rater_id=rater,
        created_at=_created_at(rec),
        where=where,
    )


def convert_trl(rec: dict, texts: _Texts, where: str) -> Pair:
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise _schema(f"TRL record without {key!r} (expected prompt, chosen, rejected)")
    if "prompt" in rec and rec["prompt"] is not None:
        prompt = _prompt_text(rec["prompt"])
        chosen = _response_text(rec["chosen"], "chosen")
        rejected = _response_text(rec["rejected"], "rejected")
    elif isinstance(rec["chosen"], list) and isinstance(rec["rejected"], list):
        chosen_turns = _messages(rec["chosen"], "chosen")
        rejected_turns = _messages(rec["rejected"], "rejected")
        k = 0
        while k < min(len(chosen_turns), len(rejected_turns)) and chosen_turns[k] == rejected_turns[k]:
            k += 1
        while k > 0 and chosen_turns[k - 1][0] == "assistant":  # the prompt ends with a user turn
            k -= 1
        if k == 0:
            raise _schema("implicit-prompt TRL record: chosen and rejected share no leading user turn (the prompt)")
        rest_c, rest_r = chosen_turns[k:], rejected_turns[k:]
        if not rest_c or not rest_r or any(r != "assistant" for r, _ in rest_c + rest_r):
            raise _schema("implicit-prompt TRL record: after the shared prompt only assistant turns may follow")
        prompt = flatten_turns(chosen_turns[:k])
        chosen = "\n\n".join(t.strip() for _, t in rest_c)
        rejected = "\n\n".join(t.strip() for _, t in rest_r)
    else:
        raise _schema("TRL record without 'prompt' (plain-text records need a prompt; HH transcripts: --format hh)")
    return _pair(rec, prompt, chosen, rejected, "trl", texts, where)


def _hh_turns(text: Any, name: str) -> list[tuple[str, str]]:
    if not isinstance(text, str):
        raise _schema(f"HH record: {name!r} must be a transcript string")
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise _schema(f"HH record: {name!r} must start with 'Human:' and alternate '\\n\\nHuman:' / '\\n\\nAssistant:'")
    return [("user" if parts[i] == "Human" else "assistant", parts[i + 1]) for i in range(1, len(parts), 2)]


def convert_hh(rec: dict, texts: _Texts, where: str) -> Pair:
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise _schema(f"HH record without {key!r}")
    chosen_turns = _hh_turns(rec["chosen"], "chosen")
    rejected_turns = _hh_turns(rec["rejected"], "rejected")
    for name, turns in (("chosen", chosen_turns), ("rejected", rejected_turns)):
        if turns[-1][0] != "assistant" or len(turns) < 2:
            raise _schema(f"HH record: the {name} transcript must end with an Assistant turn after a Human turn")
    prompt_c = [(r, _norm(t)) for r, t in chosen_turns[:-1]]
    prompt_r = [(r, _norm(t)) for r, t in rejected_turns[:-1]]
    if prompt_c != prompt_r:
        raise _schema("HH record: chosen and rejected differ before their final Assistant turn (no shared prompt)")
    prompt = flatten_turns(chosen_turns[:-1])
    return _pair(rec, prompt, chosen_turns[-1][1].strip(), rejected_turns[-1][1].strip(), "hh", texts, where)


def _judgement(
    rec: dict,
    *,
    prompt: str,
    candidate_texts: list[str],
    candidate_ids: list[str],
    rater: str,
    best: int | None,
    ranking: list[int] | None,
    all_unacceptable: bool,
    unsafe: list[int],
    source: str,
    item_id: str | None,
    prompt_id: str | None,
    texts: _Texts,
    where: str,
) -> Judgement:
    prompt = texts(prompt, "prompt")
    if not prompt.strip():
        raise RecordError("empty_text", "empty prompt")
    candidate_texts = [texts(t, f"candidate {i}") for i, t in enumerate(candidate_texts)]
    if best is not None and not candidate_texts[best].strip():
        raise RecordError("empty_text", f"the chosen (best) candidate {best} is empty")
    prompt_id = prompt_id or prompt_key(prompt)
    item_id = item_id or short_hash("item", prompt_id, [_norm(t) for t in candidate_texts])
    return Judgement(
        item_id=item_id,
        prompt_id=prompt_id,
        family=_family(rec),
        tags=_tags(rec),
        prompt=prompt,
        candidates=[{"id": cid, "text": t} for cid, t in zip(candidate_ids, candidate_texts, strict=True)],
        rater_id=rater,
        best=best,
        ranking=ranking,
        all_unacceptable=all_unacceptable,
        unsafe=unsafe,
        source=source,
        created_at=_created_at(rec),
        where=where,
    )


def _rater(rec: dict) -> str:
    rater = _opt_str(rec, "rater_id")
    if rater is None or not rater.strip():
        raise _schema("field 'rater_id' is required (agreement is measured between raters)")
    return rater


def _best_and_ranking(rec: dict, n: int) -> tuple[int | None, list[int] | None, bool]:
    ranking = _ranking(rec.get("ranking"), n)
    all_bad = rec.get("all_unacceptable", False)
    if not isinstance(all_bad, bool):
        raise _schema("field 'all_unacceptable' must be true or false")
    best = rec.get("best")
    if best is not None:
        best = _index(best, n, "best")
    return best, ranking, all_bad


def convert_best_of_n(rec: dict, texts: _Texts, where: str) -> Judgement:
    if "prompt" not in rec:
        raise _schema("best-of-N record without 'prompt'")
    prompt = _prompt_text(rec["prompt"])
    responses = rec.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise _schema("field 'responses' must be a list of at least two responses")
    candidate_texts = [_response_text(r, f"responses[{i}]") for i, r in enumerate(responses)]
    n = len(candidate_texts)
    if "best" not in rec and rec.get("ranking") is None:
        raise _schema("best-of-N record needs 'best' (an index, or null for none acceptable) or a 'ranking'")
    best, ranking, all_bad = _best_and_ranking(rec, n)
    if "best" not in rec:
        best = ranking[0] if ranking else None
    if best is None:
        all_bad = True  # best: null means "none of the responses is acceptable"
    elif all_bad:
        raise _schema("'best' names a response but 'all_unacceptable' is true")
    if ranking is not None and best is not None and ranking[0] != best:
        raise _schema(f"'ranking' starts with {ranking[0]} but 'best' is {best}")
    unsafe = _unsafe(rec, n)
    return _judgement(
        rec,
        prompt=prompt,
        candidate_texts=candidate_texts,
        candidate_ids=[f"c{i}" for i in range(n)],
        rater=_rater(rec),
        best=best,
        ranking=ranking,
        all_unacceptable=all_bad,
        unsafe=unsafe,
        source="best-of-n",
        item_id=_opt_str(rec, "item_id"),
        prompt_id=_opt_str(rec, "prompt_id") or _opt_str(rec, "id"),
        texts=texts,
        where=where,
    )


def _unsafe(rec: dict, n: int) -> list[int]:
    unsafe = rec.get("unsafe") or []
    if not isinstance(unsafe, list):
        raise _schema("field 'unsafe' must be a list of candidate indexes")
    return sorted({_index(u, n, "unsafe") for u in unsafe})


def convert_preftune(rec: dict, texts: _Texts, where: str) -> Judgement:
    if rec.get("format") != JUDGEMENT_FORMAT:
        raise _schema(f"expected format {JUDGEMENT_FORMAT!r}, got {rec.get('format')!r}")
    if rec.get("version") != 1:
        raise _schema(f"unsupported {JUDGEMENT_FORMAT} version {rec.get('version')!r} (this preftune reads version 1)")
    prompt = rec.get("prompt")
    if not isinstance(prompt, str):
        raise _schema("field 'prompt' must be a string")
    candidates = rec.get("candidates")
    if not isinstance(candidates, list) or len(candidates) < 2:
        raise _schema("field 'candidates' must be a list of at least two {id, text} objects")
    ids, cand_texts = [], []
    for i, cand in enumerate(candidates):
        if not isinstance(cand, dict) or not isinstance(cand.get("text"), str):
            raise _schema(f"candidates[{i}] must be an object with a 'text' string")
        ids.append(str(cand.get("id") or f"c{i}"))
        cand_texts.append(cand["text"])
    if len(set(ids)) != len(ids):
        raise _schema("candidate ids are not unique")
    n = len(cand_texts)
    if "best" not in rec:
        raise _schema("field 'best' is required (an index, or null with all_unacceptable: true)")
    best, ranking, all_bad = _best_and_ranking(rec, n)
    if best is None and not all_bad:
        raise _schema("'best' is null but 'all_unacceptable' is false (a skipped task has no judgement)")
    if best is not None and all_bad:
        raise _schema("'best' names a candidate but 'all_unacceptable' is true")
    if ranking is not None and best is not None and ranking[0] != best:
        raise _schema(f"'ranking' starts with {ranking[0]} but 'best' is {best}")
    source = _opt_str(rec, "source") or "service"
    return _judgement(
        rec,
        prompt=prompt,
        candidate_texts=cand_texts,
        candidate_ids=ids,
        rater=_rater(rec),
        best=best,
        ranking=ranking,
        all_unacceptable=all_bad,
        unsafe=_unsafe(rec, n),
        source=source,
        item_id=_opt_str(rec, "item_id"),
        prompt_id=_opt_str(rec, "prompt_id"),
        texts=texts,
        where=where,
    )


CONVERTERS = {
    "preftune": convert_preftune,
    "trl": convert_trl,
    "hh": convert_hh,
    "best-of-n": convert_best_of_n,
}


# --------------------------------------------------------------------------------------
# The importer: one or more files -> judgements + pairs + report


class Importer:
    """Normalises records of one format, dropping duplicates, with a :class:`ValidationReport`."""

    def __init__(self, report: ValidationReport, max_chars: int | None):
        self.report = report
        self.max_chars = max_chars
        self.judgements: list[Judgement] = []
        self.pairs: list[Pair] = []
        self._seen: set[tuple] = set()

    def add(self, fmt: str, rec: Any, where: str) -> None:
        """Convert one parsed record; problems are counted (or raised in strict mode)."""
        if not isinstance(rec, dict):
            self.report.drop("schema_error", where, f"expected a JSON object, got {type(rec).__name__}")
            return
        texts = _Texts(self.max_chars)
        try:
            out = CONVERTERS[fmt](rec, texts, where)
        except RecordError as err:
            if err.reason == "schema_error":
                self.report.drop(err.reason, where, f"{fmt}: {err.detail}")
            else:
                self.report.drop(err.reason, where, err.detail)
            return
        if isinstance(out, Judgement):
            key: tuple = ("j", out.item_id, out.rater_id)
        else:
            key = ("p", prompt_key(out.prompt), _norm(out.chosen), _norm(out.rejected), out.rater_id)
        if key in self._seen:
            what = "judgement of this item by this rater" if isinstance(out, Judgement) else "pair"
            self.report.drop("duplicate", where, f"the same {what} appeared earlier; kept the first")
            return
        self._seen.add(key)
        if texts.cut:
            self.report.repair("truncated", where, f"cut to {self.max_chars} chars: {', '.join(texts.cut)}")
        (self.judgements if isinstance(out, Judgement) else self.pairs).append(out)
        self.report.records_kept += 1

    def add_judgement(self, judgement: Judgement) -> None:
        """A judgement made in-process (the simulated panel): deduplicated, never converted."""
        key = ("j", judgement.item_id, judgement.rater_id)
        if key in self._seen:
            self.report.drop("duplicate", judgement.where or judgement.item_id, "the same rater judged this item twice")
            return
        self._seen.add(key)
        self.judgements.append(judgement)
        self.report.records_kept += 1

    def add_file(self, uri: str, data: bytes, fmt: str = "auto") -> str:
        """Import a whole file's bytes; returns the format used."""
        if fmt != "auto" and fmt not in CONVERTERS:
            raise InputError(f"{uri}: unknown format {fmt!r} (expected auto, {', '.join(FORMATS)})")
        self.report.sources.append(uri)
        chosen = None if fmt == "auto" else fmt
        pending: list[tuple[str, Any]] = []
        for where, rec in read_raw_records(uri, data, self.report):
            if chosen is None:
                detected = detect_format(rec)
                if detected is None:
                    pending.append((where, rec))  # decided by the first recognisable record
                    if len(pending) > 100:
                        break
                    continue
                chosen = detected
                for w, r in pending:
                    self.add(chosen, r, w)
                pending.clear()
            self.add(chosen, rec, where)
        if chosen is None:
            first = pending[0] if pending else None
            if first is None:
                raise InputError(f"{uri}: no record could be read (the file is empty, or no line is valid UTF-8 JSON)")
            keys = sorted(first[1]) if isinstance(first[1], dict) else type(first[1]).__name__
            raise InputError(
                f"{first[0]}: cannot detect the format (keys {keys}); expected a preftune judgement, TRL "
                "(prompt/chosen/rejected), HH (chosen/rejected transcripts) or best-of-N (prompt/responses/best) "
                "record; pass --format"
            )
        return chosen
