"""The ``observe`` section of the run config: where production conversations come from, how a
window is sampled and judged, and when it raises drift or regression."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from preftune.configbase import Section


class ObserveSourceSection(Section):
    """Where the serving application's conversations are read from."""

    kind: Literal["logs", "mlflow"] = Field(
        "logs",
        description="'logs': JSONL/Parquet files in OpenAI chat format under 'path' (local or s3://), read from a "
        "stored watermark so each record is judged once; 'mlflow': the traces of the serving application in the "
        "MLflow experiment 'experiment' (mlflow.search_traces over the window).",
    )
    path: str | None = Field(
        None, description="For 'logs': a file, folder or s3:// prefix of JSONL/Parquet (optionally .gz/.zst) logs."
    )
    experiment: str | None = Field(None, description="For 'mlflow': the serving application's MLflow experiment name.")
    model_version_field: str = Field(
        "model_version",
        min_length=1,
        description="The record field (logs) or trace tag (mlflow) that names the serving registry version.",
    )
    family_field: str = Field(
        "family", min_length=1, description="A record field or trace tag that names the behaviour family, if any."
    )


class ObserveSection(Section):
    """Continuous observation of the champion's behaviour in production (``preftune observe``)."""

    source: ObserveSourceSection = Field(default_factory=ObserveSourceSection)
    window_hours: float = Field(24.0, gt=0, le=24 * 31, description="Length of one observation window (mlflow).")
    max_records: int = Field(
        2000, ge=10, description="Records judged per window at most (a seeded uniform sample of the window)."
    )
    min_records: int = Field(
        30, ge=1, description="Fewer records than this in a family: its figures are reported, its tests are not run."
    )
    pii_fields: list[str] = Field(
        default_factory=lambda: ["user", "user_id", "email", "phone", "ip", "ip_address", "name", "metadata.user"],
        description="Record fields (dotted paths into nested objects) dropped before anything is stored or judged.",
    )
    drift_alpha: float = Field(
        0.01,
        gt=0,
        lt=0.5,
        description="Family-wise false-alarm rate of the drift test per window and baseline: each family's "
        "chi-square test of homogeneity runs at drift_alpha / number of families tested (Bonferroni).",
    )
    min_shift: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Smallest total variation distance between behaviour mixes that counts as drift (a large "
        "window makes tiny, harmless shifts significant).",
    )
    recent_windows: int = Field(
        7, ge=1, le=365, description="Earlier windows pooled as the 'recent' baseline of the drift test."
    )
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Level of the shares' Wilson intervals.")
    new_prompt_similarity: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="A production prompt whose cosine similarity to every suite prompt is below this is a "
        "'new prompt type' (and gets no family from the suite).",
    )
    encoder: str | None = Field(
        None,
        description="Sentence-encoder folder for prompt similarity (e.g. the all-MiniLM-L6-v2 folder). Empty: "
        "hashed word and character n-gram vectors (no model).",
    )
    state: str | None = Field(
        None,
        description="Where observe keeps its watermark and window history (a folder or s3:// prefix). Empty: "
        "<storage root>/observe/<registered model>.",
    )
    pushgateway: str | None = Field(
        None, description="Prometheus Pushgateway URL to push the window's metrics to (empty: do not push)."
    )
    on_regression: Literal["report", "rollback"] = Field(
        "report",
        description="When a forbidden share breaks its gate in production: report it (exit 21), or also move "
        "@champion back to @previous-champion through the promotion lock.",
    )
    hard_cases_max: int = Field(
        200, ge=0, description="Offending prompts written as hard cases (and sent to the service) per window at most."
    )
    hard_cases_heldout: float = Field(
        0.25,
        ge=0.0,
        lt=1.0,
        description="Share of the hard cases marked 'split: heldout' (by a stable hash of the prompt, so a prompt "
        "keeps its side in every window): training (data.extra_prompts) and the raters (--to-service) skip them, "
        "and evaluation.observed_cases judges the next candidate on them against the champion. 0: none held out.",
    )
