"""Formats whose records each carry one comparison: TRL, UltraFeedback-binarized, HH-RLHF,
OpenAI preference fine-tuning, SHP and PKU-SafeRLHF.

Each converter turns one record into one :class:`~preftune.data.records.Pair`, or raises
``RecordError`` naming the field and what was expected.
"""

from __future__ import annotations

import math
import re
from typing import Any

from preftune.data.formats.fields import (
    Ctx,
    _int,
    _messages,
    _norm,
    _number,
    _opt_str,
    _prompt_text,
    _require,
    _response_text,
    _schema,
    flatten_turns,
    make_pair,
)
from preftune.data.records import Pair

_HH_TURN = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):[ \t]?")


def _strip_repeated_prompt(prompt_turns: list[tuple[str, str]], turns: list[tuple[str, str]], name: str):
    """Conversational responses that repeat the prompt's turns (UltraFeedback's ``chosen`` is the
    whole conversation): the leading non-assistant turns must be the prompt; they are dropped."""
    k = 0
    while k < len(turns) and turns[k][0] != "assistant":
        k += 1
    if k == 0:
        return turns
    lead = [(r, _norm(t)) for r, t in turns[:k]]
    want = [(r, _norm(t)) for r, t in prompt_turns]
    if len(want) < k or lead != want[-k:]:
        raise _schema(f"field {name!r}: its leading user/system turns are not the record's 'prompt'")
    return turns[k:]


def _responses_given_prompt(rec: dict) -> tuple[str, str, str]:
    prompt_value = rec["prompt"]
    prompt = _prompt_text(prompt_value)
    if isinstance(prompt_value, str):
        prompt_turns = [("user", prompt_value)]
    else:
        prompt_turns = _messages(prompt_value, "prompt")
    out = []
    for name in ("chosen", "rejected"):
        value = rec[name]
        if isinstance(value, list):
            turns = _strip_repeated_prompt(prompt_turns, _messages(value, name), name)
            if not turns:
                raise _schema(f"field {name!r}: no assistant message after the prompt")
            value = [{"role": r, "content": t} for r, t in turns]
        out.append(_response_text(value, name))
    return prompt, out[0], out[1]


def _implicit_prompt(rec: dict) -> tuple[str, str, str]:
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
    return (
        flatten_turns(chosen_turns[:k]),
        "\n\n".join(t.strip() for _, t in rest_c),
        "\n\n".join(t.strip() for _, t in rest_r),
    )


def _score_margin(rec: dict) -> float | None:
    if rec.get("score_chosen") is None and rec.get("score_rejected") is None:
        return None
    _require(rec, "scored", "score_chosen", "score_rejected")
    margin = _number(rec["score_chosen"], "score_chosen") - _number(rec["score_rejected"], "score_rejected")
    if margin < 0:
        raise _schema(f"'score_chosen' is below 'score_rejected' (margin {margin:g}): chosen must be the better one")
    return margin


def convert_trl(rec: dict, ctx: Ctx) -> Pair:
    """TRL preference: explicit ``prompt`` (text or messages) or the implicit-prompt form."""
    _require(rec, "TRL", "chosen", "rejected")
    if rec.get("prompt") is not None:
        prompt, chosen, rejected = _responses_given_prompt(rec)
    elif isinstance(rec["chosen"], list) and isinstance(rec["rejected"], list):
        prompt, chosen, rejected = _implicit_prompt(rec)
    else:
        raise _schema("TRL record without 'prompt' (plain-text records need a prompt; HH transcripts: --format hh)")
    return make_pair(rec, prompt, chosen, rejected, "trl", ctx, margin=_score_margin(rec))


def convert_ultrafeedback_binarized(rec: dict, ctx: Ctx) -> Pair:
    """HuggingFaceH4/ultrafeedback_binarized: ``prompt`` text, ``chosen``/``rejected`` whole
    conversations repeating the user turn, ``score_chosen``/``score_rejected`` (kept as margin)."""
    _require(rec, "UltraFeedback-binarized", "prompt", "chosen", "rejected", "score_chosen", "score_rejected")
    prompt, chosen, rejected = _responses_given_prompt(rec)
    return make_pair(
        rec, prompt, chosen, rejected, "ultrafeedback-binarized", ctx,
        margin=_score_margin(rec), prompt_id=_opt_str(rec, "prompt_id"),
    )


