"""The evaluate step: a candidate and the champion on one behaviour suite, gates, and a report.

Order of work, so that mistakes cost nothing: the suite and the gate config are validated
first (``ConfigError``), then the tracking server is checked (``UnreachableError``), then the
models and judges are loaded (wrong paths, classifier labels that do not match the suite),
and only then does generation start. Results go to an output folder (published atomically)
and to one MLflow run with stable metric names (``docs/suites.md`` lists them).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from preftune.config import RunConfig
from preftune.evaluate import registry
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
from preftune.evaluate.suite import Suite, load_suite, thresholds_for

log = logging.getLogger(__name__)

STEP = "evaluate"
ARTIFACT_DIR = "evaluation"
RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"
CAPABILITY_FILE = "capability.jsonl"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
RESULTS_FORMAT = "preftune.evaluation"

RUN_TAG_SUITE = "preftune.eval.suite"
RUN_TAG_SUITE_HASH = "preftune.eval.suite_hash"
RUN_TAG_CANDIDATE = "preftune.eval.candidate"
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


def judge_by_family(
    suite: Suite,
    judges: Mapping[str, Any],
    families: Sequence[str],
    prompts: Sequence[str],
    texts: Sequence[str],
) -> list[str | None]:
    """The behaviour of each (family, prompt, text), each family by its suite judge in one batch.

    None where the judge could not tell, or the family is not in the suite.
    """
    by_family: dict[str, list[int]] = defaultdict(list)
    for i, family in enumerate(families):
        if family in suite.families:
            by_family[family].append(i)
    behaviours: list[str | None] = [None] * len(families)
    for family, idx in by_family.items():
        judge = judges[suite.families[family].judge]
        labels = judge.judge(family, [prompts[i] for i in idx], [texts[i] for i in idx])
        for i, b in zip(idx, labels, strict=True):
            behaviours[i] = b
    return behaviours


def _judge_and_record(
    suite: Suite,
    judges: Mapping[str, Any],
    model_label: str,
    samples: Sequence[Any],
    kl: Sequence[float | None],
    rewards: Sequence[float | None],
) -> list[SampleRecord]:
    """Judge every sample with its family's judge; unknowns are kept and counted."""
    cases = [suite.cases[s.case_index] for s in samples]
    judged = judge_by_family(
        suite, judges, [c.family for c in cases], [c.prompt for c in cases], [s.text for s in samples]
    )
    behaviours = [b or "unknown" for b in judged]
    out = []
    for i, s in enumerate(samples):
        case = suite.cases[s.case_index]
        roles = case.roles(behaviours[i])
        out.append(
            SampleRecord(
                model=model_label,
                case_id=case.id,
                family=case.family,
                sample=s.sample_index,
                text=s.text,
                behaviour=behaviours[i],
                preferred=roles["preferred"],
                acceptable=roles["acceptable"],
                forbidden=roles["forbidden"],
                needless_refusal=roles["needless_refusal"],
                unknown=roles["unknown"],
                has_preferred=bool(case.preferred),
                has_acceptable=bool(case.preferred or case.acceptable),
                has_forbidden=bool(case.forbidden),
                has_needless_refusal=bool(case.needless_refusal),
                words=len(s.text.split()),
                tokens=len(s.response_ids),
                ended=s.ended,
                kl=kl[i],
                reward=rewards[i],
            )
        )
    return out


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


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Pin torch's CPU threads (reproducible float reductions; no oversubscription), then restore."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _capability(policy: Any, suite: Suite) -> dict[str, float]:
    from preftune.evaluate.generation import text_logliks

    values = text_logliks(
        policy,
        [t.text for t in suite.capability],
        max_tokens=suite.capability_max_tokens,
        prompts=[t.prompt for t in suite.capability],
    )
    return dict(zip([t.id for t in suite.capability], values.tolist(), strict=True))


