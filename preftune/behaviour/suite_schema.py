"""The suite file format: what a behaviour-suite YAML may contain (pydantic models, unknown fields rejected).

Judge sections come from the judge registry (:mod:`preftune.behaviour.judges`): every registered
type's spec, told apart by ``type``. Resolution (roles inherited, cases read, labels checked) is
in :mod:`preftune.behaviour.suite`; the format is documented in ``docs/suites.md``.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from preftune.behaviour.judges import JUDGE_TYPES
from preftune.behaviour.thresholds import Threshold

SUITE_FORMAT = "preftune.suite"
FORMAT_VERSION = 1
RESERVED_FAMILIES = frozenset({"all", "capability", "every_family"})
FAMILY_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
UNKNOWN_LABEL = "unknown"
DEMO_PROMPTS = "demo:prompts-eval"
"""``cases_from`` entry that reads the demo world's held-out prompts (built on demand)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerationSpec(_Strict):
    """Fixed, seeded sampling: part of the suite, so two evaluations of one model agree."""

    seed: int = Field(0, ge=0, description="Seed of the sampling (batch i uses seed + i).")
    samples_per_prompt: int = Field(4, ge=1, le=256, description="Samples drawn per case.")
    temperature: float = Field(1.0, gt=0.0, le=5.0, description="Sampling temperature (also used for the KL).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0: off).")
    max_new_tokens: int = Field(48, ge=1, le=4096, description="Longest response in new tokens.")
    batch_size: int = Field(64, ge=1, le=4096, description="Sequences per generation batch (part of the seeding).")


JudgeSpec = Annotated[Union[tuple(t.spec for t in JUDGE_TYPES.values())], Field(discriminator="type")]  # noqa: UP007
"""Every registered judge type's suite section, told apart by ``type``."""
JUDGE_TYPE_NAMES = tuple(JUDGE_TYPES)


class FamilySpec(_Strict):
    description: str = ""
    judge: str = Field(..., min_length=1)
    behaviours: list[str] | None = None
    preferred: list[str] = Field(default_factory=list)
    acceptable: list[str] = Field(default_factory=list)
    forbidden: list[str] = Field(default_factory=list)
    needless_refusal: list[str] = Field(default_factory=list)
    thresholds: dict[str, Threshold] = Field(default_factory=dict)
    judge_min_kappa: float | None = Field(
        None, ge=-1.0, le=1.0, description="This family's floor on its judge's Cohen's kappa (default: calibration's)."
    )


class CaseSpec(_Strict):
    id: str = Field(..., min_length=1)
    family: str = Field(..., min_length=1)
    prompt: str = Field(..., min_length=1)
    tags: list[str] = Field(default_factory=list)
    preferred: list[str] | None = None
    acceptable: list[str] | None = None
    forbidden: list[str] | None = None


class CapabilityText(_Strict):
    id: str = Field(..., min_length=1)
    text: str = Field(..., min_length=1, description="The text whose log-likelihood is measured.")
    prompt: str | None = Field(
        None, description="Optional user prompt: then only ``text`` is scored, as the response to this prompt."
    )


class CapabilitySpec(_Strict):
    max_tokens: int = Field(256, ge=2, description="Texts are truncated to this many policy tokens.")
    texts: list[CapabilityText] = Field(..., min_length=2)


class CalibrationItemSpec(_Strict):
    """One human-labelled response: what the family's judge should have said."""

    id: str | None = Field(None, min_length=1)
    family: str = Field(..., min_length=1)
    prompt: str = ""
    response: str = Field(..., min_length=1)
    label: str = Field(..., min_length=1, description="The behaviour a person saw, or 'unknown' (none of them).")


class CalibrationSpec(_Strict):
    """Human labels the judges are measured against before their verdicts gate anything."""

    judge_min_kappa: float = Field(
        0.6, ge=-1.0, le=1.0, description="A family whose judge agrees less (Cohen's kappa) is not gated: exit 2."
    )
    min_items: int = Field(10, ge=2, description="Labelled responses each calibrated family needs at least.")
    require_every_family: bool = Field(True, description="Every family needs labelled responses.")
    items: list[CalibrationItemSpec] = Field(default_factory=list)
    items_from: list[str] = Field(
        default_factory=list, description="JSONL files of labelled responses (relative to the suite)."
    )


class SuiteFile(_Strict):
    format: Literal["preftune.suite"]
    format_version: Literal[1] = 1
    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    version: int = Field(..., ge=1)
    description: str = ""
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    judges: dict[str, JudgeSpec] = Field(..., min_length=1)
    families: dict[str, FamilySpec] = Field(..., min_length=1)
    cases: list[CaseSpec] = Field(default_factory=list)
    cases_from: list[str] = Field(default_factory=list)
    capability: CapabilitySpec | None = None
    thresholds: dict[str, dict[str, Threshold]] = Field(
        default_factory=dict, description="Thresholds on the pooled figures ('all') and the capability set."
    )
    calibration: CalibrationSpec | None = None
