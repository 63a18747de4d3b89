"""The collect step: typed entry points for the CLI and the kfp component.

- :func:`collect_from_file`: import an existing preference file (any format of :mod:`preftune.data.formats`, or a
  feedback-service export) into a dataset.
- :func:`collect_from_config`: what ``preftune collect --config run.yaml`` does: per
  ``data.judgements``, either sample candidates from the policy and have the simulated panel
  judge them (``simulated``), or import ``data.judgements_path`` (``service`` / ``file``).
- :func:`generate_candidates`: sample candidates only and write ``candidates.jsonl`` for the
  feedback service to turn into rating tasks.

Each opens one MLflow run (step ``collect``), logs counts, the source mix, the validation report
and the dataset as an input (``mlflow.log_input``, digest = content hash), and publishes the
dataset folder last and atomically: when any of it fails, nothing is published.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from preftune.collect.families import make_importer
from preftune.collect.pairs import WEIGHTING, ExpansionStats, expand_judgements
from preftune.data.dataset import BuiltDataset, build_dataset, log_dataset_input, publish, resolve_output
from preftune.data.formats import Importer, nothing_kept_message
from preftune.data.records import Pair, metric_key, prompt_key
from preftune.data.validation import ValidationReport
from preftune.errors import ConfigError, InputError, PreftuneError

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import RunConfig

STEP = "collect"
log = logging.getLogger(__name__)


@dataclass
class CollectResult:
    """What a collect run published."""

    uri: str
    hash: str
    meta: dict[str, Any]
    validation: dict[str, Any]
    expansion: dict[str, int]
    format: str | None = None
    generation: dict[str, Any] | None = None
    mlflow_run_id: str | None = None
    candidates_uri: str | None = None  # generated datasets: <uri>/candidates.jsonl (preftune.candidates v1)

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.meta["counts"])

    @property
    def families(self) -> dict[str, dict[str, int]]:
        return dict(self.meta["families"])

    @property
    def sources(self) -> dict[str, int]:
        return dict(self.meta["sources"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "hash": self.hash,
            "format": self.format,
            "counts": self.counts,
            "families": self.families,
            "sources": self.sources,
            "validation": {k: self.validation[k] for k in ("records_read", "records_kept", "dropped", "repaired")},
            "expansion": self.expansion,
            "generation": self.generation,
            "mlflow_run_id": self.mlflow_run_id,
        }


def _storage(cfg: RunConfig) -> Any:
    from preftune.storage import Storage

    return Storage.from_config(cfg.storage)


def _check_output(output: str) -> None:
    from preftune.storage import parse_uri

    if not str(output).strip():
        raise ConfigError("--output: give the folder (or s3:// prefix) to publish the dataset to")
    parse_uri(str(output).replace("{hash}", "0"))


def _refuse_if_nothing_kept(path: str, importer: Importer, output: str, storage: Any) -> None:
    """An import that kept no record publishes no dataset: the validation report and the rejected
    records go under the output folder (no completion marker, so nothing reads it as a dataset)
    and the error names the top drop reasons."""
    if importer.pairs or importer.judgements:
        return
    report = importer.report
    folder = str(output).replace("{hash}", "rejected").rstrip("/")
    try:
        storage.write_text(f"{folder}/validation.json", json.dumps(report.to_dict(), indent=2, sort_keys=True))
        storage.write_text(f"{folder}/validation.md", report.to_markdown())
        storage.write_text(
            f"{folder}/rejected.jsonl",
            "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in importer.rejected),
        )
        written: str | None = folder
    except PreftuneError:
        written = None  # the message still names the reasons
    raise InputError(nothing_kept_message(path, report, written))


def _families_meta(importer: Importer) -> dict[str, Any]:
    """``families_mapping`` for dataset.json when data.families mapped the imported records."""
    meta = importer.families_meta() if hasattr(importer, "families_meta") else None
    return {"families_mapping": meta} if meta and meta.get("records") else {}


def add_previous_datasets(importer: Importer, uris: list[str], storage: Any) -> list[dict[str, Any]]:
    """Feed earlier published datasets into ``importer`` (``data.previous_datasets``): their judgements through
    the same checks as new ones (``where`` = <uri>/judgements.jsonl:<line>), and their directly imported pairs
    (TRL, HH, ...: pairs no judgement of that dataset explains) as they are. Returns one summary per dataset
    for dataset.json."""
    from preftune.data.dataset import load_dataset

    summaries = []
    pair_ids = {p.pair_id for p in importer.pairs}
    for uri in uris:
        previous = load_dataset(uri, storage)
        importer.report.sources.append(f"{uri} (previous dataset {str(previous.meta.get('hash', ''))[:12]})")
        kept_before = len(importer.judgements)
        for lineno, rec in enumerate(previous.judgements, start=1):
            importer.report.records_read += 1
            importer.add("preftune", rec, f"{uri.rstrip('/')}/judgements.jsonl:{lineno}")
        judged = {str(rec.get("item_id")) for rec in previous.judgements}
        pairs = 0
        for rec in previous.train + previous.eval:
            if str(rec.get("item_id") or rec.get("pair_id")) in judged or str(rec["pair_id"]) in pair_ids:
                continue  # expanded again from its judgements below, or already here
            pair_ids.add(str(rec["pair_id"]))
            importer.pairs.append(Pair.from_record(rec))
            pairs += 1
        importer.finish()
        summaries.append(
            {
                "uri": uri,
                "hash": previous.meta.get("hash"),
                "judgements": len(importer.judgements) - kept_before,
                "imported_pairs": pairs,
            }
        )
    return summaries


def weight_extra_pairs(pairs: list[Pair], extra_keys: frozenset[str], weight: float) -> tuple[list[Pair], int]:
    """``data.extra_weight``: the pairs whose prompt is one of the extra prompts (observe's hard cases; matched
    by :func:`prompt_key`, the whitespace-normalised text, so judgements exported by the feedback service match
    whatever ids it gave them) weigh ``weight`` times as much in the reward model's training. Returns the pairs
    and how many were re-weighted. Only this run's pairs change: a later run that keeps this dataset
    (data.previous_datasets) expands its judgements afresh, at weight 1 unless they are its extra prompts too."""
    if weight == 1.0 or not extra_keys:
        return pairs, 0
    hit = [prompt_key(p.prompt) in extra_keys for p in pairs]
    out = [replace(p, weight=p.weight * weight) if h else p for p, h in zip(pairs, hit, strict=True)]
    return out, sum(hit)


def _extra_prompt_keys(cfg: RunConfig, storage: Any) -> frozenset[str]:
    """Prompt keys of ``data.extra_prompts`` (training split) for judgements imported from a file or the service."""
    if not cfg.data.extra_prompts or cfg.data.extra_weight == 1.0:
        return frozenset()
    from preftune.generation.candidates import load_prompts, training_prompts

    scratch = ValidationReport(strict=False, max_chars=cfg.data.max_chars)  # the prompts' own problems: collect's
    keys = set()
    for extra in cfg.data.extra_prompts:
        kept, _ = training_prompts(load_prompts(extra, cfg, storage, scratch))
        keys.update(prompt_key(p.prompt) for p in kept)
    return frozenset(keys)


def _keep_previous(importer: Importer, cfg: RunConfig, storage: Any) -> list[dict[str, Any]]:
    """``data.previous_datasets`` into ``importer``, logged on the active collect run."""
    import mlflow

    previous = add_previous_datasets(importer, list(cfg.data.previous_datasets), storage)
    if previous:
        mlflow.log_metric("collect.previous_judgements", float(sum(p["judgements"] for p in previous)))
        mlflow.set_tag("preftune.collect.previous_datasets", json.dumps([p["hash"] for p in previous]))
    return previous


def _log_and_publish(
    *,
    cfg: RunConfig,
    importer: Importer,
    output: str,
    storage: Any,
    extra_meta: dict[str, Any],
    candidates: list[dict[str, Any]] | None = None,
    extra_keys: frozenset[str] = frozenset(),
) -> tuple[str, BuiltDataset, ExpansionStats]:
    """Expand, build, log to the active MLflow run, publish (last). Returns (uri, built, stats).
    ``extra_keys``: prompt keys of ``data.extra_prompts``, whose pairs get ``data.extra_weight``."""
    import mlflow

    report = importer.report
    stats = ExpansionStats()
    pairs = list(importer.pairs) + expand_judgements(importer.judgements, stats)
    pairs, weighted = weight_extra_pairs(pairs, extra_keys, cfg.data.extra_weight)
    if weighted:
        extra_meta = {**extra_meta, "extra_weight": {"weight": cfg.data.extra_weight, "pairs": weighted}}
        mlflow.log_metrics({"collect.extra_weight": cfg.data.extra_weight, "collect.extra_weighted_pairs": weighted})
    built = build_dataset(
        pairs=pairs,
        judgements=importer.judgements,
        eval_fraction=cfg.data.eval_fraction,
        seed=cfg.run.seed,
        validation=report.to_dict(),
        validation_md=report.to_markdown(),
        config_hash=cfg.config_hash(),
        candidates=candidates or (),
        extra_meta={**extra_meta, "expansion": stats.to_dict(), "weighting": WEIGHTING, **_families_meta(importer)},
    )
    try:
        uri = resolve_output(output, built.hash)
        meta = built.meta
        metrics: dict[str, float] = {f"dataset.{k}": float(v) for k, v in meta["counts"].items()}
        metrics.update({metric_key("dataset.sources", k): float(v) for k, v in meta["sources"].items()})
        metrics.update({f"validation.dropped.{k}": float(v) for k, v in report.dropped.items()})
        metrics.update({f"validation.repaired.{k}": float(v) for k, v in report.repaired.items()})
        metrics.update({f"expansion.{k}": float(v) for k, v in stats.to_dict().items()})
        for fam, c in meta["families"].items():
            metrics.update({metric_key("dataset.family", fam, k): float(v) for k, v in c.items()})
        mlflow.log_metrics(metrics)
        mlflow.set_tags(
            {
                "preftune.dataset_hash": built.hash,
                "preftune.dataset_uri": uri,
                "preftune.dataset_sources": json.dumps(meta["sources"], sort_keys=True),
            }
        )
        mlflow.log_dict(report.to_dict(), "collect/validation.json")
        mlflow.log_text(report.to_markdown(), "collect/validation.md")
        mlflow.log_dict(meta, "collect/dataset.json")
        log_dataset_input(meta, built.train, built.eval, uri, context="collect")
    except BaseException:
        built.cleanup()
        raise
    uri = publish(built, output, storage)  # last: a failure above publishes nothing
    return uri, built, stats


def collect_from_file(
    path: str,
    output: str,
    fmt: str = "auto",
    strict: bool = False,
    cfg: RunConfig | None = None,
    *,
    pipeline_run_id: str | None = None,
) -> CollectResult:
    """Import a preference file (local or s3://) and publish the dataset at ``output``.

    ``strict`` (or ``data.strict``) fails on the first dropped or repaired record with an
    :class:`~preftune.errors.InputError` naming file:line and reason; otherwise the drops are in
    ``validation.json``. Raises before anything is published.
    """
    from preftune.config import RunConfig
    from preftune.tracking import start_step_run

    cfg = cfg or RunConfig()
    strict = bool(strict or cfg.data.strict)
    _check_output(output)
    storage = _storage(cfg)
    params = {"collect.mode": "file", "collect.input": str(path), "collect.format": fmt, "collect.strict": strict}
    with start_step_run(STEP, cfg, pipeline_run_id=pipeline_run_id, params=params) as run:
        report = ValidationReport(strict=strict, max_chars=cfg.data.max_chars)
        importer = make_importer(
            report, cfg.data.max_chars, cfg.data.import_options.options(), cfg.data.families, storage
        )
        used = importer.add_path(str(path), storage, fmt)
        _refuse_if_nothing_kept(str(path), importer, output, storage)
        import mlflow

        previous = _keep_previous(importer, cfg, storage)
        mlflow.set_tag("preftune.collect.format", used)
        uri, built, stats = _log_and_publish(
            cfg=cfg,
            importer=importer,
            output=output,
            storage=storage,
            extra_meta={
                "collect": {"mode": "file", "input": str(path), "format": used},
                **({"previous_datasets": previous} if previous else {}),
            },
        )
        return CollectResult(
            uri=uri,
            hash=built.hash,
            meta=built.meta,
            validation=report.to_dict(),
            expansion=stats.to_dict(),
            format=used,
            mlflow_run_id=run.info.run_id,
        )


def collect_from_config(
    cfg: RunConfig, output: str, *, pipeline_run_id: str | None = None, progress: bool | None = None
) -> CollectResult:
    """``preftune collect --config``: generation plus judgement per ``data.judgements``."""
    from preftune.tracking import start_step_run

    _check_output(output)
    storage = _storage(cfg)
    params = {"collect.mode": cfg.data.judgements}
    with start_step_run(STEP, cfg, pipeline_run_id=pipeline_run_id, params=params) as run:
        import mlflow

        report = ValidationReport(strict=cfg.data.strict, max_chars=cfg.data.max_chars)
        importer = make_importer(
            report, cfg.data.max_chars, cfg.data.import_options.options(), cfg.data.families, storage
        )
        generation = None
        candidates: list[dict[str, Any]] = []
        extra_keys: frozenset[str] = frozenset()
        used: str | None = None
        if cfg.data.judgements == "simulated":
            from preftune.collect.judge import add_panel_judgements, panel_records

            prompts, texts, gstats, candidates, extra_keys = _sample(cfg, storage, report, progress)
            generation = gstats.to_dict()
            mlflow.log_metrics(
                {
                    "generation.candidates_per_s": gstats.candidates_per_s,
                    "generation.tokens_per_s": gstats.tokens_per_s,
                    "generation.seconds": gstats.seconds,
                    "generation.candidates": float(gstats.candidates),
                    "generation.new_tokens": float(gstats.new_tokens),
                    "generation.prompts_truncated": float(gstats.prompts_truncated),
                }
            )
            mlflow.set_tag("preftune.generation.device", gstats.device)
            add_panel_judgements(importer, panel_records(prompts, texts, cfg))
            used = "simulated"
        else:
            from preftune.collect.judge import judgement_file

            path, fmt = judgement_file(cfg)
            used = importer.add_path(path, storage, fmt)
            _refuse_if_nothing_kept(path, importer, output, storage)
            extra_keys = _extra_prompt_keys(cfg, storage)  # the service's judgements of observe's hard cases
        previous = _keep_previous(importer, cfg, storage)
        mlflow.set_tag("preftune.collect.format", used)
        uri, built, stats = _log_and_publish(
            cfg=cfg,
            importer=importer,
            output=output,
            storage=storage,
            extra_meta={
                "collect": {"mode": cfg.data.judgements, "format": used, "prompts": cfg.data.prompts},
                **({"previous_datasets": previous} if previous else {}),
                **({"generation": generation} if generation else {}),
            },
            candidates=candidates,
            extra_keys=extra_keys,
        )
        return CollectResult(
            uri=uri,
            hash=built.hash,
            meta=built.meta,
            validation=report.to_dict(),
            expansion=stats.to_dict(),
            format=used,
            generation=generation,
            mlflow_run_id=run.info.run_id,
            candidates_uri=f"{uri.rstrip('/')}/candidates.jsonl" if candidates else None,
        )


def _sample(cfg: RunConfig, storage: Any, report: ValidationReport, progress: bool | None):
    from preftune.generation.candidates import (
        candidate_records,
        load_prompts,
        resolve_policy,
        sample_candidates,
        select_fraction,
        training_prompts,
    )

    prompts = load_prompts(cfg.data.prompts, cfg, storage, report)
    prompts = select_fraction(prompts, cfg.data.prompt_fraction, cfg.run.seed)
    seen = {prompt_key(p.prompt) for p in prompts}
    extras = []
    for extra in cfg.data.extra_prompts:  # e.g. observe's hard cases: all of them but the held-out ones
        loaded, held_out = training_prompts(load_prompts(extra, cfg, storage, report))
        report.records_kept -= held_out
        if held_out:
            log.info("%s: %d prompts held out for evaluation (split: heldout) are not collected", extra, held_out)
        for p in loaded:
            if prompt_key(p.prompt) in seen:
                report.drop("duplicate", p.where, "extra prompts: the prompt is already in the prompt set")
                report.records_kept -= 1
                continue
            seen.add(prompt_key(p.prompt))
            extras.append(p)
    policy_path = resolve_policy(cfg.models.policy, cfg, storage)
    own = cfg.data.extra_generation  # the extra prompts' own candidate settings, if any
    apart = own is not None or bool(cfg.data.extra_policies)  # the extra prompts sampled on their own
    together = prompts if apart else prompts + extras
    texts, gstats = sample_candidates(
        policy_path, together, cfg.data.generation, seed=cfg.run.seed, progress=progress, policy_ref=cfg.models.policy
    )
    prompts = together
    if apart and extras:
        more, extra_stats = _sample_extras(cfg, storage, policy_path, extras, own or cfg.data.generation, progress)
        texts, gstats, prompts = texts + more, _combined_stats(gstats, extra_stats), prompts + extras
    records = candidate_records(prompts, texts, cfg.models.policy)
    return prompts, texts, gstats, records, frozenset(prompt_key(p.prompt) for p in extras)


def _sample_extras(cfg: RunConfig, storage: Any, policy_path: str, extras: list, gen: Any, progress: bool | None):
    """The extra prompts' candidates: ``gen.n_candidates`` per prompt, split between models.policy (the remainder)
    and each of ``data.extra_policies``, concatenated per prompt in that order."""
    from dataclasses import replace

    from preftune.generation.candidates import sample_candidates
    from preftune.models import resolve_model_ref

    refs = [cfg.models.policy, *cfg.data.extra_policies]
    share = gen.n_candidates // len(refs)
    counts = [gen.n_candidates - share * (len(refs) - 1)] + [share] * (len(refs) - 1)
    texts: list[list[str]] = [[] for _ in extras]
    stats = None
    for j, (ref, n) in enumerate(zip(refs, counts, strict=True)):
        where = f"data.extra_policies[{j - 1}]"  # a bad reference names its own setting, not models.policy
        path = policy_path if j == 0 else str(resolve_model_ref(ref, cfg, storage, setting=where))
        got, st = sample_candidates(
            path,
            extras,
            gen.model_copy(update={"n_candidates": n}),
            seed=cfg.run.seed + 1 + j,
            progress=progress,
            policy_ref=ref,
        )
        texts = [a + b for a, b in zip(texts, got, strict=True)]
        # the same prompts again: count their candidates and time, not the prompts twice
        stats = st if stats is None else replace(_combined_stats(stats, st), prompts=stats.prompts)
        if j:
            log.info("extra prompts: %d candidates each from %s (data.extra_policies)", n, ref)
    return texts, stats


def _combined_stats(first: Any, second: Any) -> Any:
    """One GenerationStats for two sampling calls (counts and time added; settings of the first)."""
    from dataclasses import replace

    seconds = first.seconds + second.seconds
    candidates, tokens = first.candidates + second.candidates, first.new_tokens + second.new_tokens
    return replace(
        first,
        prompts=first.prompts + second.prompts,
        candidates=candidates,
        new_tokens=tokens,
        seconds=seconds,
        candidates_per_s=candidates / seconds if seconds > 0 else 0.0,
        tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
        prompts_truncated=first.prompts_truncated + second.prompts_truncated,
    )


@dataclass
class CandidatesResult:
    uri: str
    items: int
    generation: dict[str, Any]
    validation: dict[str, Any]
    mlflow_run_id: str | None = None


def generate_candidates(
    cfg: RunConfig, output: str, *, pipeline_run_id: str | None = None, progress: bool | None = None
) -> CandidatesResult:
    """Sample candidates only; writes ``<output>/candidates.jsonl`` (one atomic write) for the service.

    No dataset is published: this is the first half of a human rating round (the feedback
    service imports the file as rating tasks; its export comes back with ``data.judgements:
    service``).
    """
    import mlflow

    from preftune.generation.candidates import candidates_jsonl
    from preftune.tracking import start_step_run

    _check_output(output)
    storage = _storage(cfg)
    with start_step_run(STEP, cfg, pipeline_run_id=pipeline_run_id, params={"collect.mode": "candidates"}) as run:
        report = ValidationReport(strict=cfg.data.strict, max_chars=cfg.data.max_chars)
        _, _, gstats, records, _ = _sample(cfg, storage, report, progress)
        mlflow.log_metrics(
            {
                "generation.candidates_per_s": gstats.candidates_per_s,
                "generation.tokens_per_s": gstats.tokens_per_s,
                "generation.seconds": gstats.seconds,
                "generation.candidates": float(gstats.candidates),
                "generation.items": float(len(records)),
            }
        )
        mlflow.log_dict(report.to_dict(), "collect/validation.json")
        uri = str(output).rstrip("/") + "/candidates.jsonl"
        storage.write_text(uri, candidates_jsonl(records))
        mlflow.set_tag("preftune.candidates_uri", uri)
        return CandidatesResult(
            uri=uri,
            items=len(records),
            generation=gstats.to_dict(),
            validation=report.to_dict(),
            mlflow_run_id=run.info.run_id,
        )
