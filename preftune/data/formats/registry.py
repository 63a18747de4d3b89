"""The format registry: a name, how to recognise a record, how to convert it.

Detection looks at the first record that parses and takes the first format, in registry order,
whose ``detect`` accepts it (more specific shapes first: UltraFeedback-binarized is a TRL record
with scores, so it is checked before TRL). ``--format NAME`` skips detection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from preftune.data.formats import judgements, pairwise, scored
from preftune.data.records import JUDGEMENT_FORMAT


@dataclass(frozen=True)
class Format:
    name: str
    summary: str  # one line: the fields a record of this format has
    detect: Callable[[dict], bool]
    convert: Callable[..., Any] | None = None  # (rec, ctx) -> Pair | list[Pair] | Judgement
    row: Callable[..., Any] | None = None  # grouped formats: (rec, ctx) -> (prompt, response, score)
    group: Callable[..., Any] | None = None  # grouped formats: rows of one prompt -> list[Pair]


def _has(rec: dict, *keys: str) -> bool:
    return all(k in rec for k in keys)


def _is_nectar(rec: dict) -> bool:
    answers = rec.get("answers")
    return "prompt" in rec and isinstance(answers, list) and bool(answers) and isinstance(answers[0], dict) \
        and "rank" in answers[0]


def _is_trl(rec: dict) -> bool:
    return _has(rec, "chosen", "rejected") and ("prompt" in rec or isinstance(rec["chosen"], list))


def _is_helpsteer(rec: dict) -> bool:
    return _has(rec, "prompt", "response") and any(a in rec for a in scored.HELPSTEER_ATTRIBUTES)


REGISTRY: tuple[Format, ...] = (
    Format("preftune", "the feedback service's preftune.judgement v1 export",
           lambda r: r.get("format") == JUDGEMENT_FORMAT, judgements.convert_preftune),
    Format("best-of-n", "prompt, responses[], best (index or null) or ranking[], rater_id",
           lambda r: "responses" in r, judgements.convert_best_of_n),
    Format("openai", "input.messages, preferred_output[], non_preferred_output[] (OpenAI preference fine-tuning)",
           lambda r: _has(r, "input", "preferred_output", "non_preferred_output"), pairwise.convert_openai),
    Format("nectar", "prompt (HH-style), answers[] with answer and rank (1 = best) (Nectar)",
           _is_nectar, scored.convert_nectar),
    Format("ultrafeedback", "instruction, completions[] with response and fine-grained_score/overall_score",
           lambda r: _has(r, "instruction", "completions"), scored.convert_ultrafeedback),
    Format("shp", "history, human_ref_A, human_ref_B, labels (1: A preferred), score_ratio (SHP)",
           lambda r: _has(r, "human_ref_A", "human_ref_B", "labels"), pairwise.convert_shp),
    Format("pku-saferlhf", "prompt, response_0, response_1, better_response_id, safer_response_id",
           lambda r: _has(r, "response_0", "response_1")
           and ("better_response_id" in r or "safer_response_id" in r), pairwise.convert_pku),
    Format("helpsteer", "prompt, response and a score per row (helpfulness, correctness, ...); rows grouped by prompt",
           _is_helpsteer, row=scored.helpsteer_row, group=scored.convert_helpsteer_group),
    Format("ultrafeedback-binarized", "prompt, chosen[]/rejected[] conversations, score_chosen, score_rejected",
           lambda r: _is_trl(r) and _has(r, "score_chosen", "score_rejected"),
           pairwise.convert_ultrafeedback_binarized),
    Format("trl", "prompt, chosen, rejected (text or chat messages), or chosen/rejected conversations",
           _is_trl, pairwise.convert_trl),
    Format("hh", "chosen, rejected: \\n\\nHuman:/\\n\\nAssistant: transcripts (Anthropic HH-RLHF)",
           lambda r: _has(r, "chosen", "rejected"), pairwise.convert_hh),
)
BY_NAME: dict[str, Format] = {f.name: f for f in REGISTRY}
FORMATS: tuple[str, ...] = tuple(BY_NAME)


def detect_format(rec: Any) -> str | None:
    """The name of the first format whose shape ``rec`` has, or ``None``."""
    if not isinstance(rec, dict):
        return None
    for fmt in REGISTRY:
        if fmt.detect(rec):
            return fmt.name
    return None


def describe_formats() -> str:
    """One line a format, for error messages and ``--help``."""
    return "; ".join(f"{f.name} ({f.summary})" for f in REGISTRY)
