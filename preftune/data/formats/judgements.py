"""Formats of judgements: the feedback service's ``preftune.judgement`` export and best-of-N files
(one rater's pick among N responses, or a full ranking)."""

from __future__ import annotations

from preftune.data.formats.fields import (
    Ctx,
    _index,
    _opt_str,
    _prompt_text,
    _ranking,
    _response_text,
    _schema,
    make_judgement,
)
from preftune.data.records import JUDGEMENT_FORMAT, Judgement


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


def _written(rec: dict, all_bad: bool) -> str | None:
    """The optional rater-written answer: a non-empty string, only beside ``best: null`` (none acceptable)."""
    written = rec.get("written")
    if written is None:
        return None
    if not isinstance(written, str) or not written.strip():
        raise _schema("field 'written' must be a non-empty string (the rater's own acceptable answer) or absent")
    if not all_bad:
        raise _schema(
            "field 'written' is given but a candidate was chosen: a written answer is for judgements where "
            "every candidate is unacceptable (best: null, all_unacceptable: true)"
        )
    return written


def convert_best_of_n(rec: dict, ctx: Ctx) -> Judgement:
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
    return make_judgement(
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
        ctx=ctx,
        written=_written(rec, all_bad),
    )


def _unsafe(rec: dict, n: int) -> list[int]:
    unsafe = rec.get("unsafe") or []
    if not isinstance(unsafe, list):
        raise _schema("field 'unsafe' must be a list of candidate indexes")
    return sorted({_index(u, n, "unsafe") for u in unsafe})


def convert_preftune(rec: dict, ctx: Ctx) -> Judgement:
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
    return make_judgement(
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
        ctx=ctx,
        written=_written(rec, all_bad),
    )