def _hh_turns(text: Any, name: str) -> list[tuple[str, str]]:
    if not isinstance(text, str):
        raise _schema(f"HH record: {name!r} must be a transcript string")
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise _schema(f"HH record: {name!r} must start with 'Human:' and alternate '\\n\\nHuman:' / '\\n\\nAssistant:'")
    return [("user" if parts[i] == "Human" else "assistant", parts[i + 1]) for i in range(1, len(parts), 2)]


def convert_hh(rec: dict, ctx: Ctx) -> Pair:
    """Anthropic HH-RLHF: ``chosen``/``rejected`` transcripts sharing all but the final turn."""
    _require(rec, "HH", "chosen", "rejected")
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
    return make_pair(rec, prompt, chosen_turns[-1][1].strip(), rejected_turns[-1][1].strip(), "hh", ctx)


def convert_openai(rec: dict, ctx: Ctx) -> Pair:
    """OpenAI preference fine-tuning JSONL: ``input.messages``, ``preferred_output``,
    ``non_preferred_output`` (each a list with one assistant message)."""
    _require(rec, "OpenAI preference", "input", "preferred_output", "non_preferred_output")
    inp = rec["input"]
    if not isinstance(inp, dict) or "messages" not in inp:
        raise _schema("field 'input' must be an object with 'messages' (the conversation so far)")
    turns = _messages(inp["messages"], "input.messages")
    if turns[-1][0] == "assistant":
        raise _schema("field 'input.messages' must end with a user (or system) message, not an assistant one")
    chosen = _response_text(rec["preferred_output"], "preferred_output")
    rejected = _response_text(rec["non_preferred_output"], "non_preferred_output")
    return make_pair(rec, flatten_turns(turns), chosen, rejected, "openai", ctx)


def convert_shp(rec: dict, ctx: Ctx) -> Pair:
    """Stanford SHP: ``history`` (the post), ``human_ref_A``/``human_ref_B``, ``labels`` (1: A is
    preferred). The margin is the log of ``score_ratio`` (or of the two scores)."""
    _require(rec, "SHP", "history", "human_ref_A", "human_ref_B", "labels")
    label = _int(rec["labels"], "labels")
    if label not in (0, 1):
        raise _schema(f"field 'labels' must be 1 (A preferred) or 0 (B preferred), got {rec['labels']!r}")
    a = _response_text(rec["human_ref_A"], "human_ref_A")
    b = _response_text(rec["human_ref_B"], "human_ref_B")
    chosen, rejected = (a, b) if label == 1 else (b, a)
    margin = None
    if rec.get("score_ratio") is not None:
        ratio = _number(rec["score_ratio"], "score_ratio")
        if ratio <= 0:
            raise _schema(f"field 'score_ratio' must be positive, got {ratio:g}")
        margin = abs(math.log(ratio))
    history = _prompt_text(rec["history"], "history")
    return make_pair(rec, history, chosen, rejected, "shp", ctx, margin=margin, prompt_id=_opt_str(rec, "post_id"))


def convert_pku(rec: dict, ctx: Ctx) -> Pair:
    """PKU-SafeRLHF: ``prompt``, ``response_0``/``response_1`` and two axes,
    ``better_response_id`` (helpfulness) and ``safer_response_id``; ``data.import_options.pku_axis``
    says which one is the preference."""
    axis_field = "safer_response_id" if ctx.options.pku_axis == "safer" else "better_response_id"
    _require(rec, "PKU-SafeRLHF", "prompt", "response_0", "response_1", axis_field)
    pick = _int(rec[axis_field], axis_field)
    if pick not in (0, 1):
        raise _schema(f"field {axis_field!r} must be 0 or 1, got {rec[axis_field]!r}")
    responses = [_response_text(rec["response_0"], "response_0"), _response_text(rec["response_1"], "response_1")]
    pair = make_pair(
        rec, _prompt_text(rec["prompt"]), responses[pick], responses[1 - pick], "pku-saferlhf", ctx
    )
    pair.tags.append(f"pku-axis:{ctx.options.pku_axis}")
    for i in (0, 1):
        safe = rec.get(f"is_response_{i}_safe")
        if safe is False and pick == i:
            pair.tags.append("chosen-unsafe")
    return pair
