"""Judges: name the behaviour of a response, or say ``"unknown"``.

Why pluggable: what counts as "explains the risk, then declines" is domain knowledge. Some teams
can write it as patterns (``rules``), some have a classifier (``classifier``), some trust their
reward model's score (``reward``), an instruction model with a rubric (``llm``, local or behind
an OpenAI-compatible endpoint), labelled exemplars (``embedding``), or several of these voting
(``ensemble``). Every judge has one job: for each (family, prompt, response), return a behaviour
name or ``"unknown"``. ``"unknown"`` is a result like any other: it is counted in
``unknown_share`` and can be gated (a model that starts writing gibberish raises it).

Types live in a registry (:mod:`preftune.behaviour.judges.registry`), one module each. Judges
are loaded (and model label sets checked against the suite) by :func:`load_judges`, before any
generation, so a wrong model fails fast. How well each judge agrees with human labels is
measured by :mod:`preftune.behaviour.calibration`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from preftune.behaviour.judges import classifier, demo, embedding, ensemble, llm, reward, rules  # noqa: F401 (register)
from preftune.behaviour.judges.classifier import ClassifierJudge, ClassifierJudgeSpec, judged_by
from preftune.behaviour.judges.demo import DemoJudge, DemoJudgeSpec
from preftune.behaviour.judges.embedding import EmbeddingJudge, EmbeddingJudgeSpec
from preftune.behaviour.judges.ensemble import EnsembleJudge, EnsembleJudgeSpec
from preftune.behaviour.judges.llm import LlmJudgeSpec, LocalLlmJudge
from preftune.behaviour.judges.registry import (
    JUDGE_TYPES,
    UNKNOWN,
    BuildContext,
    Judge,
    judge_type,
    register_judge,
    resolve_judge_path,
)
from preftune.behaviour.judges.reward import RewardJudge, RewardJudgeSpec
from preftune.behaviour.judges.rules import RulesJudge, RulesJudgeSpec, RuleSpec

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
    "judge_by_family",
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


def judge_by_family(
    suite: Any,
    judges: Mapping[str, Any],
    families: Sequence[str],
    prompts: Sequence[str],
    texts: Sequence[str],
) -> list[str | None]:
    """The behaviour of each (family, prompt, text), each family by its suite judge in one batch.

    None where the judge could not tell, or the family is not in the suite.
    """
    by_family: dict[str, list[int]] = defaultdict(list)
    for i, family in enumerate(families):
        if family in suite.families:
            by_family[family].append(i)
    behaviours: list[str | None] = [None] * len(families)
    for family, idx in by_family.items():
        judge = judges[suite.families[family].judge]
        labels = judge.judge(family, [prompts[i] for i in idx], [texts[i] for i in idx])
        for i, b in zip(idx, labels, strict=True):
            behaviours[i] = b
    return behaviours
