"""``ensemble``: several named judges vote; ``majority`` or ``unanimous`` (all agree, else unknown)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from preftune.behaviour.judges.registry import (
    JUDGE_TYPES,
    UNKNOWN,
    BuildContext,
    CheckContext,
    Problem,
    StrictSpec,
    register_judge,
)


class EnsembleJudgeSpec(StrictSpec):
    type: Literal["ensemble"]
    judges: list[str] = Field(..., min_length=2, description="Names of other judges of the suite (not ensembles).")
    rule: Literal["majority", "unanimous"] = Field(
        "majority",
        description="'majority': the behaviour more than half of the judges name; 'unanimous': the behaviour every "
        "judge names. Otherwise unknown (a judge's unknown is a vote for unknown).",
    )


def vote(labels: Sequence[str], rule: str) -> str:
    counts = Counter(labels)
    best, n = counts.most_common(1)[0]
    if rule == "unanimous":
        return best if n == len(labels) else UNKNOWN
    return best if n * 2 > len(labels) else UNKNOWN


class EnsembleJudge:
    def __init__(self, name: str, spec: EnsembleJudgeSpec, members: list[Any]):
        self.name, self.spec, self.members = name, spec, members

    def judge(self, family: str, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        votes = [m.judge(family, prompts, responses) for m in self.members]
        return [vote(list(v), self.spec.rule) for v in zip(*votes, strict=True)] if votes else []


def _labels(spec: EnsembleJudgeSpec, family: str, judges: dict) -> set[str] | None:
    out: set[str] = set()
    for m in spec.judges:
        mspec = judges.get(m)
        if mspec is None or mspec.type == "ensemble":
            return None
        labels = JUDGE_TYPES[mspec.type].labels(mspec, family, judges)
        if labels is None:
            return None
        out |= labels
    return out


def _check(jname: str, j: EnsembleJudgeSpec, ctx: CheckContext) -> list[Problem]:
    out: list[Problem] = []
    if len(set(j.judges)) != len(j.judges):
        out.append((("judges", jname, "judges"), f"judge {jname!r}: a member is listed twice"))
    for m in j.judges:
        if m not in ctx.judges:
            out.append(
                (
                    ("judges", jname, "judges"),
                    f"judge {jname!r}: unknown member judge {m!r} (judges: {sorted(ctx.judges)})",
                )
            )
        elif ctx.judges[m].type == "ensemble":
            out.append((("judges", jname, "judges"), f"judge {jname!r}: member {m!r} is itself an ensemble"))
    return out


@register_judge("ensemble", spec=EnsembleJudgeSpec, labels=_labels, check=_check, members=lambda s: list(s.judges))
def build_ensemble(name: str, spec: EnsembleJudgeSpec, ctx: BuildContext) -> EnsembleJudge:
    return EnsembleJudge(name, spec, [ctx.built[m] for m in spec.judges])
