"""``rules``: regular expressions and keyword sets; exactly one matching behaviour wins."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from preftune.behaviour.judges.registry import (
    BEHAVIOUR_NAME,
    UNKNOWN,
    BuildContext,
    CheckContext,
    Problem,
    StrictSpec,
    register_judge,
)


class RuleSpec(StrictSpec):
    """A behaviour is recognised when ``all`` match, one of ``any``/``keywords`` matches, and no ``none`` does."""

    all: list[str] = Field(default_factory=list, description="Regular expressions that must all match.")
    any: list[str] = Field(default_factory=list, description="Regular expressions of which one must match.")
    keywords: list[str] = Field(default_factory=list, description="Words or phrases of which one must occur.")
    none: list[str] = Field(default_factory=list, description="Regular expressions that must not match.")


class RulesJudgeSpec(StrictSpec):
    type: Literal["rules"]
    ignore_case: bool = True
    behaviours: dict[str, RuleSpec] = Field(..., min_length=1)


class _CompiledRule:
    def __init__(self, spec: Any, flags: int):
        self.all = [re.compile(p, flags) for p in spec.all]
        self.any = [re.compile(p, flags) for p in spec.any]
        self.any += [re.compile(r"\b" + re.escape(k) + r"\b", flags) for k in spec.keywords]
        self.none = [re.compile(p, flags) for p in spec.none]

    def matches(self, text: str) -> bool:
        return (
            all(p.search(text) for p in self.all)
            and (not self.any or any(p.search(text) for p in self.any))
            and not any(p.search(text) for p in self.none)
        )


class RulesJudge:
    """Regular expressions and keyword sets: exactly one matching behaviour wins; none or several is unknown."""

    def __init__(self, name: str, spec: RulesJudgeSpec, allowed: dict[str, set[str] | None]):
        self.name = name
        flags = re.IGNORECASE if spec.ignore_case else 0
        self.rules = {b: _CompiledRule(r, flags) for b, r in spec.behaviours.items()}
        self.allowed = allowed

    def judge(self, family: str, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        allowed = self.allowed.get(family)
        out = []
        for text in responses:
            hits = [b for b, rule in self.rules.items() if (allowed is None or b in allowed) and rule.matches(text)]
            out.append(hits[0] if len(hits) == 1 else UNKNOWN)
        return out


def _check(jname: str, j: RulesJudgeSpec, ctx: CheckContext) -> list[Problem]:
    out: list[Problem] = []
    for b, rule in j.behaviours.items():
        loc = ("judges", jname, "behaviours", b)
        if not BEHAVIOUR_NAME.match(b):
            out.append((loc, f"judge {jname!r}: bad behaviour name {b!r}"))
        if not (rule.all or rule.any or rule.keywords):
            out.append((loc, f"judge {jname!r}, behaviour {b!r}: a rule needs 'all', 'any' or 'keywords' patterns"))
        for kind in ("all", "any", "none"):
            for pattern in getattr(rule, kind):
                try:
                    re.compile(pattern)
                except re.error as err:
                    out.append(
                        (
                            (*loc, kind),
                            f"judge {jname!r}, behaviour {b!r}: {kind} pattern {pattern!r} is not a valid "
                            f"regular expression ({err})",
                        )
                    )
    return out


@register_judge("rules", spec=RulesJudgeSpec, labels=lambda s, f, js: set(s.behaviours), check=_check)
def build_rules(name: str, spec: RulesJudgeSpec, ctx: BuildContext) -> RulesJudge:
    return RulesJudge(name, spec, ctx.allowed)