def _evaluate_model(
    label: str,
    model: registry.ResolvedModel,
    suite: Suite,
    judges: Mapping[str, Any],
    ref_policy: Any,
    scorer: Any,
    device: Any,
    cfg: RunConfig,
    progress: Any,
) -> tuple[list[SampleRecord], dict[str, float] | None]:
    """Sample one model on every case, judge, score KL (and rewards), and measure capability."""
    from preftune.evaluate.generation import load_policy, response_logprobs, same_vocabulary, sample

    gen = suite.generation
    prompts = [c.prompt for c in suite.cases]
    pol = load_policy(model.path, device, cfg.world)
    samples = sample(
        pol,
        prompts,
        n_samples=gen.samples_per_prompt,
        seed=gen.seed,
        temperature=gen.temperature,
        top_p=gen.top_p,
        top_k=gen.top_k,
        max_new_tokens=gen.max_new_tokens,
        batch_size=gen.batch_size,
        progress=progress,
    )
    kl: list[float | None] = [None] * len(samples)
    if same_vocabulary(pol.tokenizer, ref_policy.tokenizer):
        lp = response_logprobs(pol, prompts, samples, temperature=gen.temperature, batch_size=gen.batch_size)
        lp_ref = response_logprobs(ref_policy, prompts, samples, temperature=gen.temperature, batch_size=gen.batch_size)
        kl = [float((a - b).sum()) for a, b in zip(lp, lp_ref, strict=True)]
    else:
        log.warning("%s: its tokenizer differs from the reference's; KL to the reference is not computed", model.label)
    rewards: list[float | None] = [None] * len(samples)
    if scorer is not None:
        rewards = scorer.score([prompts[s.case_index] for s in samples], [s.text for s in samples]).tolist()
    records = _judge_and_record(suite, judges, label, samples, kl, rewards)
    cap = _capability(pol, suite) if suite.capability else None
    del pol
    gc.collect()
    return records, cap


def _stored_champion_samples(
    client: Any,
    uri: str,
    workdir: Path,
    cfg: RunConfig,
    suite: Suite,
    champ: registry.ResolvedModel,
    reference_hash: str,
) -> tuple[str, list[SampleRecord], dict[str, float] | None] | None:
    """The champion's own samples from the evaluation that promoted it, when they answer the same question.

    A registered version keeps the id of the evaluate run that judged it. If that run used the
    same suite (hash: cases, judges, seeds, sampling) and the same reference, and the version's
    files are the ones it judged, its samples are what sampling the champion again would give
    (same seeds), so they are reused instead of generated. Anything missing or different: None.
    """
    if champ.version is None or champ.registered_name is None:
        return None
    from mlflow.exceptions import MlflowException

    from preftune.errors import InputError

    try:
        tags = dict(client.get_model_version(champ.registered_name, champ.version).tags or {})
    except MlflowException:
        return None
    if tags.get(registry.TAG_SUITE_HASH) != suite.sha256 or not tags.get(registry.TAG_EVAL_RUN_ID):
        return None
    if tags.get(registry.TAG_MODEL_HASH) != registry.folder_hash(champ.path):
        return None
    try:
        results, records, capability = load_eval_artifacts(client, tags[registry.TAG_EVAL_RUN_ID], workdir, uri)
    except InputError:
        return None
    if results["suite"]["sha256"] != suite.sha256 or results.get("reference_hash") != reference_hash:
        return None
    mine = [SampleRecord(**{**r.to_dict(), "model": CHAMPION, "reward": None}) for r in records if r.model == CANDIDATE]
    if len(mine) != len(suite.cases) * suite.generation.samples_per_prompt:
        return None
    cap = capability.get(CANDIDATE)
    if suite.capability and (cap is None or set(cap) != {t.id for t in suite.capability}):
        return None
    return tags[registry.TAG_EVAL_RUN_ID], mine, cap


@dataclass
class _Models:
    candidate: registry.ResolvedModel
    champion: registry.ResolvedModel | None
    reference: registry.ResolvedModel


def _resolve_models(cfg: RunConfig, client: Any, tmp: Path, candidate: str, champion_ref: str) -> _Models:
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
    return _Models(cand, champ, reference)


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
    from preftune.evaluate.calibration import calibrate

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


