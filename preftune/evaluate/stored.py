"""Evaluations already done: their folders, a champion's reusable samples, and re-checks against them.

``promote`` reads a finished evaluation back (``load_eval_artifacts``), and re-compares its
candidate with a champion that changed meanwhile (``recheck_against``) without generating; the
evaluate step reuses a registry champion's own samples when they answer the same question
(``stored_champion_samples``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from preftune import registry
from preftune.behaviour.suite import Suite
from preftune.config import RunConfig
from preftune.evaluate.gates import GateResult, non_regression_gates, verdict
from preftune.evaluate.metrics import (
    CANDIDATE,
    CAPABILITY,
    CHAMPION,
    SampleRecord,
    capability_metrics,
    compute_metrics,
)

STEP = "evaluate"
ARTIFACT_DIR = "evaluation"
RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"
CAPABILITY_FILE = "capability.jsonl"
RESULTS_FORMAT = "preftune.evaluation"


def stored_champion_samples(
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
