"""Judges: name the behaviour of a response, or say ``"unknown"``.

Why pluggable: what counts as "explains the risk, then declines" is domain knowledge. Some teams
can write it as patterns (``rules``), some have a classifier (``classifier``), some trust their
reward model's score (``reward``), an instruction model with a rubric (``llm``, local or behind
an OpenAI-compatible endpoint), labelled exemplars (``embedding``), or several of these voting
(``ensemble``). Every judge has one job: for each (family, prompt, response), return a behaviour
name or ``"unknown"``. ``"unknown"`` is a result like any other: it is counted in
``unknown_share`` and can be gated (a model that starts writing gibberish raises it).

Types live in a registry (:mod:`preftune.evaluate.judges.registry`), one module each. Judges
are loaded (and model label sets checked against the suite) by :func:`load_judges`, before any
generation, so a wrong model fails fast. How well each judge agrees with human labels is
measured by :mod:`preftune.evaluate.calibration`.
"""

from __future__ import annotations

from typing import Any

from preftune.evaluate.judges import classifier, demo, embedding, ensemble, llm, reward, rules  # noqa: F401 (register)
from preftune.evaluate.judges.classifier import ClassifierJudge, ClassifierJudgeSpec, judged_by
from preftune.evaluate.judges.demo import DemoJudge, DemoJudgeSpec
from preftune.evaluate.judges.embedding import EmbeddingJudge, EmbeddingJudgeSpec
from preftune.evaluate.judges.ensemble import EnsembleJudge, EnsembleJudgeSpec
from preftune.evaluate.judges.llm import LlmJudgeSpec, LocalLlmJudge
from preftune.evaluate.judges.registry import (
    JUDGE_TYPES,
    UNKNOWN,
    BuildContext,
    Judge,
    judge_type,
    register_judge,
    resolve_judge_path,
)
from preftune.evaluate.judges.reward import RewardJudge, RewardJudgeSpec
from preftune.evaluate.judges.rules import RulesJudge, RulesJudgeSpec, RuleSpec

__all__ = [
    "JUDGE_TYPES",
    "UNKNOWN",
    "ClassifierJudge",
    "ClassifierJudgeSpec",
    "DemoJudge",
    "DemoJudgeSpec",
    "EmbeddingJudge",
    "EmbeddingJudgeSpec",
    "EnsembleJudge",
    "EnsembleJudgeSpec",
    "Judge",
    "LlmJudgeSpec",
    "LocalLlmJudge",
    "RewardJudge",
    "RewardJudgeSpec",
    "RuleSpec",
    "RulesJudge",
    "RulesJudgeSpec",
    "judge_type",
    "judges_in_use",
    "load_judges",
    "register_judge",
    "resolve_judge_path",
]


def judges_in_use(suite: Any) -> list[str]:
    """Every judge the suite's families use, ensemble members first (the order they are built in)."""
    top = {f.judge for f in suite.families.values()}
    members = {m for name in top for m in judge_type(suite.judges[name]).members(suite.judges[name])}
    return sorted(members) + sorted(top - members)


def load_judges(
    suite: Any, *, reward_model: str | None = None, device: Any = "cpu", storage: Any = None
) -> dict[str, Judge]:
    """Instantiate every judge the suite's families use (ensemble members too), checking labels against the suite."""
    judges: dict[str, Judge] = {}
    for name in judges_in_use(suite):
        spec = suite.judges[name]
        allowed = {
            f.name: (set(f.behaviours) if f.behaviours is not None else None)
            for f in suite.families.values()
            if name in judged_by(suite, f.name)
        }
        ctx = BuildContext(
            suite=suite, allowed=allowed, device=device, storage=storage, reward_model=reward_model, built=judges
        )
        judges[name] = judge_type(spec).build(name, spec, ctx)
    return judges
