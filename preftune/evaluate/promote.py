"""The promote step: register a candidate only if every gate passed, then move the champion alias.

1. The tracking server must answer (``UnreachableError`` before anything is written).
2. The evaluation is read (from its MLflow run, or run now) and must be of *this* candidate
   (its content hash is compared).
3. A failed gate registers nothing: the promote run and the evaluate run are tagged
   ``preftune.promotion.status=rejected`` with the reasons, and the CLI exits 13.
4. Otherwise the policy is logged as an MLflow model, and under the promotion lock
   (:class:`~preftune.registry.PromotionLock`) the champion is re-read. If it changed
   since the evaluation (another promotion or a rollback finished meanwhile), the candidate is
   re-checked against the new champion from both evaluations' stored samples; only then is the
   version created (with its audit tags, atomically), ``previous-champion`` moved to the old
   champion and ``champion`` to the new version, and the aliases read back.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune import registry
from preftune.config import RunConfig
from preftune.errors import ExitCode, InputError, PreftuneError
from preftune.registry import (
    GATE_TAG_PREFIX,
    RUN_TAG_PROMOTION,
    RUN_TAG_PROMOTION_REASONS,
    RUN_TAG_REGISTERED_VERSION,
)

log = logging.getLogger(__name__)

STEP = "promote"


@dataclass
class PromoteResult:
    promoted: bool
    version: str | None
    previous: str | None
    first_promotion: bool
    reasons: list[str]
    run_id: str
    eval_run_id: str
    rechecked_against: str | None = None
    registered_model: str = ""
    notes: list[str] = field(default_factory=list)
    model_id: str | None = None  # the LoggedModel registered (ppo's own for a ppo candidate)

    def raise_for_status(self) -> None:
        """Raise the gate failure (exit code 13) when the candidate was rejected."""
        if not self.promoted:
            shown = "; ".join(self.reasons[:10]) + (
                f" (and {len(self.reasons) - 10} more)" if len(self.reasons) > 10 else ""
            )
            raise PreftuneError(
                f"candidate rejected, nothing registered, champion unchanged: {shown}", ExitCode.GATE_FAILED
            )


def _reward_model_info(cfg: RunConfig, results: dict[str, Any]) -> tuple[str | None, str | None]:
    """(dataset hash, reward model version) read from the reward model the evaluation used, if any."""
    path = results.get("reward_model") or cfg.evaluation.reward_model
    if not path or not Path(path).is_dir():
        return None, None
    dataset_hash = None
    try:
        from preftune.scoring.metadata import read_metadata

        dataset_hash = read_metadata(path).dataset_hash
    except PreftuneError:
        pass
    return dataset_hash, "sha256:" + registry.folder_hash(path)


def _gate_tags(results: dict[str, Any]) -> dict[str, str]:
    out = {}
    for g in results.get("gates", []):
        verdict = "n/a" if g.get("passed") is None else ("pass" if g["passed"] else "fail")
        out[GATE_TAG_PREFIX + g["name"]] = verdict
    return out


def _gate_summary(results: dict[str, Any], recheck: list[Any] | None) -> str:
    items = [
        {
            "gate": g["name"],
            "verdict": "n/a" if g.get("passed") is None else ("pass" if g["passed"] else "fail"),
            "judged": g.get("judged"),
            "limit": g.get("limit"),
        }
        for g in results.get("gates", [])
    ]
    for g in recheck or []:
        items.append({"gate": "recheck." + g.name, "verdict": g.tag_value, "judged": g.judged, "limit": g.limit})
    return json.dumps(items, separators=(",", ":"))


def _identical_champion(client: Any, name: str, alias: str, cand_hash: str) -> str | None:
    """The champion's version when it holds exactly the candidate's files (same content hash), else None."""
    version = registry.alias_version(client, name, alias)
    if version is None:
        return None
    tags = client.get_model_version(name, version).tags or {}
    return version if tags.get(registry.TAG_MODEL_HASH) == cand_hash else None


def _identical_reason(version: str, cand_hash: str) -> str:
    return (
        f"the candidate is identical to the champion, version {version} (content hash {cand_hash[:19]}...): "
        "nothing new to register"
    )


def promote(
    cfg: RunConfig,
    candidate: str,
    *,
    eval_run_id: str | None = None,
    eval_result: Any = None,
    dataset_hash: str | None = None,
    reward_model_version: str | None = None,
    user: str | None = None,
) -> PromoteResult:
    """Register ``candidate`` if its evaluation passed; see the module docstring for the protocol."""
    import mlflow

    from preftune import tracking
    from preftune.evaluate.step import load_eval_artifacts, recheck_against
    from preftune.policy_model import TAG_MODEL_HASH, find_logged_model, log_policy_model

    uri = tracking.resolve_tracking_uri(cfg.tracking)
    tracking.configure(cfg)  # unreachable registry: fail here, before anything is registered
    client = registry.mlflow_client(uri)
    name = cfg.models.registered_model
    alias, prev_alias = cfg.promotion.champion_alias, cfg.promotion.previous_alias
    user = user or registry.current_user()

    if eval_result is None and eval_run_id is None:
        from preftune.evaluate.step import evaluate

        eval_result = evaluate(cfg, candidate)

    with registry.temp_workdir("promote-") as tmp_name:
        tmp = Path(tmp_name)
        if eval_result is not None:
            results, records, capability = eval_result.results, eval_result.records, eval_result.capability
            eval_run_id = eval_result.run_id
        else:
            results, records, capability = load_eval_artifacts(client, str(eval_run_id), tmp, uri)
        cand = registry.resolve_model(candidate, client, tmp, world=cfg.world)
        cand_hash = registry.folder_hash(cand.path)
        if cand_hash != results["candidate"]["model_hash"]:
            raise InputError(
                f"{candidate}: this is not the model evaluate run {eval_run_id} judged (content hash {cand_hash}, "
                f"evaluated {results['candidate']['model_hash']}); evaluate this candidate first"
            )
        rm_dataset, rm_version = _reward_model_info(cfg, results)
        dataset_hash = dataset_hash or rm_dataset or "unknown"
        reward_model_version = reward_model_version or rm_version or "none"
        first = results.get("champion") is None
        outcome = PromoteResult(False, None, None, first, [], "", str(eval_run_id), registered_model=name)

        tags = {"preftune.eval_run_id": str(eval_run_id), "preftune.promote.user": user}
        with tracking.start_step_run(STEP, cfg, params={"promote.candidate": candidate[:500]}, tags=tags) as run:
            outcome.run_id = run.info.run_id
            identical = _identical_champion(client, name, alias, cand_hash)
            if not results["passed"]:
                outcome.reasons = list(results.get("reasons") or ["the evaluation did not pass"])
            elif identical is not None:
                outcome.reasons = [_identical_reason(identical, cand_hash)]
            else:
                base = None
                if cfg.promotion.package_adapter_base:
                    from preftune.generation.policy import policy_layout

                    layout = policy_layout(cand.path, cfg.world)
                    base = layout.base if layout.adapter is not None else None
                # The LoggedModel ppo logged for this very folder (found by content hash) is registered
                # as it is: one model per candidate in the UI. A candidate not from ppo is logged here.
                experiment_id = mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id
                info = find_logged_model(cand_hash, experiment_id)
                if info is None:
                    info = log_policy_model(
                        cand.path, cfg.promotion.model_name, base=base, tags={TAG_MODEL_HASH: cand_hash}
                    )
                outcome.model_id = info.model_id
                evaluated_against = None
                champ = results.get("champion") or {}
                if champ.get("registered_model") == name and champ.get("version"):
                    evaluated_against = str(champ["version"])

                lock = registry.PromotionLock(
                    client,
                    name,
                    lease_s=cfg.promotion.lock_lease_s,
                    timeout_s=cfg.promotion.lock_timeout_s,
                    purpose=f"promote eval run {eval_run_id} by {user}",
                )
                with lock.hold():
                    current = registry.alias_version(client, name, alias)
                    recheck_gates = None
                    ok = True
                    if current is not None and _identical_champion(client, name, alias, cand_hash) is not None:
                        ok = False  # the champion moved meanwhile to this very model: nothing to register
                        outcome.reasons = [_identical_reason(current, cand_hash)]
                    elif current is not None and current != evaluated_against:
                        outcome.rechecked_against = current
                        ok, reasons, recheck_gates = _recheck(
                            cfg, client, uri, tmp, name, current, results, records, capability, recheck_against
                        )
                        if not ok:
                            outcome.reasons = reasons
                    if ok:
                        if registry.get_registered_model(client, name) is None:
                            from mlflow.exceptions import MlflowException

                            try:
                                client.create_registered_model(
                                    name, description="Policies promoted by preftune: every version passed its gates."
                                )
                            except MlflowException as err:
                                if registry._error_code(err) != "RESOURCE_ALREADY_EXISTS":
                                    raise
                        version_tags = {
                            registry.TAG_DATASET_HASH: dataset_hash,
                            registry.TAG_REWARD_MODEL_VERSION: reward_model_version,
                            registry.TAG_EVAL_RUN_ID: str(eval_run_id),
                            registry.TAG_PROMOTE_RUN_ID: run.info.run_id,
                            registry.TAG_GATES: "passed",
                            registry.TAG_GATE_RESULTS: _gate_summary(results, recheck_gates),
                            registry.TAG_GATES_FAILED: "0",
                            registry.TAG_SUITE: results["suite"]["id"],
                            registry.TAG_SUITE_HASH: results["suite"]["sha256"],
                            registry.TAG_CONFIG_HASH: cfg.config_hash(),
                            registry.TAG_GIT_SHA: tracking.git_sha(),
                            registry.TAG_PIPELINE_RUN_ID: tracking.pipeline_run_id(),
                            registry.TAG_MODEL_HASH: cand_hash,
                            registry.TAG_CANDIDATE: candidate[:5000],
                            registry.TAG_REPLACED: current or "none",
                            registry.TAG_FIRST_PROMOTION: "true" if current is None else "false",
                            registry.TAG_PROMOTED_BY: user,
                            **_gate_tags(results),
                            # check-fit's fit status (preftune.fit=unaudited and its reason, ...): this run
                            # copied it from the pipeline's run; a standalone promote reads the evaluate run's
                            **tracking.inherited_tags(run.info.run_id, str(eval_run_id)),
                        }
                        if outcome.rechecked_against:
                            version_tags[registry.TAG_RECHECKED] = outcome.rechecked_against
                        n_gates = sum(1 for g in results.get("gates", []) if g.get("passed") is not None)
                        lock.verify()
                        mv = client.create_model_version(
                            name,
                            source=info.model_uri,
                            run_id=run.info.run_id,
                            tags=version_tags,
                            description=f"Promoted by preftune: all {n_gates} gates passed on suite "
                            f"{results['suite']['id']} (evaluate run {eval_run_id}).",
                            model_id=info.model_id,
                        )
                        lock.verify()
                        if current is not None:
                            client.set_registered_model_alias(name, prev_alias, current)
                        client.set_registered_model_alias(name, alias, str(mv.version))
                        after = registry.alias_version(client, name, alias)
                        if after != str(mv.version):  # pragma: no cover - a writer bypassed the lock
                            raise PreftuneError(
                                f"{alias} of {name!r} reads v{after} right after moving it to v{mv.version}: "
                                "something moved it without the promotion lock"
                            )
                        outcome.promoted, outcome.version, outcome.previous = True, str(mv.version), current
                        outcome.first_promotion = current is None
            status = "promoted" if outcome.promoted else "rejected"
            if outcome.promoted and outcome.first_promotion:
                outcome.notes.append("no champion yet: promoted on the absolute gates alone")
            if outcome.rechecked_against:
                outcome.notes.append(
                    f"the champion changed to v{outcome.rechecked_against} during evaluation; re-checked against it"
                )
            run_tags = {RUN_TAG_PROMOTION: status}
            if outcome.reasons:
                run_tags[RUN_TAG_PROMOTION_REASONS] = "; ".join(outcome.reasons)[:7900]
            if outcome.version:
                run_tags[RUN_TAG_REGISTERED_VERSION] = outcome.version
            mlflow.set_tags(run_tags)
            mlflow.log_metric("promote.promoted", 1.0 if outcome.promoted else 0.0)
            for k, v in run_tags.items():  # the evaluate run shows the outcome too
                client.set_tag(str(eval_run_id), k, v)
    return outcome


def _recheck(
    cfg: RunConfig,
    client: Any,
    uri: str,
    tmp: Path,
    name: str,
    current: str,
    results: dict[str, Any],
    records: list[Any],
    capability: dict[str, dict[str, float]],
    recheck_against: Any,
) -> tuple[bool, list[str], list[Any] | None]:
    """Compare our candidate with the champion that appeared meanwhile, from stored samples."""
    from preftune.evaluate.step import load_eval_artifacts

    mv = client.get_model_version(name, current)
    tags = dict(mv.tags or {})
    their_run = tags.get(registry.TAG_EVAL_RUN_ID)
    if not their_run or tags.get(registry.TAG_SUITE_HASH) != results["suite"]["sha256"]:
        return (
            False,
            [
                f"the champion changed to v{current} during this evaluation and v{current} was not evaluated on the "
                f"same suite ({tags.get(registry.TAG_SUITE, 'unknown')} vs {results['suite']['id']}); re-run "
                "evaluate against the new champion"
            ],
            None,
        )
    theirs = load_eval_artifacts(client, their_run, tmp, uri)
    ok, reasons, gates = recheck_against(
        cfg, results["families"], (results, records, capability), theirs, champion_label=f"{name} v{current}"
    )
    if not ok:
        reasons = [
            f"the champion changed to v{current} during this evaluation and the candidate regresses against it: {r}"
            for r in reasons
        ]
    return ok, reasons, gates
