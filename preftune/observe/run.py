"""``preftune observe``: one observation window of the champion in production.

read (watermark / time window, PII dropped) -> sample (seeded, capped) -> assign families (record
field, else the nearest suite prompt; prompts unlike every suite prompt are *new prompt types*)
-> judge with the suite's judges (``unknown`` counted, never dropped) -> figures per family and
model version -> drift tests against the champion's own evaluation and the recent windows ->
forbidden-share gates -> verdict (ok / drift / regression) -> MLflow run, report, Prometheus ->
actions (hard cases to the feedback service, rollback) -> state saved last.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.data.validation import ValidationReport
from preftune.errors import ExitCode, PreftuneError
from preftune.observe import baselines, novelty, sources, stats
from preftune.observe.state import ObserveState

STEP = "observe"
UNASSIGNED = "unassigned"
VERDICT_CODES = {"ok": ExitCode.OK, "no_data": ExitCode.OK, "drift": ExitCode.DRIFT, "regression": ExitCode.REGRESSION}


@dataclass
class ObserveResult:
    verdict: str
    window: dict[str, Any]
    records: list[dict[str, Any]]
    shares: dict[str, dict[str, dict[str, stats.Share]]]  # family -> model version -> behaviour -> share
    drift: dict[str, dict[str, stats.DriftTest]]  # baseline -> family -> test
    gates: dict[str, stats.GateCheck]
    new_prompt_share: float
    judge_errors: int
    hard_cases: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    mlflow_run_id: str | None = None
    output: str | None = None

    @property
    def exit_code(self) -> int:
        return VERDICT_CODES[self.verdict]

    def reasons(self) -> list[str]:
        out = [
            f"{g.family}: forbidden share {g.share:.3f} [{g.low:.3f}, {g.high:.3f}] over its gate max {g.max:g}"
            for g in self.gates.values()
            if g.broken
        ]
        for base, tests in self.drift.items():
            out += [
                f"{t.family}: behaviour mix moved from {base} (TV {t.tv:.2f}, p {t.p_value:.2g} < {t.threshold:.2g})"
                for t in tests.values()
                if t.drift
            ]
        return out


def _read(cfg: Any, storage: Any, state: ObserveState, src: Any, now_ms: int, report: ValidationReport):
    obs = cfg.observe
    mark = state.watermark()
    if src.kind == "logs":
        records, files = sources.read_logs(
            src.path,
            storage,
            mark.get("files", {}),
            pii_fields=obs.pii_fields,
            version_field=src.model_version_field,
            family_field=src.family_field,
            report=report,
        )
        return records, {"files": files, "last_end_ms": now_ms}, None, now_ms
    start = max(now_ms - int(obs.window_hours * 3600 * 1000), int(mark.get("last_end_ms") or 0))
    records = sources.read_traces(
        src.experiment,
        start,
        now_ms,
        pii_fields=obs.pii_fields,
        version_tag=src.model_version_field,
        family_tag=src.family_field,
        report=report,
    )
    return records, {"files": mark.get("files", {}), "last_end_ms": now_ms}, start, now_ms


def _sample(records: list[sources.Observed], cap: int, seed: int, window_id: str) -> list[sources.Observed]:
    if len(records) <= cap:
        return records
    rng = random.Random(f"{seed}:{window_id}")
    keep = sorted(rng.sample(range(len(records)), cap))
    return [records[i] for i in keep]


def _judge(suite: Any, judges: Any, families: list[str], prompts: list[str], texts: list[str]) -> tuple[list[str], int]:
    """Each record's behaviour (unknown where the judge cannot tell or fails), and the failures."""
    out = ["unknown"] * len(families)
    errors = 0
    for fam in sorted(set(families)):
        idx = [i for i, f in enumerate(families) if f == fam]
        if fam not in suite.families:
            continue
        judge = judges[suite.families[fam].judge]
        try:
            got = judge.judge(fam, [prompts[i] for i in idx], [texts[i] for i in idx])
        except (PreftuneError, OSError, RuntimeError):
            errors += len(idx)  # a judge outage: counted (and alerted on), the records stay unknown
            continue
        for i, b in zip(idx, got, strict=True):
            out[i] = b or "unknown"
    return out, errors


def judge_records(suite: Any, judges: Any, records: list[sources.Observed], obs: Any, default_version: str | None):
    """Families, behaviours and counts of a window's records (also what the drift benchmark runs).

    Returns (judged rows, counts per family, counts per family and model version, judge failures,
    share of new prompt types).
    """
    nearest = novelty.nearest_families(
        [r.prompt for r in records],
        [c.prompt for c in suite.cases],
        [c.family for c in suite.cases],
        obs.new_prompt_similarity,
        obs.encoder,
    )
    families = [
        r.family if r.family in suite.families else (n.family or UNASSIGNED)
        for r, n in zip(records, nearest, strict=True)
    ]
    behaviours, judge_errors = _judge(
        suite, judges, families, [r.prompt for r in records], [r.response for r in records]
    )
    versions = [r.model_version or default_version or "unknown" for r in records]
    judged = [
        {
            "id": r.id,
            "at": r.at,
            "model_version": v,
            "family": f,
            "behaviour": b,
            "new_prompt_type": n.new,
            "similarity": round(n.similarity, 4),
            "prompt": r.prompt,
            "response": r.response,
        }
        for r, v, f, b, n in zip(records, versions, families, behaviours, nearest, strict=True)
    ]
    counts: dict[str, Counter] = {}
    by_version: dict[str, dict[str, Counter]] = {}
    for rec in judged:
        counts.setdefault(rec["family"], Counter())[rec["behaviour"]] += 1
        by_version.setdefault(rec["family"], {}).setdefault(rec["model_version"], Counter())[rec["behaviour"]] += 1
    new_share = (sum(n.new for n in nearest) / len(nearest)) if nearest else 0.0
    return judged, counts, by_version, judge_errors, new_share


