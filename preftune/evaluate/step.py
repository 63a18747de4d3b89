"""The evaluate step: a candidate and the champion on one behaviour suite, gates, and a report.

Order of work, so that mistakes cost nothing: the suite and the gate config are validated
first (``ConfigError``), then the tracking server is checked (``UnreachableError``), then the
models and judges are loaded (wrong paths, classifier labels that do not match the suite),
and only then does generation start. Results go to an output folder (published atomically)
and to one MLflow run with stable metric names (``docs/suites.md`` lists them).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune import registry
from preftune.behaviour.suite import Suite, load_suite, thresholds_for
from preftune.common.timestamps import utc_now
from preftune.config import RunConfig
from preftune.evaluate.gates import GateResult, absolute_gates, config_thresholds, non_regression_gates, verdict
from preftune.evaluate.metrics import (
    CANDIDATE,
    CAPABILITY,
    CHAMPION,
    CORRECTED,
    CORRECTED_CHAMPION,
    Estimate,
    SampleRecord,
    behaviour_shares,
    capability_metrics,
    compute_metrics,
    corrected_shares,
    metrics_to_json,
)
from preftune.evaluate.observed import (
    load_observed_cases,
    observed_gates,
    observed_metrics,
    observed_suite,
    relabel,
)
from preftune.evaluate.sampling import (  # noqa: F401 (torch_threads: public here too)
    Models,
    sample_and_judge,
    torch_threads,
)
from preftune.evaluate.stored import (  # noqa: F401 (re-exported: promote reads evaluations through step)
    ARTIFACT_DIR,
    CAPABILITY_FILE,
    RESULTS_FILE,
    RESULTS_FORMAT,
    SAMPLES_FILE,
    STEP,
    load_eval_artifacts,
    read_eval_folder,
    recheck_against,
)

log = logging.getLogger(__name__)

REPORT_MD = "report.md"
OBSERVED_SAMPLES_FILE = "observed_samples.jsonl"  # the observed hard cases' samples (evaluation.observed_cases)
REPORT_HTML = "report.html"

RUN_TAG_SUITE = "preftune.eval.suite"
RUN_TAG_SUITE_HASH = "preftune.eval.suite_hash"
RUN_TAG_CANDIDATE = registry.RUN_TAG_EVAL_CANDIDATE
RUN_TAG_CANDIDATE_HASH = "preftune.eval.candidate_hash"
RUN_TAG_CHAMPION = "preftune.eval.champion"
RUN_TAG_CHAMPION_VERSION = "preftune.eval.champion_version"
RUN_TAG_FIRST = "preftune.eval.first_promotion"


@dataclass
class EvalResult:
    """What evaluate returns (and writes to ``results.json``)."""

    passed: bool
    reasons: list[str]
    gates: list[GateResult]
    metrics: dict[str, dict[str, dict[str, Estimate]]]
    results: dict[str, Any]
    run_id: str
    output: str
    records: list[SampleRecord] = field(default_factory=list)
    capability: dict[str, dict[str, float]] = field(default_factory=dict)
    observed_records: list[SampleRecord] = field(default_factory=list)  # evaluation.observed_cases, relabelled

    @property
    def first_promotion(self) -> bool:
        return bool(self.results.get("first_promotion"))

    @property
    def champion_version(self) -> str | None:
        champ = self.results.get("champion") or {}
        return champ.get("version")


def metric_names(metrics: Mapping[str, Mapping[str, Mapping[str, Estimate]]]) -> dict[str, float]:
    """Flatten metrics into the stable MLflow names (docs/suites.md, "Metric names")."""
    out: dict[str, float] = {}
    for family, fam in metrics.items():
        for metric, entry in fam.items():
            for who, est in entry.items():
                base = f"eval.{family}.{metric}" + ("" if who == CANDIDATE else f".{who}")
                for suffix, value in (("", est.value), (".ci_low", est.ci_low), (".ci_high", est.ci_high)):
                    if value is not None and math.isfinite(value):
                        out[base + suffix] = float(value)
    return out


def _examples(records: Sequence[SampleRecord], per_family: int = 3) -> dict[str, list[dict[str, str]]]:
    """A few responses per family and model for the report (first sample of the first cases)."""
    out: dict[str, list[dict[str, str]]] = defaultdict(list)
    seen: dict[tuple[str, str], int] = defaultdict(int)
    for r in records:
        if r.sample != 0 or seen[(r.family, r.model)] >= per_family:
            continue
        seen[(r.family, r.model)] += 1
        out[r.family].append({"model": r.model, "case_id": r.case_id, "behaviour": r.behaviour, "text": r.text})
    return dict(out)


def compute_gates(
    cfg: RunConfig,
    suite: Suite,
    metrics: Mapping[str, Mapping[str, Mapping[str, Estimate]]],
    *,
    has_champion: bool,
    champion_label: str,
) -> list[GateResult]:
    """Absolute gates (suite thresholds, then config) and, with a champion, non-regression gates."""
    gates_cfg = cfg.evaluation.gates
    thresholds = thresholds_for(suite, gates_cfg)
    for family, extra in config_thresholds(gates_cfg, has_champion).items():
        for metric, t in extra.items():
            thresholds.setdefault(family, {}).setdefault(metric, t)
    out = absolute_gates(metrics, thresholds, decision=gates_cfg.decision, confidence=cfg.evaluation.confidence)
    if has_champion:
        out += non_regression_gates(
            metrics,
            list(suite.families),
            gates_cfg,
            confidence=cfg.evaluation.confidence,
            champion_label=champion_label,
        )
    return out


def _write_output(
    folder: Path,
    results: dict[str, Any],
    records: Sequence[SampleRecord],
    capability: Mapping[str, Mapping[str, float]],
    gates: Sequence[GateResult],
    metrics: Mapping[str, Any],
    tolerances: Mapping[str, float],
) -> None:
    from preftune.evaluate import report
    from preftune.plots import behaviour_shares_png

    folder.mkdir(parents=True, exist_ok=True)
    plots_dir = folder / "plots"
    families = list(results["families"])
    labels = {CANDIDATE: "candidate", CHAMPION: "champion"}
    plots = {
        "families": report.plot_family_metrics(metrics, families, plots_dir / "families.png", labels),
        "deltas": report.plot_deltas(metrics, families, tolerances, plots_dir / "deltas.png")
        if results.get("champion")
        else None,
        "shares": behaviour_shares_png(
            {k: v for k, v in results["behaviour_shares"].items() if v},
            plots_dir / "behaviour_shares.png",
            title=f"Behaviour shares on {results['suite']['id']}",
            preferred={
                f: (roles["preferred"][0] if len(roles["preferred"]) == 1 else None)
                for f, roles in results.get("family_roles", {}).items()
            },
        ),
    }
    examples = _examples(records)
    (folder / RESULTS_FILE).write_text(json.dumps(results, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    with open(folder / SAMPLES_FILE, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
    with open(folder / CAPABILITY_FILE, "w", encoding="utf-8") as fh:
        for model, values in capability.items():
            for text_id, value in values.items():
                fh.write(json.dumps({"model": model, "id": text_id, "loglik_per_token": value}) + "\n")
    (folder / REPORT_MD).write_text(report.render_markdown(results, gates, metrics, examples), encoding="utf-8")
    (folder / REPORT_HTML).write_text(report.render_html(results, gates, metrics, examples, plots), encoding="utf-8")


def _publish(local: Path, output: str, cfg: RunConfig) -> str:
    """Publish the report folder atomically (a local folder or an s3:// prefix)."""
    from preftune.storage import Storage

    return Storage.from_config(cfg.storage).put_dir(local, output)


def _resolve_models(cfg: RunConfig, client: Any, tmp: Path, candidate: str, champion_ref: str) -> Models:
    """The candidate, the champion (registry alias, fallback, or a reference) and the reference, as local folders."""
    ev = cfg.evaluation
    name = cfg.models.registered_model
    cand = registry.resolve_model(candidate, client, tmp, world=cfg.world)
    champ: registry.ResolvedModel | None = None
    if champion_ref == "registry":
        version = registry.alias_version(client, name, cfg.promotion.champion_alias)
        if version is not None:
            champ = registry.resolve_model(f"models:/{name}/{version}", client, tmp)
        elif ev.champion_fallback == "reference":  # no champion yet: measure the change against the reference
            champ = registry.resolve_model(ev.reference or cfg.models.policy, client, tmp, world=cfg.world)
    elif champion_ref != "none":
        champ = registry.resolve_model(champion_ref, client, tmp, world=cfg.world)
    reference = registry.resolve_model(ev.reference or cfg.models.policy, client, tmp, world=cfg.world)
    return Models(cand, champ, reference)


def _run_tags_and_params(
    suite: Suite, candidate: str, cand_hash: str, champ: registry.ResolvedModel | None
) -> tuple[dict[str, str], dict[str, Any]]:
    tags = {
        RUN_TAG_SUITE: suite.id,
        RUN_TAG_SUITE_HASH: suite.sha256,
        RUN_TAG_CANDIDATE: candidate[:5000],
        RUN_TAG_CANDIDATE_HASH: cand_hash,
        RUN_TAG_CHAMPION: champ.label if champ else "none",
        RUN_TAG_FIRST: "true" if champ is None else "false",
    }
    if champ is not None and champ.version is not None:
        tags[RUN_TAG_CHAMPION_VERSION] = champ.version
    params = {
        "eval.suite": suite.id,
        "eval.candidate": candidate[:500],
        "eval.champion": (champ.label if champ else "none")[:500],
        "eval.samples_per_prompt": suite.generation.samples_per_prompt,
        "eval.cases": len(suite.cases),
    }
    return tags, params


def run_calibration(suite: Suite, judges: Mapping[str, Any], cfg: RunConfig) -> Any:
    """Score every judge on the suite's labelled responses (None without a calibration section)."""
    from preftune.behaviour.calibration import calibrate

    ev = cfg.evaluation
    return calibrate(
        suite, judges, confidence=ev.confidence, n_resamples=ev.bootstrap_resamples, seed=suite.generation.seed
    )


def log_calibration(report: Any) -> None:
    """Calibration figures on the active MLflow run: metrics and two tables (judges, confusion cells)."""
    import mlflow

    if report is None:
        return
    mlflow.log_metrics(report.metrics())
    summary, cells = report.tables()
    mlflow.log_table(summary, artifact_file="calibration/judges.json")
    mlflow.log_table(cells, artifact_file="calibration/confusion.json")


def _all_metrics(
    records: Sequence[SampleRecord],
    capability: Mapping[str, Mapping[str, float]],
    suite: Suite,
    cfg: RunConfig,
    calibration: Any,
    with_reward: bool,
) -> dict[str, dict[str, dict[str, Estimate]]]:
    """Per-family figures, capability figures, and shares corrected for each calibrated judge's confusion."""
    ev = cfg.evaluation
    seed = suite.generation.seed
    metrics = compute_metrics(
        records,
        list(suite.families),
        confidence=ev.confidence,
        n_resamples=ev.bootstrap_resamples,
        seed=seed,
        with_reward=with_reward,
    )
    if suite.capability:
        metrics[CAPABILITY] = capability_metrics(
            capability[CANDIDATE],
            capability.get("reference"),
            capability.get(CHAMPION),
            confidence=ev.confidence,
            n_resamples=ev.bootstrap_resamples,
            seed=seed,
        )
    if calibration is not None:
        roles = {
            c.id: {
                "preferred": c.preferred,
                "acceptable": c.preferred | c.acceptable,
                "forbidden": c.forbidden,
                "needless_refusal": c.needless_refusal,
            }
            for c in suite.cases
        }
        for family, (human, judged) in calibration.pairs().items():
            for model, key in ((CANDIDATE, CORRECTED), (CHAMPION, CORRECTED_CHAMPION)):
                fixed = corrected_shares(
                    records,
                    family,
                    model,
                    roles,
                    human,
                    judged,
                    confidence=ev.confidence,
                    n_resamples=ev.bootstrap_resamples,
                    seed=seed,
                )
                for metric, est in fixed.items():
                    if metric in metrics.get(family, {}):
                        metrics[family][metric][key] = est
    return metrics


def _results(
    cfg: RunConfig,
    suite: Suite,
    run_id: str,
    candidate: str,
    models: Models,
    cand_hash: str,
    reference_hash: str,
    reward_model: str | None,
    gates: Sequence[GateResult],
    metrics: Mapping[str, Any],
    records: Sequence[SampleRecord],
    calibration: Any,
    reused_from: str | None,
    t_gen: float,
) -> dict[str, Any]:
    """``results.json``: the verdict, every gate and figure, and where they came from."""
    ev = cfg.evaluation
    champ = models.champion
    passed, reasons = verdict(gates)
    return {
        "format": RESULTS_FORMAT,
        "version": 1,
        "created_at": utc_now(),
        "run_id": run_id,
        "passed": passed,
        "reasons": reasons,
        "first_promotion": champ is None,
        "decision": ev.gates.decision,
        "confidence": ev.confidence,
        "suite": {
            "id": suite.id,
            "name": suite.name,
            "version": suite.version,
            "sha256": suite.sha256,
            "source": suite.source,
            "cases": len(suite.cases),
            "samples_per_prompt": suite.generation.samples_per_prompt,
            "seed": suite.generation.seed,
        },
        "families": list(suite.families),
        "family_roles": {
            name: {
                "judge": fam.judge,
                "preferred": sorted(fam.preferred),
                "acceptable": sorted(fam.acceptable),
                "forbidden": sorted(fam.forbidden),
                "needless_refusal": sorted(fam.needless_refusal),
            }
            for name, fam in suite.families.items()
        },
        "candidate": {"ref": candidate, "label": models.candidate.label, "model_hash": cand_hash},
        "champion": (
            {
                "ref": champ.ref,
                "label": champ.label,
                "version": champ.version,
                "registered_model": champ.registered_name,
                "model_hash": registry.folder_hash(champ.path),
                "samples_from_eval_run": reused_from,
            }
            if champ
            else None
        ),
        "reference": models.reference.ref,
        "reference_hash": reference_hash,
        "reward_model": reward_model,
        "calibration": calibration.to_json() if calibration is not None else None,
        "gates": [g.to_dict() for g in gates],
        "metrics": metrics_to_json(metrics),
        "behaviour_shares": {
            CANDIDATE: behaviour_shares(records, CANDIDATE),
            CHAMPION: behaviour_shares(records, CHAMPION) if champ else None,
        },
        "seconds": {"generation_and_scoring": round(t_gen, 3)},
    }


def evaluate(
    cfg: RunConfig,
    candidate: str,
    *,
    champion: str | None = None,
    suite: str | None = None,
    output: str | None = None,
    reward_model: str | None = None,
    progress: bool | None = None,
) -> EvalResult:
    """Evaluate ``candidate`` (and the champion) on the suite; gates, report, MLflow run.

    ``champion``, ``suite``, ``output`` and ``reward_model`` override ``cfg.evaluation``.
    Never raises for a failed gate: the verdict is in the result (the CLI turns it into exit 13).
    A judge that fails its calibration (kappa below the floor) raises ConfigError (exit 2) before
    any generation, after logging its figures to the run.
    """
    from preftune import tracking
    from preftune.behaviour.calibration import CALIBRATION_FILE, require_calibrated
    from preftune.behaviour.judges import load_judges
    from preftune.common.device import select_device

    ev = cfg.evaluation
    reward_model = reward_model or ev.reward_model
    the_suite = load_suite(suite or ev.suite, reward_model=reward_model, world=cfg.world)
    thresholds_for(the_suite, ev.gates)  # config thresholds naming unknown families fail here
    observed = _observed_cases(cfg, the_suite)  # a bad observed-case file fails here, before any generation
    t0 = time.perf_counter()

    uri = tracking.resolve_tracking_uri(cfg.tracking)
    tracking.configure(cfg)  # unreachable tracking server: fail before loading or generating anything
    client = registry.mlflow_client(uri)

    with registry.temp_workdir("evaluate-") as tmp_name:
        tmp = Path(tmp_name)
        models = _resolve_models(cfg, client, tmp, candidate, champion or ev.champion)
        champ = models.champion
        device = select_device(ev.device, setting="evaluation.device")
        judges = load_judges(the_suite, reward_model=reward_model, device=device)
        scorer = None
        if reward_model and champ is not None:
            from preftune.scoring.model import RewardScorer

            scorer = RewardScorer.load(registry.resolve_model(reward_model, client, tmp).path, device=device)

        cand_hash = registry.folder_hash(models.candidate.path)
        reference_hash = registry.folder_hash(models.reference.path)
        tags, params = _run_tags_and_params(the_suite, candidate, cand_hash, champ)
        with tracking.start_step_run(STEP, cfg, params=params, tags=tags) as run:
            run_id = run.info.run_id
            with torch_threads(ev.threads):
                calibration = run_calibration(the_suite, judges, cfg)
            log_calibration(calibration)
            require_calibrated(calibration, the_suite)  # exit 2 before any generation

            records, capability, reused_from = sample_and_judge(
                models, the_suite, judges, scorer, device, cfg, client, uri, tmp, reference_hash, progress
            )
            obs_records = _sample_observed(
                observed, models, the_suite, judges, scorer, device, cfg, client, uri, tmp, reference_hash, progress
            )
            t_gen = time.perf_counter() - t0
            metrics = _all_metrics(records, capability, the_suite, cfg, calibration, scorer is not None)
            champion_label = champ.label if champ else "champion"
            gates = compute_gates(
                cfg, the_suite, metrics, has_champion=champ is not None, champion_label=champion_label
            )
            if observed is not None:
                metrics.update(
                    observed_metrics(obs_records, observed.families, cfg, the_suite.generation.seed, scorer is not None)
                )
                if champ is not None:
                    gates += observed_gates(
                        metrics, observed.families, ev.gates, confidence=ev.confidence, champion_label=champion_label
                    )
            passed, reasons = verdict(gates)
            results = _results(
                cfg,
                the_suite,
                run_id,
                candidate,
                models,
                cand_hash,
                reference_hash,
                reward_model,
                gates,
                metrics,
                records,
                calibration,
                reused_from,
                t_gen,
            )
            if observed is not None:
                results["observed"] = {
                    **observed.to_json(),
                    "samples_per_prompt": ev.observed_samples_per_prompt or the_suite.generation.samples_per_prompt,
                    "behaviour_shares": {
                        CANDIDATE: behaviour_shares(obs_records, CANDIDATE),
                        CHAMPION: behaviour_shares(obs_records, CHAMPION) if champ else None,
                    },
                }
            staging = tmp / "report"
            _write_output(staging, results, records, capability, gates, metrics, ev.gates.non_regression)
            if observed is not None:
                with open(staging / OBSERVED_SAMPLES_FILE, "w", encoding="utf-8") as fh:
                    fh.writelines(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in obs_records)
            if calibration is not None:
                (staging / CALIBRATION_FILE).write_text(
                    json.dumps(calibration.to_json(), indent=2) + "\n", encoding="utf-8"
                )
            published = _publish(staging, output or ev.output or str(_default_output(run_id)), cfg)
            _log_run(results, metrics, gates, passed, reasons, champ is None, t0, staging, published)
            _log_views(the_suite, records, cand_hash, metrics)
    return EvalResult(passed, reasons, gates, metrics, results, run_id, published, records, capability, obs_records)


def _observed_cases(cfg: RunConfig, suite: Suite) -> Any:
    """``evaluation.observed_cases`` read (None when not set)."""
    if not cfg.evaluation.observed_cases:
        return None
    from preftune.storage import Storage

    return load_observed_cases(cfg.evaluation.observed_cases, suite, cfg, Storage.from_config(cfg.storage))


def _sample_observed(
    observed: Any,
    models: Models,
    suite: Suite,
    judges: Mapping[str, Any],
    scorer: Any,
    device: Any,
    cfg: RunConfig,
    client: Any,
    uri: str,
    tmp: Path,
    reference_hash: str,
    progress: bool | None,
) -> list[SampleRecord]:
    """Both models sampled and judged on the held-out observed hard cases (records relabelled ``observed.*``)."""
    if observed is None or not observed.cases:
        return []
    osuite = observed_suite(suite, observed.cases, cfg.evaluation.observed_samples_per_prompt)
    records, _, _ = sample_and_judge(
        models, osuite, judges, scorer, device, cfg, client, uri, tmp, reference_hash, progress, reuse=False
    )
    return relabel(records)


def _log_run(
    results: Mapping[str, Any],
    metrics: Mapping[str, Any],
    gates: Sequence[GateResult],
    passed: bool,
    reasons: Sequence[str],
    first: bool,
    t0: float,
    staging: Path,
    published: str,
) -> None:
    """Metrics (stable names), the report folder as artifacts, and the verdict tags."""
    import mlflow

    flat = metric_names(metrics)
    for family, shares in results["behaviour_shares"][CANDIDATE].items():
        for b, v in shares.items():
            flat[f"behaviour_share.{family}.{b}"] = v
    flat.update(
        {
            "eval.gates.passed": 1.0 if passed else 0.0,
            "eval.gates.failed": float(len(reasons)),
            "eval.gates.total": float(sum(g.passed is not None for g in gates)),
            "eval.first_promotion": 1.0 if first else 0.0,
            "eval.seconds": time.perf_counter() - t0,
        }
    )
    mlflow.log_metrics(flat)
    mlflow.log_artifacts(str(staging), ARTIFACT_DIR)
    mlflow.set_tags(
        {
            registry.RUN_TAG_EVAL_PASSED: "true" if passed else "false",
            registry.RUN_TAG_EVAL_REASONS: ("; ".join(reasons) or "all gates passed")[:7900],
            "preftune.eval.output": published[:5000],
        }
    )


def _log_views(suite: Suite, records: Sequence[SampleRecord], cand_hash: str, metrics: Mapping[str, Any]) -> None:
    """The MLflow UI's views of this evaluation: model input, dataset, per-case comparison."""
    from preftune.evaluate import mlflow_views

    model_id = mlflow_views.log_model_and_dataset(cand_hash, suite, metric_names(metrics))
    mlflow_views.log_case_comparison(records, suite, model_id)


def _default_output(run_id: str) -> Path:
    from preftune.home import preftune_home

    return preftune_home() / "evaluations" / run_id