def _sample_and_judge(
    models: _Models,
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
) -> tuple[list[SampleRecord], dict[str, dict[str, float]], str | None]:
    """Sample and judge the candidate and (unless its stored samples can be reused) the champion."""
    from tqdm.auto import tqdm

    from preftune.evaluate.generation import load_policy

    ev = cfg.evaluation
    gen = suite.generation
    champ = models.champion
    reused_from = None
    with torch_threads(ev.threads):
        ref_policy = load_policy(models.reference.path, device, cfg.world)
        capability: dict[str, dict[str, float]] = {}
        if suite.capability:
            capability["reference"] = _capability(ref_policy, suite)
        todo = [(CANDIDATE, models.candidate)] + ([(CHAMPION, champ)] if champ is not None else [])
        reuse = None
        if champ is not None and ev.reuse_champion_samples:
            reuse = _stored_champion_samples(client, uri, tmp, cfg, suite, champ, reference_hash)
            if reuse is not None:
                todo = todo[:1]
        bar = tqdm(
            total=len(suite.cases) * gen.samples_per_prompt * len(todo),
            desc="evaluate: sampling",
            unit="seq",
            disable=None if progress is None else not progress,
            leave=False,
        )
        records: list[SampleRecord] = []
        try:
            for label, model in todo:
                recs, cap = _evaluate_model(label, model, suite, judges, ref_policy, scorer, device, cfg, bar.update)
                records += recs
                if cap is not None:
                    capability[label] = cap
        finally:
            bar.close()
        if reuse is not None:
            reused_from, champ_records, champ_cap = reuse
            if scorer is not None:
                prompts = {c.id: c.prompt for c in suite.cases}
                scores = scorer.score([prompts[r.case_id] for r in champ_records], [r.text for r in champ_records])
                for r, v in zip(champ_records, scores.tolist(), strict=True):
                    r.reward = v
            records += champ_records
            if champ_cap is not None:
                capability[CHAMPION] = champ_cap
    return records, capability, reused_from


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
    models: _Models,
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
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
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
    from preftune.evaluate.calibration import CALIBRATION_FILE, require_calibrated
    from preftune.evaluate.generation import select_device
    from preftune.evaluate.judges import load_judges

    ev = cfg.evaluation
    reward_model = reward_model or ev.reward_model
    the_suite = load_suite(suite or ev.suite, reward_model=reward_model, world=cfg.world)
    thresholds_for(the_suite, ev.gates)  # config thresholds naming unknown families fail here
    t0 = time.perf_counter()

    uri = tracking.resolve_tracking_uri(cfg.tracking)
    tracking.configure(cfg)  # unreachable tracking server: fail before loading or generating anything
    client = registry.mlflow_client(uri)

    with registry.temp_workdir("evaluate-") as tmp_name:
        tmp = Path(tmp_name)
        models = _resolve_models(cfg, client, tmp, candidate, champion or ev.champion)
        champ = models.champion
        device = select_device(ev.device)
        judges = load_judges(the_suite, reward_model=reward_model, device=device)
        scorer = None
        if reward_model and champ is not None:
            from preftune.reward.model import RewardScorer

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

            records, capability, reused_from = _sample_and_judge(
                models, the_suite, judges, scorer, device, cfg, client, uri, tmp, reference_hash, progress
            )
            t_gen = time.perf_counter() - t0
            metrics = _all_metrics(records, capability, the_suite, cfg, calibration, scorer is not None)
            gates = compute_gates(
                cfg,
                the_suite,
                metrics,
                has_champion=champ is not None,
                champion_label=champ.label if champ else "champion",
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
            staging = tmp / "report"
            _write_output(staging, results, records, capability, gates, metrics, ev.gates.non_regression)
            if calibration is not None:
                (staging / CALIBRATION_FILE).write_text(
                    json.dumps(calibration.to_json(), indent=2) + "\n", encoding="utf-8"
                )
            published = _publish(staging, output or ev.output or str(_default_output(run_id)), cfg)
            _log_run(results, metrics, gates, passed, reasons, champ is None, t0, staging, published)
    return EvalResult(passed, reasons, gates, metrics, results, run_id, published, records, capability)


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


def _default_output(run_id: str) -> Path:
    from preftune.home import preftune_home

    return preftune_home() / "evaluations" / run_id


def load_eval_artifacts(
    client: Any, run_id: str, workdir: Path, tracking_uri: str
) -> tuple[dict[str, Any], list[SampleRecord], dict[str, dict[str, float]]]:
    """results.json, the sample records and the capability figures of an evaluate run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from preftune.errors import InputError

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise InputError(f"evaluate run {run_id}: not found ({err.message})") from None
    if run.data.tags.get("preftune.step") != STEP:
        raise InputError(f"run {run_id} is not an evaluate run (preftune.step={run.data.tags.get('preftune.step')!r})")
    dst = workdir / f"eval-{run_id}"
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=ARTIFACT_DIR, dst_path=str(dst), tracking_uri=tracking_uri
            )
        )
    except (MlflowException, OSError) as err:
        raise InputError(f"evaluate run {run_id}: cannot download its '{ARTIFACT_DIR}' artifacts ({err})") from None
    return read_eval_folder(local)


def read_eval_folder(folder: Path) -> tuple[dict[str, Any], list[SampleRecord], dict[str, dict[str, float]]]:
    from preftune.errors import InputError

    try:
        results = json.loads((folder / RESULTS_FILE).read_text(encoding="utf-8"))
        records = [
            SampleRecord.from_dict(json.loads(line))
            for line in (folder / SAMPLES_FILE).read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        capability: dict[str, dict[str, float]] = defaultdict(dict)
        cap_file = folder / CAPABILITY_FILE
        if cap_file.is_file():
            for line in cap_file.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    rec = json.loads(line)
                    capability[rec["model"]][rec["id"]] = float(rec["loglik_per_token"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{folder}: not a complete evaluation folder ({err})") from None
    if results.get("format") != RESULTS_FORMAT:
        raise InputError(f"{folder / RESULTS_FILE}: expected format {RESULTS_FORMAT!r}")
    return results, records, dict(capability)


def recheck_against(
    cfg: RunConfig,
    suite_families: Sequence[str],
    ours: tuple[Mapping[str, Any], Sequence[SampleRecord], Mapping[str, Mapping[str, float]]],
    theirs: tuple[Mapping[str, Any], Sequence[SampleRecord], Mapping[str, Mapping[str, float]]],
    champion_label: str,
) -> tuple[bool, list[str], list[GateResult]]:
    """Non-regression of our candidate against another evaluation's candidate (now the champion).

    Both evaluations ran the same suite (same hash: same cases, seeds and generation settings),
    so their sample records pair by case exactly as if they had been sampled in one run.
    """
    our_results, our_records, our_cap = ours
    their_results, their_records, their_cap = theirs
    records = [r for r in our_records if r.model == CANDIDATE]
    for r in their_records:
        if r.model == CANDIDATE:
            records.append(SampleRecord(**{**r.to_dict(), "model": CHAMPION}))
    ev = cfg.evaluation
    seed = int(our_results["suite"]["seed"])
    metrics = compute_metrics(
        records, list(suite_families), confidence=ev.confidence, n_resamples=ev.bootstrap_resamples, seed=seed
    )
    if our_cap.get(CANDIDATE) and their_cap.get(CANDIDATE):
        metrics[CAPABILITY] = capability_metrics(
            our_cap[CANDIDATE],
            our_cap.get("reference"),
            their_cap[CANDIDATE],
            confidence=ev.confidence,
            n_resamples=ev.bootstrap_resamples,
            seed=seed,
        )
    gates = non_regression_gates(
        metrics, list(suite_families), ev.gates, confidence=ev.confidence, champion_label=champion_label
    )
    passed, reasons = verdict(gates)
    return passed, reasons, gates
