"""``demo``: the demo world's own rule-based classifier (``preftune.world.classify``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from preftune.behaviour.judges.registry import BuildContext, StrictSpec, register_judge


class DemoJudgeSpec(StrictSpec):
    type: Literal["demo"]


class DemoJudge:
    """The demo world's rule-based classifier (``preftune.world.classify``)."""

    def __init__(self, name: str):
        from preftune.world import classify

        self.name = name
        self._classify = classify

    def judge(self, family: str, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        return [self._classify(family, t) for t in responses]


def _labels(spec: DemoJudgeSpec, family: str, judges: dict) -> set[str] | None:
    from preftune.world import FAMILIES

    fam = FAMILIES.get(family)
    if fam is None:
        raise KeyError(f"the demo judge only knows the families {sorted(FAMILIES)}")
    return set(fam.behaviours)


@register_judge("demo", spec=DemoJudgeSpec, labels=_labels)
def build_demo(name: str, spec: DemoJudgeSpec, ctx: BuildContext) -> DemoJudge:
    return DemoJudge(name)