def observe_window(
    cfg: Any,
    *,
    source: str | None = None,
    output: str | None = None,
    to_service: str | None = None,
    policy: str | None = None,
    on_regression: str | None = None,
    now_ms: int | None = None,
) -> ObserveResult:
    """Observe one window; see the module docstring. Raises only for what a user must fix."""
    from preftune.behaviour.judges import load_judges
    from preftune.behaviour.suite import load_suite, thresholds_for
    from preftune.observe import actions, outputs
    from preftune.storage import Storage

    obs = cfg.observe
    src = obs.source.model_copy(update={"path": source}) if source else obs.source
    sources.require_source(src.kind, src.path, src.experiment)
    storage = Storage.from_config(cfg.storage)
    state_root = obs.state or storage.join(storage.default_root(), "observe", cfg.models.registered_model)
    state = ObserveState(storage, state_root)
    now_ms = int(now_ms if now_ms is not None else time.time() * 1000)
    report = ValidationReport(max_chars=cfg.data.max_chars)
    records, new_mark, start_ms, end_ms = _read(cfg, storage, state, src, now_ms, report)
    history = state.history()
    window_id = f"w{len(history) + 1:05d}"
    records = _sample(records, obs.max_records, cfg.run.seed, window_id)

    suite = load_suite(cfg.evaluation.suite, storage=storage)
    judges = load_judges(suite, storage=storage)
    client, champion, previous = baselines.champion_version(cfg)
    judged, counts, by_version, judge_errors, new_share = judge_records(suite, judges, records, obs, champion)
    declared = {
        f: set(fam.behaviours or ()) | fam.preferred | fam.acceptable | fam.forbidden | fam.needless_refusal
        for f, fam in suite.families.items()
    }
    shares = {
        f: {
            v: stats.shares(c, sorted((declared.get(f, set()) | set(c)) - {"unknown"}), obs.confidence)
            for v, c in vs.items()
        }
        for f, vs in by_version.items()
    }

    with tempfile.TemporaryDirectory(prefix="preftune-observe-") as tmp:
        drift: dict[str, dict[str, stats.DriftTest]] = {}
        eval_run = None
        if champion is not None:
            eval_counts, eval_run = baselines.champion_eval_counts(client, cfg, champion, Path(tmp))
            drift["champion_eval"] = stats.drift_tests(
                counts,
                eval_counts,
                name="champion_eval",
                alpha=obs.drift_alpha,
                min_shift=obs.min_shift,
                min_records=obs.min_records,
            )
        recent = baselines.recent_counts(history, champion, obs.recent_windows)
        if recent:
            drift["recent"] = stats.drift_tests(
                counts,
                recent,
                name="recent",
                alpha=obs.drift_alpha,
                min_shift=obs.min_shift,
                min_records=obs.min_records,
            )
    thresholds = thresholds_for(suite, cfg.evaluation.gates)
    gate_max = {
        f: t["forbidden_share"].max
        for f, t in thresholds.items()
        if "forbidden_share" in t and t["forbidden_share"].max is not None
    }
    forbidden = {f: fam.forbidden for f, fam in suite.families.items()}
    gates = stats.forbidden_checks(counts, forbidden, gate_max, obs.confidence)

    if not judged:
        verdict = "no_data"
    elif any(g.broken for g in gates.values()):
        verdict = "regression"
    elif any(t.drift for tests in drift.values() for t in tests.values()):
        verdict = "drift"
    else:
        verdict = "ok"
    window = {
        "window": window_id,
        "start_ms": start_ms,
        "end_ms": end_ms,
        "model_version": champion,
        "counts": {f: dict(c) for f, c in counts.items()},
        "verdict": verdict,
        "records": len(judged),
        "eval_run_id": eval_run,
    }
    result = ObserveResult(
        verdict=verdict,
        window=window,
        records=judged,
        shares=shares,
        drift=drift,
        gates=gates,
        new_prompt_share=new_share,
        judge_errors=judge_errors,
    )
    result.hard_cases = actions.hard_cases(result, suite, obs.hard_cases_max, obs.hard_cases_heldout)
    outputs.log_window(cfg, result, history, report, output=output, storage=storage)
    if verdict in ("drift", "regression"):
        result.actions += actions.send_to_service(result, to_service, policy, cfg, storage)
    if verdict == "regression" and (on_regression or obs.on_regression) == "rollback":
        result.actions.append(actions.rollback(cfg, client, champion, previous, result))
    outputs.push_metrics(cfg, result)
    outputs.tag_actions(cfg, client, champion, result)
    state.save(new_mark, window)  # last: a window that failed above is read again next time
    return result
