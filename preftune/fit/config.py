"""The parts of the ``fit`` section that check-fit owns beyond the agreement thresholds:
``fit.quality`` (data-quality figures and their warnings/gates) and ``fit.audit`` (the agreement
audit of single-rated data).

Imported by the run config, so it stays light (pydantic only).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from preftune.configbase import Section


class QualitySection(Section):
    """Data-quality figures that need no second rating (length bias, trivial baselines, leakage, label noise)."""

    enabled: bool = Field(True, description="Compute the data-quality figures in check-fit's report and MLflow.")
    max_pairs: int = Field(
        20000,
        ge=100,
        description="Pairs the figures are computed on; larger datasets use a seeded sample of this many "
        "(train and held-out sampled in proportion).",
    )
    near_duplicate_similarity: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="Two prompts whose character 3-5-gram TF-IDF vectors have at least this cosine similarity "
        "count as near-duplicates (leakage when one is in train and the other held out).",
    )
    noise_folds: int = Field(
        5,
        ge=2,
        le=20,
        description="Folds (by prompt) of the cross-fitted bag-of-words model of the label-noise estimate.",
    )
    noise_confidence: float = Field(
        0.8,
        ge=0.5,
        lt=1.0,
        description="The cross-fitted model 'confidently contradicts' a label when it gives the rejected answer at "
        "least this probability of being the better one.",
    )
    max_length_rule_accuracy: float | None = Field(
        0.7,
        ge=0.0,
        le=1.0,
        description="Breach when a length-only rule's held-out accuracy is above this (the labels may mostly reward "
        "length). Empty: no check.",
    )
    max_leakage: float | None = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Breach when more than this share of held-out prompts has an exact or near duplicate among the "
        "training prompts. Empty: no check.",
    )
    max_identical_share: float | None = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="Breach when more than this share of pairs has the same chosen and rejected text (whitespace "
        "and case ignored). Empty: no check.",
    )
    max_label_noise: float | None = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="Breach when the cross-fitted model confidently contradicts more than this share of held-out "
        "labels. Empty: no check.",
    )
    on_breach: Literal["warn", "stop"] = Field(
        "warn",
        description="A breached check: 'warn' (listed in the report and tagged) or 'stop' (check-fit exits 10 with "
        "the report written).",
    )


class AuditSection(Section):
    """The agreement audit of single-rated data: a stratified sample re-rated by K raters in the feedback service."""

    export: str | None = Field(
        None,
        description="A feedback-service export (preftune.judgement v1, local or s3://) holding the audit's "
        "judgements; check-fit measures agreement from it (what `preftune check-fit --audit` sets).",
    )
    per_family: int = Field(50, ge=2, description="Pairs sampled per behaviour family for the audit.")
    raters: int = Field(3, ge=2, le=20, description="Distinct raters who re-rate each audited pair (K).")
