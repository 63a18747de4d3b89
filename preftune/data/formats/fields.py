"""Field helpers shared by every format: typed reads that raise ``RecordError`` naming the field.

Every converter reads its record through these, so that a bad record is dropped (or, with
``--strict``, fails) with the same wording whatever the format: the field, what was expected,
what was found.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from preftune.common.timestamps import utc_stamp
from preftune.data.records import DEFAULT_FAMILY, Judgement, Pair, prompt_key, short_hash
from preftune.data.validation import RecordError

_ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "system": "system"}
_ROLE_LABELS = {"user": "User", "assistant": "Assistant", "system": "System"}


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
            return utc_stamp(value)
        if isinstance(value, datetime):  # Parquet timestamp columns
            return utc_stamp(value)
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


def _number(value: Any, name: str) -> float:
    """A finite number; numeric strings are accepted (CSV cells arrive as text)."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _schema(f"field {name!r} must be a number, got {value[:40]!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _schema(f"field {name!r} must be a finite number, got {value!r}")
    return float(value)


def _int(value: Any, name: str) -> int:
    number = _number(value, name)
    if number != int(number):
        raise _schema(f"field {name!r} must be a whole number, got {value!r}")
    return int(number)


def _require(rec: dict, fmt: str, *keys: str) -> None:
    missing = [k for k in keys if k not in rec or rec[k] is None]
    if missing:
        raise _schema(f"{fmt} record without {', '.join(repr(k) for k in missing)} (expected {', '.join(keys)})")


@dataclass(frozen=True)
class FormatOptions:
    """Choices a format leaves open (``data.import_options`` in the run config)."""

    pku_axis: str = "better"  # PKU-SafeRLHF: "better" (helpfulness) or "safer"
    score_field: str = "helpfulness"  # per-response scores (HelpSteer): the attribute to rank by
    score_pairs: str = "all"  # scored/ranked items: "all" pairs of different scores, or "best_vs_rest"


@dataclass
class Ctx:
    """What a converter gets besides the record: the text limiter, where it is, the options."""

    texts: _Texts
    where: str
    options: FormatOptions = field(default_factory=FormatOptions)


def make_pair(
    rec: dict,
    prompt: str,
    chosen: str,
    rejected: str,
    source: str,
    ctx: Ctx,
    *,
    margin: float | None = None,
    weight: float = 1.0,
    prompt_id: str | None = None,
    rater: str | None = None,
) -> Pair:
    """A validated :class:`Pair` (empty or identical texts raise their own drop reasons)."""
    texts = ctx.texts
    prompt = texts(prompt, "prompt")
    chosen = texts(chosen, "chosen")
    rejected = texts(rejected, "rejected")
    if not prompt.strip():
        raise RecordError("empty_text", "empty prompt")
    if not chosen.strip() or not rejected.strip():
        raise RecordError("empty_text", "empty " + ("chosen" if not chosen.strip() else "rejected") + " text")
    if _norm(chosen) == _norm(rejected):
        raise RecordError("identical_chosen_rejected", "chosen and rejected are the same text")
    prompt_id = prompt_id or _opt_str(rec, "prompt_id") or prompt_key(prompt)
    rater = rater if rater is not None else _opt_str(rec, "rater_id")
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
        weight=weight,
        source=source,
        rater_id=rater,
        created_at=_created_at(rec),
        where=ctx.where,
        margin=margin,
    )


def pairs_from_scores(
    rec: dict, prompt: str, responses: list[str], scores: list[float], source: str, ctx: Ctx
) -> list[Pair]:
    """Pairs of one prompt's scored responses; the item's pairs weigh 1 in total (as judgements do).

    ``score_pairs = all``: every two responses with different scores, the higher one chosen;
    ``best_vs_rest``: the best-scored response against each lower-scored one. The score
    difference is the pair's margin. Equal scores carry no preference and give no pair.
    """
    order = sorted(range(len(responses)), key=lambda i: -scores[i])
    if ctx.options.score_pairs == "best_vs_rest":
        top = order[0]
        comparisons = [(top, k) for k in order[1:] if scores[k] < scores[top]]
    else:
        comparisons = [(a, b) for i, a in enumerate(order) for b in order[i + 1 :] if scores[a] > scores[b]]
    if not comparisons:
        raise RecordError("identical_chosen_rejected", "every response has the same score: no preference to learn")
    out: list[Pair] = []
    for a, b in comparisons:
        try:
            out.append(
                make_pair(rec, prompt, responses[a], responses[b], source, ctx, margin=scores[a] - scores[b])
            )
        except RecordError:
            continue  # an empty or duplicated response among several: the item's other pairs stand
    if not out:
        raise RecordError("empty_text", "no usable pair: the differently scored responses are empty or identical")
    for p in out:
        p.weight = 1.0 / len(out)
    return out


def make_judgement(
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
    ctx: Ctx,
    written: str | None = None,
) -> Judgement:
    texts = ctx.texts
    prompt = texts(prompt, "prompt")
    if not prompt.strip():
        raise RecordError("empty_text", "empty prompt")
    candidate_texts = [texts(t, f"candidate {i}") for i, t in enumerate(candidate_texts)]
    if best is not None and not candidate_texts[best].strip():
        raise RecordError("empty_text", f"the chosen (best) candidate {best} is empty")
    if written is not None:  # non-blank already (judgements._written); here only the length limit
        written = texts(written, "written answer")
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
        where=ctx.where,
        written=written,
    )
