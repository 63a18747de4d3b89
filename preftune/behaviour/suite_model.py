"""The resolved behaviour suite: families, cases, calibration items and the suite itself.

What :func:`preftune.behaviour.suite.parse_suite` returns and every consumer reads (evaluate's
metrics and gates, ppo's behaviour figures, observe's production windows). ``Suite.canonical``
is what the suite's content hash covers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from preftune.behaviour.suite_schema import CapabilityText, GenerationSpec
from preftune.behaviour.thresholds import Threshold

# --------------------------------------------------------------------------------------
# The resolved suite


@dataclass(frozen=True)
class Family:
    name: str
    judge: str
    description: str
    behaviours: tuple[str, ...] | None
    preferred: frozenset[str]
    acceptable: frozenset[str]
    forbidden: frozenset[str]
    needless_refusal: frozenset[str]
    thresholds: dict[str, Threshold]
    judge_min_kappa: float | None = None


@dataclass(frozen=True)
class CalibrationItem:
    id: str
    family: str
    prompt: str
    response: str
    label: str


@dataclass(frozen=True)
class Calibration:
    """The suite's human-labelled responses and the agreement its judges must reach."""

    judge_min_kappa: float
    min_items: int
    require_every_family: bool
    items: tuple[CalibrationItem, ...]

    def by_family(self) -> dict[str, list[CalibrationItem]]:
        out: dict[str, list[CalibrationItem]] = {}
        for it in self.items:
            out.setdefault(it.family, []).append(it)
        return out

    def min_kappa(self, family: Family) -> float:
        return family.judge_min_kappa if family.judge_min_kappa is not None else self.judge_min_kappa


@dataclass(frozen=True)
class Case:
    id: str
    family: str
    prompt: str
    tags: tuple[str, ...]
    preferred: frozenset[str]
    acceptable: frozenset[str]
    forbidden: frozenset[str]
    needless_refusal: frozenset[str]

    def roles(self, behaviour: str) -> dict[str, bool]:
        """Which roles a judged behaviour plays for this case (preferred counts as acceptable)."""
        return {
            "preferred": behaviour in self.preferred,
            "acceptable": behaviour in self.preferred or behaviour in self.acceptable,
            "forbidden": behaviour in self.forbidden,
            "needless_refusal": behaviour in self.needless_refusal,
            "unknown": behaviour == "unknown",
        }


@dataclass
class Suite:
    """A validated suite with every case resolved."""

    name: str
    version: int
    source: str
    description: str
    generation: GenerationSpec
    judges: dict[str, Any]
    families: dict[str, Family]
    cases: list[Case]
    capability: list[CapabilityText]
    capability_max_tokens: int
    sha256: str = ""
    cases_by_family: dict[str, list[Case]] = field(default_factory=dict)
    thresholds: dict[str, dict[str, Threshold]] = field(default_factory=dict)
    calibration: Calibration | None = None

    @property
    def id(self) -> str:
        """``<name>-v<version>``: what reports, metrics and registry tags call the suite."""
        return f"{self.name}-v{self.version}"

    def canonical(self) -> dict[str, Any]:
        """Everything that determines the figures, as plain JSON (what the hash covers)."""
        return {
            "name": self.name,
            "version": self.version,
            "generation": self.generation.model_dump(mode="json"),
            "judges": {k: v.model_dump(mode="json") for k, v in sorted(self.judges.items())},
            "families": {
                name: {
                    "judge": f.judge,
                    "behaviours": list(f.behaviours) if f.behaviours is not None else None,
                    "preferred": sorted(f.preferred),
                    "acceptable": sorted(f.acceptable),
                    "forbidden": sorted(f.forbidden),
                    "needless_refusal": sorted(f.needless_refusal),
                    "thresholds": {m: t.model_dump(mode="json") for m, t in sorted(f.thresholds.items())},
                    **({"judge_min_kappa": f.judge_min_kappa} if f.judge_min_kappa is not None else {}),
                }
                for name, f in sorted(self.families.items())
            },
            "cases": [
                {
                    "id": c.id,
                    "family": c.family,
                    "prompt": c.prompt,
                    "tags": list(c.tags),
                    "preferred": sorted(c.preferred),
                    "acceptable": sorted(c.acceptable),
                    "forbidden": sorted(c.forbidden),
                    "needless_refusal": sorted(c.needless_refusal),
                }
                for c in self.cases
            ],
            "capability": {
                "max_tokens": self.capability_max_tokens,
                "texts": [{"id": t.id, "prompt": t.prompt, "text": t.text} for t in self.capability],
            },
            "thresholds": {
                g: {m: t.model_dump(mode="json") for m, t in sorted(ms.items())}
                for g, ms in sorted(self.thresholds.items())
            },
            **({"calibration": self._canonical_calibration()} if self.calibration is not None else {}),
        }

    def _canonical_calibration(self) -> dict[str, Any]:
        cal = self.calibration
        assert cal is not None
        return {
            "judge_min_kappa": cal.judge_min_kappa,
            "min_items": cal.min_items,
            "require_every_family": cal.require_every_family,
            "items": [
                {"id": i.id, "family": i.family, "prompt": i.prompt, "response": i.response, "label": i.label}
                for i in cal.items
            ],
        }
