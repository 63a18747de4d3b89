"""promote as a pipeline step: register the candidate and move the champion alias, or reject it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.pipeline.parameters import load
from preftune.pipeline.records import StepResult, step_run

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import RunConfig


@dataclass(kw_only=True)
class PromoteStepResult(StepResult):
    """Whether the candidate was promoted, as which registry version, and why not when it was rejected."""

    promoted: bool
    version: str | None = None
    previous: str | None = None
    first_promotion: bool = False
    registered_model: str | None = None
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    eval_run_id: str = ""
    input_dataset_hash: str = ""


def promote(
    config: Mapping[str, Any] | RunConfig,
    policy: str,
    eval_run_id: str,
    *,
    dataset_hash: str,
    reward_model: str | None = None,
    started_at: float | None = None,
) -> PromoteStepResult:
    """promote: register the candidate and move the champion alias; ``promoted`` is False when rejected."""
    from preftune import registry
    from preftune.evaluate.promote import promote as _promote

    cfg = load(config)
    with step_run("promote", cfg, None, started_at) as run:
        rm_version = None
        if reward_model and Path(reward_model).is_dir():
            rm_version = "sha256:" + registry.folder_hash(reward_model)
        res = _promote(
            cfg, policy, eval_run_id=eval_run_id, dataset_hash=dataset_hash or None, reward_model_version=rm_version
        )
        if res.promoted:
            report = (
                f"# promote\n\nPromoted: `{res.registered_model}` version {res.version} is now "
                f"`{cfg.promotion.champion_alias}`"
                + (f" (replacing version {res.previous})" if res.previous else "")
                + ".\n"
            )
        else:
            report = "# promote\n\nRejected, nothing registered, champion unchanged:\n\n" + "".join(
                f"- {r}\n" for r in res.reasons
            )
        result = run.finish(
            PromoteStepResult(
                status="ok" if res.promoted else "stopped",
                promoted=res.promoted,
                version=res.version,
                previous=res.previous,
                first_promotion=res.first_promotion,
                registered_model=res.registered_model,
                reasons=res.reasons,
                notes=res.notes,
                eval_run_id=eval_run_id,
                input_dataset_hash=dataset_hash,
                mlflow_run_id=res.run_id,
                report_md=report,
            )
        )
    return result
