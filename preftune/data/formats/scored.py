"""Formats that score or rank several responses to one prompt: UltraFeedback (raw), per-response
scores (HelpSteer, one response a row, grouped by prompt) and K-wise rankings (Nectar).

Scores become pairs through :func:`~preftune.data.formats.fields.pairs_from_scores` (the item
weighs 1 in total; the score difference is the margin). A ranking without scores is a judgement
with a full ``ranking``, so the dataset keeps the ranking and the expansion is the one every
best-of-N judgement gets.
"""

from __future__ import annotations

from preftune.data.formats.fields import (
    Ctx,
    _number,
    _opt_str,
    _prompt_text,
    _require,
    _response_text,
    _schema,
    flatten_turns,
    make_judgement,
    pairs_from_scores,
)
from preftune.data.formats.pairwise import _hh_turns
from preftune.data.records import Judgement, Pair

HELPSTEER_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


def _ultrafeedback_score(completion: dict, i: int) -> float:
    # The mean of the fine-grained ratings where present (H4's corrected binarisation), else the
    # critique's overall score.
    for key in ("fine-grained_score", "overall_score"):
        if completion.get(key) is not None:
            return _number(completion[key], f"completions[{i}].{key}")
    raise _schema(f"completions[{i}] has neither 'fine-grained_score' nor 'overall_score'")


def convert_ultrafeedback(rec: dict, ctx: Ctx) -> list[Pair]:
    """openbmb/UltraFeedback: ``instruction`` and ``completions`` (each with a ``response`` and scores)."""
    _require(rec, "UltraFeedback", "instruction", "completions")
    completions = rec["completions"]
    if not isinstance(completions, list) or len(completions) < 2:
        raise _schema("field 'completions' must be a list of at least two rated completions")
    responses, scores = [], []
    for i, comp in enumerate(completions):
        if not isinstance(comp, dict) or "response" not in comp:
            raise _schema(f"completions[{i}] must be an object with a 'response'")
        responses.append(_response_text(comp["response"], f"completions[{i}].response"))
        scores.append(_ultrafeedback_score(comp, i))
    prompt = _prompt_text(rec["instruction"], "instruction")
    return pairs_from_scores(rec, prompt, responses, scores, "ultrafeedback", ctx)


def helpsteer_row(rec: dict, ctx: Ctx) -> tuple[str, str, float]:
    """One HelpSteer row -> (prompt, response, score by ``data.import_options.score_field``)."""
    field = ctx.options.score_field
    _require(rec, "per-response score (HelpSteer)", "prompt", "response", field)
    return _prompt_text(rec["prompt"]), _response_text(rec["response"], "response"), _number(rec[field], field)


def convert_helpsteer_group(rows: list[tuple[dict, str, str, float]], ctx: Ctx) -> list[Pair]:
    """All rows of one prompt (record, prompt, response, score) -> pairs of different scores."""
    rec = rows[0][0]
    return pairs_from_scores(
        rec, rows[0][1], [r[2] for r in rows], [r[3] for r in rows], "helpsteer", ctx
    )


def convert_nectar(rec: dict, ctx: Ctx) -> Judgement:
    """berkeley-nest/Nectar: an HH-style ``prompt`` ending in ``Assistant:`` and ``answers`` with a
    ``rank`` each (1 is best). The ranking (by GPT-4 in Nectar) is kept as a judgement's ranking."""
    _require(rec, "Nectar", "prompt", "answers")
    prompt_value = rec["prompt"]
    if isinstance(prompt_value, str) and "Human:" in prompt_value:
        turns = _hh_turns(prompt_value.rstrip() + " ", "prompt")
        if turns and turns[-1][0] == "assistant" and not turns[-1][1].strip():
            turns = turns[:-1]
        if not turns or turns[-1][0] != "user":
            raise _schema("Nectar record: 'prompt' must end with a Human turn (then 'Assistant:')")
        prompt = flatten_turns(turns)
    else:
        prompt = _prompt_text(prompt_value)
    answers = rec["answers"]
    if not isinstance(answers, list) or len(answers) < 2:
        raise _schema("field 'answers' must be a list of at least two {answer, rank} objects")
    texts, ranks = [], []
    for i, ans in enumerate(answers):
        if not isinstance(ans, dict) or "answer" not in ans or "rank" not in ans:
            raise _schema(f"answers[{i}] must be an object with 'answer' and 'rank'")
        texts.append(_response_text(ans["answer"], f"answers[{i}].answer"))
        ranks.append(_number(ans["rank"], f"answers[{i}].rank"))
    if len(set(ranks)) != len(ranks):
        raise _schema(f"field 'answers': ranks must be distinct, got {sorted(ranks)}")
    ranking = sorted(range(len(texts)), key=lambda i: ranks[i])
    return make_judgement(
        rec,
        prompt=prompt,
        candidate_texts=texts,
        candidate_ids=[f"c{i}" for i in range(len(texts))],
        rater=_opt_str(rec, "rater_id") or "nectar-ranker",
        best=ranking[0],
        ranking=ranking,
        all_unacceptable=False,
        unsafe=[],
        source="nectar",
        item_id=_opt_str(rec, "item_id"),
        prompt_id=_opt_str(rec, "prompt_id"),
        ctx=ctx,
    )
