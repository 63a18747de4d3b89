"""check-fit: agreement, coverage and a verdict per family, before any GPU time is spent.

- :func:`check_fit` computes the :class:`~preftune.fit.report.FitReport` of a published dataset
  (no side effects).
- :func:`run_check_fit` is the pipeline step: it logs the figures and the report (markdown and
  JSON) to MLflow and, with an ``output``, publishes the dataset passed on to train-reward:

  * the input dataset minus the families that are not fit when ``fit.on_unfit`` is ``exclude``
    (their pairs and judgements are left out and listed in ``dataset.json``'s
    ``excluded_families``; the split is kept, the content hash is recomputed and the input's
    hash is kept as ``parent_hash``), or unchanged for ``warn``;
  * ``fit_report.md`` and ``fit_report.json`` inside that folder.

  When the run must stop (no family is fit, or ``on_unfit`` is ``stop`` and one is not), the
  output folder holds only the two report files -- no dataset -- and :class:`NotFitError`
  (exit code 10) is raised after everything is written and logged.

Pair imports (TRL, HH) have no judgement records: their agreement is measured on repeated
ratings of the same pair (same prompt and the same two texts, by different raters), as an item
with two candidates; coverage is not measured for them. Single-rated data gets the verdict
``not measured``; an agreement audit (``fit.audit.export``, ``--audit``: a feedback-service
export of the tasks ``preftune audit create`` made, :mod:`preftune.fit.audit`) measures it on a
sample, and ``fit.accept_unaudited`` goes on without one (verdict ``unaudited``, tag
``preftune.fit=unaudited`` on this run, the pipeline's run -- which every later step's run copies,
see :func:`preftune.tracking.start_step_run` -- and in the dataset passed on).

Data-quality figures that need no second rating (:mod:`preftune.fit.quality`) are in the report
and MLflow (``fit.quality.*``); a breached check warns or, with ``fit.quality.on_breach: stop``,
stops the run.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.data.dataset import LoadedDataset, build_dataset, load_dataset, log_dataset_input, publish
from preftune.data.records import Judgement, Pair, metric_key, utc_now
from preftune.errors import ExitCode, PreftuneError
from preftune.fit.report import FamilyFit, FitReport
from preftune.fit.verdict import CONTESTED, FIT, coverage_by_family, decide
from preftune.tracking import TAG_FIT, TAG_FIT_REASON

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import RunConfig

STEP = "check-fit"
MAX_TAGS = 20


class NotFitError(PreftuneError):
    """The test of fit says stop; ``report`` holds the figures."""

    exit_code = ExitCode.NOT_FIT

    def __init__(self, message: str, report: FitReport):
        super().__init__(message)
        self.report = report


def _norm(text: str) -> str:
    return " ".join(text.split())


def pair_agreement_records(pairs: Iterable[Mapping[str, Any]], judged_items: set[str]) -> list[dict[str, Any]]:
    """Agreement records for pairs that did not come from a judgement (TRL/HH imports).

    Item = the prompt with its two texts (the pair's ``item_id``, which ignores the direction);
    value = the position, in the item's texts sorted, of the text the rater chose (a two-value
    scale, so alpha is chance corrected; see :func:`preftune.fit.audit._by_position`). Records
    without a rater id count as distinct anonymous raters.
    """
    out = []
    for p in pairs:
        if p.get("item_id") in judged_items:
            continue
        texts = sorted([p["chosen"], p["rejected"]], key=_norm)
        out.append(
            {
                "item_id": p.get("item_id") or p["pair_id"],
                "prompt_id": p.get("prompt_id"),
                "family": p.get("family") or "default",
                "tags": p.get("tags") or [],
                "rater_id": p.get("rater_id") or f"anonymous:{p['pair_id']}",
                "best": texts.index(p["chosen"]),
                "all_unacceptable": False,
                "candidates": [{"id": f"c{i}"} for i in range(len(texts))],
            }
        )
    return out


def _rated_items(records: Iterable[Mapping[str, Any]]) -> Counter[str]:
    """Items with at least one judgement, per family."""
    seen: dict[str, set[str]] = {}
    for r in records:
        if r.get("best") is None and not r.get("all_unacceptable"):
            continue
        seen.setdefault(str(r.get("family") or "default"), set()).add(str(r.get("item_id") or r.get("prompt_id")))
    return Counter({f: len(items) for f, items in seen.items()})


def _audit_verdict(verdict: str, reason: str, with_original: Mapping[str, Any] | None, min_alpha: float):
    """An audited family the re-raters agree on is still contested when they do not agree with the labels."""
    w = with_original or {}
    alpha = w.get("alpha")
    if verdict != FIT or alpha is None or alpha >= min_alpha:
        return verdict, reason
    share = w.get("match_share")
    picked = f"; re-raters pick the original's answer in {share:.0%} of ratings" if share is not None else ""
    return CONTESTED, (
        f"re-raters agree with each other but not with the dataset's labels: alpha with the original label "
        f"{alpha:.2f} is below {min_alpha:.2f}{picked}; a reward model would learn labels people do not endorse"
    )


def check_fit(
    dataset: str | LoadedDataset,
    cfg: RunConfig,
    storage: Any = None,
    *,
    audit_records: Sequence[Mapping[str, Any]] | None = None,
    audit_source: str | None = None,
) -> FitReport:
    """The fit report of a dataset (a local folder, an s3:// URI or an already loaded dataset).

    ``audit_records``: the feedback-service export of an agreement audit of this dataset; without
    them, ``fit.audit.export`` is read when set.
    """
    from preftune.agreement import agreement_by_family

    if storage is None:
        from preftune.storage import Storage

        storage = Storage.from_config(cfg.storage)
    loaded = dataset if isinstance(dataset, LoadedDataset) else load_dataset(str(dataset), storage)
    fit = cfg.fit
    if audit_records is None and fit.audit.export:
        from preftune.fit.audit import read_export

        audit_source = fit.audit.export
        audit_records = read_export(fit.audit.export, storage)
    pairs = loaded.train + loaded.eval
    judged_items = {str(j.get("item_id")) for j in loaded.judgements}
    records = list(loaded.judgements) + pair_agreement_records(pairs, judged_items)
    opts = {"confidence": fit.confidence, "n_resamples": fit.bootstrap_resamples, "seed": cfg.run.seed}
    agreement = agreement_by_family(records, **opts)
    coverage = coverage_by_family(loaded.judgements)
    rated = _rated_items(records)
    audit = None
    if audit_records is not None:
        from preftune.fit.audit import measure_audit

        audit = measure_audit(loaded, audit_records, cfg, source=str(audit_source or "<audit>"))

    train_counts = Counter(p.get("family") or "default" for p in loaded.train)
    eval_counts = Counter(p.get("family") or "default" for p in loaded.eval)
    families = sorted(set(agreement) | set(coverage) | set(train_counts) | set(eval_counts))
    hint = f" --dataset {loaded.uri}"
    results: dict[str, FamilyFit] = {}
    for fam in families:
        agr, cov = agreement.get(fam), coverage.get(fam)
        audited = audit is not None and fam in audit.agreement
        if audited:
            agr = audit.agreement[fam]
            verdict, reason = decide(agr, cov, fit)
            verdict, reason = _audit_verdict(verdict, reason, audit.with_original.get(fam), fit.min_alpha)
            reason = f"audit ({agr.n_items} items re-rated by 2+ raters): {reason}"
        else:
            verdict, reason = decide(agr, cov, fit, rated_items=rated.get(fam, 0), audit_hint=hint)
        results[fam] = FamilyFit(
            family=fam,
            verdict=verdict,
            reason=reason,
            agreement=agr.to_dict() if agr is not None else None,
            coverage=cov.to_dict() if cov is not None else None,
            train_pairs=train_counts.get(fam, 0),
            eval_pairs=eval_counts.get(fam, 0),
            rated_items=audit.rated_items.get(fam, 0) if audited else rated.get(fam, 0),
            audit=audit.with_original.get(fam) if audited else None,
        )
    quality = None
    if fit.quality.enabled:
        from preftune.fit.quality import quality_figures

        quality = quality_figures(
            loaded.train, loaded.eval, fit.quality, validation=loaded.validation, seed=cfg.run.seed
        )
    report = FitReport(
        dataset_uri=loaded.uri,
        dataset_hash=str(loaded.meta.get("hash", "")),
        thresholds={
            "min_alpha": fit.min_alpha,
            "min_coverage": fit.min_coverage,
            "min_items": fit.min_items,
            "confidence": fit.confidence,
            "bootstrap_resamples": fit.bootstrap_resamples,
        },
        on_unfit=fit.on_unfit,
        families=results,
        tags=_tag_agreement(records, opts),
        created_at=utc_now(),
        quality=quality.to_dict() if quality is not None else None,
        quality_stop=bool(quality and quality.stop),
        audit={k: v for k, v in audit.to_dict().items() if k != "families"} if audit else None,
        unaudited_reason=fit.unaudited_reason if fit.accept_unaudited else None,
    )
    for r in results.values():
        if not r.fit:
            r.action = {"exclude": "excluded", "warn": "warned", "stop": "stop"}[fit.on_unfit]
    if not report.fit_families or report.quality_stop:
        for r in results.values():
            r.action = "stop"
    return report


def _tag_agreement(records: list[dict[str, Any]], opts: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Agreement per prompt tag (information only), for the most frequent tags."""
    from preftune.agreement import agreement_by_family

    counts = Counter(t for r in records for t in (r.get("tags") or []))
    if not counts:
        return {}
    top = {t for t, _ in counts.most_common(MAX_TAGS)}
    by_tag = [{**r, "family": t} for r in records for t in (r.get("tags") or []) if t in top]
    return {t: a.to_dict() for t, a in sorted(agreement_by_family(by_tag, **opts).items())}


def _filtered_dataset(loaded: LoadedDataset, report: FitReport, cfg: RunConfig, files: dict[str, str]):
    keep = set(report.families) - set(report.excluded_families)
    train = [Pair.from_record(p) for p in loaded.train if (p.get("family") or "default") in keep]
    eval_ = [Pair.from_record(p) for p in loaded.eval if (p.get("family") or "default") in keep]
    judgements = [Judgement.from_record(j) for j in loaded.judgements if (j.get("family") or "default") in keep]
    candidates = [c for c in loaded.candidates if (c.get("family") or "default") in keep]
    meta = loaded.meta
    excluded = sorted(set(meta.get("excluded_families") or []) | set(report.excluded_families))
    carried = {k: meta[k] for k in ("collect", "generation", "expansion", "weighting", "families_mapping") if k in meta}
    return build_dataset(
        pairs=train + eval_,
        judgements=judgements,
        eval_fraction=float(meta.get("eval_fraction", cfg.data.eval_fraction)),
        seed=int(meta.get("seed", cfg.run.seed)),
        validation=loaded.validation or {},
        validation_md=loaded.validation_md or "",
        config_hash=meta.get("config_hash"),
        excluded_families=excluded,
        candidates=candidates,
        extra_meta={
            **carried,
            "parent_hash": meta.get("hash"),
            "fit": {f: r.verdict for f, r in report.families.items()},
            "fit_status": report.fit_status,
            **({"fit_unaudited_reason": report.unaudited_reason} if report.fit_status == "unaudited" else {}),
        },
        split=(train, eval_),
        extra_files=files,
    )


def _report_files(report: FitReport) -> dict[str, str]:
    import json

    return {
        "fit_report.md": report.to_markdown(),
        "fit_report.json": json.dumps(report.to_dict(), indent=2) + "\n",
    }


def run_check_fit(
    dataset: str,
    cfg: RunConfig,
    output: str | None = None,
    *,
    pipeline_run_id: str | None = None,
    audit: str | None = None,
) -> FitReport:
    """The check-fit step (see the module docstring). Raises :class:`NotFitError` when the run must stop.

    ``audit``: a feedback-service export of this dataset's agreement audit (overrides ``fit.audit.export``).
    """
    import mlflow

    from preftune.storage import Storage, parse_uri
    from preftune.tracking import start_step_run

    if output is not None:
        parse_uri(output.replace("{hash}", "0"))
    storage = Storage.from_config(cfg.storage)
    audit = audit or cfg.fit.audit.export
    params = {"check_fit.dataset": dataset, "check_fit.output": output or "", "check_fit.audit": audit or ""}
    with start_step_run(STEP, cfg, pipeline_run_id=pipeline_run_id, params=params) as run:
        loaded = load_dataset(dataset, storage)
        audit_records = None
        if audit:
            from preftune.fit.audit import read_export

            audit_records = read_export(audit, storage)
        report = check_fit(loaded, cfg, storage, audit_records=audit_records, audit_source=audit)
        report.mlflow_run_id = run.info.run_id
        log_dataset_input(
            loaded.meta,
            [Pair.from_record(p) for p in loaded.train],
            [Pair.from_record(p) for p in loaded.eval],
            dataset,
            context="check-fit",
        )
        metrics: dict[str, float] = {
            "fit.families": float(len(report.families)),
            "fit.fit_families": float(len(report.fit_families)),
            "fit.excluded_families": float(len(report.excluded_families)),
        }
        tags = {
            "preftune.dataset_hash": report.dataset_hash,
            "fit.proceed": str(report.proceed).lower(),
            **fit_status_tags(report),
        }
        if report.quality:
            from preftune.fit.quality import metrics_from_dict

            metrics.update(metrics_from_dict(report.quality))
            tags["fit.quality.breaches"] = ",".join(report.quality.get("breaches") or []) or "none"
        for fam, r in report.families.items():
            tags[metric_key("fit", fam, "verdict")] = r.verdict
            a, c = r.agreement or {}, r.coverage or {}
            for key in ("alpha", "pairwise", "n_items", "n_judgements", "n_raters"):
                if a.get(key) is not None:
                    metrics[metric_key("fit", fam, key)] = float(a[key])
            for key, ci in (("alpha", a.get("alpha_ci")), ("pairwise", a.get("pairwise_ci"))):
                if ci and ci[0] is not None and ci[1] is not None:
                    metrics[metric_key("fit", fam, f"{key}_lo")] = float(ci[0])
                    metrics[metric_key("fit", fam, f"{key}_hi")] = float(ci[1])
            if c.get("share") is not None:
                metrics[metric_key("fit", fam, "coverage")] = float(c["share"])
            for key, value in (r.audit or {}).items():
                if key in ("alpha", "match_share", "majority_match_share") and value is not None:
                    metrics[metric_key("fit", fam, "audit", f"original_{key}")] = float(value)
        mlflow.log_metrics(metrics)
        mlflow.set_tags(tags)
        _tag_pipeline_run(tags)

        if output is not None:
            if report.proceed:
                # the report names the output, so build once to learn the hash, then write the final files
                built = _filtered_dataset(loaded, report, cfg, {})
                report.output_hash = built.hash
                report.output_uri = output.replace("{hash}", built.hash)
                built.cleanup()
                built = _filtered_dataset(loaded, report, cfg, _report_files(report))
                try:
                    log_dataset_input(
                        built.meta, built.train, built.eval, report.output_uri, context="check-fit-output"
                    )
                except BaseException:
                    built.cleanup()
                    raise
                publish(built, output, storage)
                mlflow.set_tags(
                    {"preftune.fit_dataset_uri": report.output_uri, "preftune.fit_dataset_hash": built.hash}
                )
            else:
                _publish_reports_only(report, output, storage)
        files = _report_files(report)
        mlflow.log_text(files["fit_report.md"], "check-fit/fit_report.md")
        mlflow.log_text(files["fit_report.json"], "check-fit/fit_report.json")
        if not report.proceed:
            raise NotFitError(f"not fit for PPO: {report.stop_reason} ({report.summary()})", report)
        return report


def fit_status_tags(report: FitReport) -> dict[str, str]:
    """``preftune.fit`` (``measured`` / ``audited`` / ``unaudited``) and, when unaudited, the reason."""
    tags = {TAG_FIT: report.fit_status}
    if report.fit_status == "unaudited":
        tags[TAG_FIT_REASON] = (report.unaudited_reason or "")[:4000]
    return tags


def _tag_pipeline_run(tags: Mapping[str, str]) -> None:
    """The fit status on the pipeline's run too: every later step's run copies it from there."""
    import os

    from preftune.tracking import ENV_PARENT_RUN_ID

    parent = os.environ.get(ENV_PARENT_RUN_ID)
    fit_tags = {k: v for k, v in tags.items() if k in (TAG_FIT, TAG_FIT_REASON)}
    if not parent or not fit_tags:
        return
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in fit_tags.items():
        client.set_tag(parent, key, value)


def _publish_reports_only(report: FitReport, output: str, storage: Any) -> None:
    """A stopped run's output folder: the readable report, and no dataset."""
    tmp = Path(tempfile.mkdtemp(prefix="preftune-fit-"))
    try:
        for name, text in _report_files(report).items():
            (tmp / name).write_text(text, encoding="utf-8")
        storage.put_dir(tmp, output.replace("{hash}", "not-fit"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
