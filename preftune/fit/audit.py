"""The agreement audit: how single-rated data answers "can people reliably pick the better answer?".

Public preference sets (HH-RLHF, UltraFeedback, ...) and most logs carry one rating per pair, so
check-fit cannot measure agreement on them (verdict ``not measured``). The audit measures it on
a sample:

1. :func:`plan_audit` (``preftune audit create``): a seeded, stratified sample of
   ``fit.audit.per_family`` imported pairs per family (one pair per item) becomes rating tasks in
   the feedback service's ``preftune.candidates`` v1 format: the prompt and the two answers in
   a seeded random order, with neutral ids (``a``/``b``) -- the original choice is not in the
   task. The service shows them to ``fit.audit.raters`` (K) raters each, in its own random
   order per rater. The plan (``audit.json``: dataset, K, the sampled pairs, no answers) and the
   tasks (``tasks.jsonl``) are written to the output folder; :func:`import_tasks_to_database`
   or :func:`import_tasks_over_http` hand the tasks to the service.
2. :func:`audit_status` (``preftune audit status``): per family, how many sampled items have
   judgements and how many have K of them.
3. :func:`measure_audit` (``preftune check-fit --dataset D --audit EXPORT``): from the service's
   export, per family, the re-raters' agreement with each other (Krippendorff's alpha and
   pairwise agreement with bootstrap CIs, :mod:`preftune.agreement`, as for any judgements) and
   with the original label (alpha with the original label as one more rater; the share of
   re-ratings and of re-rater majorities that pick the original's answer, with bootstrap CIs).
   check-fit's per-family verdicts then come from the re-raters (see :mod:`preftune.fit.verdict`).

Audit task ids are ``audit-`` plus a hash of the pair's ``item_id`` (which does not depend on
which answer was chosen), so an audit stays valid for the dataset check-fit passes on (same
pairs, new version) and re-importing the tasks is harmless.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from preftune.data.records import CANDIDATES_FORMAT, FORMAT_VERSION, short_hash, utc_now
from preftune.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import RunConfig
    from preftune.data.dataset import LoadedDataset

AUDIT_FORMAT = "preftune.audit"
AUDIT_TAG = "audit"
ORIGINAL_RATER = "original-label"


def audit_item_id(pair_item_id: str) -> str:
    """The audit task id of a pair's item (no trace of which answer was chosen)."""
    return "audit-" + short_hash("audit", str(pair_item_id), n=20)


def _norm(text: str) -> str:
    return " ".join(str(text).split())


def _items(loaded: LoadedDataset) -> dict[str, list[dict[str, Any]]]:
    """The dataset's pairs grouped by item (a prompt and its two texts), train and held-out alike."""
    items: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for split, pairs in (("train", loaded.train), ("eval", loaded.eval)):
        for p in pairs:
            items[str(p.get("item_id") or p["pair_id"])].append({**p, "_split": split})
    return items


# --------------------------------------------------------------------------------------------- create


@dataclass
class AuditPlan:
    dataset_uri: str
    dataset_hash: str
    raters: int
    per_family: int
    seed: int
    items: list[dict[str, Any]]  # {audit_item_id, item_id, pair_id, family, split}
    tasks: list[dict[str, Any]]  # preftune.candidates v1 records
    created_at: str = field(default_factory=utc_now)

    @property
    def families(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for it in self.items:
            counts[it["family"]] += 1
        return dict(sorted(counts.items()))

    def manifest(self) -> dict[str, Any]:
        return {
            "format": AUDIT_FORMAT,
            "version": 1,
            "created_at": self.created_at,
            "dataset": {"uri": self.dataset_uri, "hash": self.dataset_hash},
            "raters": self.raters,
            "per_family": self.per_family,
            "seed": self.seed,
            "families": self.families,
            "items": self.items,
            "note": "the original choices are not in this file nor in the tasks; check-fit reads them from the dataset",
        }

    def tasks_jsonl(self) -> str:
        return "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in self.tasks)


def plan_audit(loaded: LoadedDataset, *, per_family: int, raters: int, seed: int) -> AuditPlan:
    """A stratified sample of ``per_family`` items per family, as rating tasks (module docstring)."""
    by_family: dict[str, list[str]] = defaultdict(list)
    items = _items(loaded)
    for item_id, pairs in items.items():
        by_family[str(pairs[0].get("family") or "default")].append(item_id)
    if not items:
        raise InputError(f"{loaded.uri}: the dataset has no pairs to audit")
    chosen_items: list[dict[str, Any]] = []
    tasks: list[dict[str, Any]] = []
    dataset_hash = str(loaded.meta.get("hash", ""))
    stamp = utc_now()
    for family in sorted(by_family):
        ids = sorted(by_family[family])
        rng = random.Random(f"audit-sample:{seed}:{family}")
        sample = sorted(rng.sample(ids, min(per_family, len(ids))))
        for item_id in sample:
            pair = items[item_id][0]
            aid = audit_item_id(item_id)
            texts = [pair["chosen"], pair["rejected"]]
            random.Random(f"audit-order:{seed}:{aid}").shuffle(texts)
            chosen_items.append(
                {
                    "audit_item_id": aid,
                    "item_id": item_id,
                    "pair_id": pair["pair_id"],
                    "family": family,
                    "split": pair["_split"],
                }
            )
            tasks.append(
                {
                    "format": CANDIDATES_FORMAT,
                    "version": FORMAT_VERSION,
                    "item_id": aid,
                    "prompt_id": str(pair.get("prompt_id") or aid),
                    "family": family,
                    "tags": sorted({*(pair.get("tags") or []), AUDIT_TAG}),
                    "prompt": pair["prompt"],
                    "candidates": [{"id": "a", "text": texts[0]}, {"id": "b", "text": texts[1]}],
                    "policy": f"audit:{dataset_hash[:16]}",
                    "created_at": stamp,
                }
            )
    return AuditPlan(
        dataset_uri=loaded.uri,
        dataset_hash=dataset_hash,
        raters=raters,
        per_family=per_family,
        seed=seed,
        items=chosen_items,
        tasks=tasks,
        created_at=stamp,
    )


def write_plan(plan: AuditPlan, output: str, storage: Any) -> dict[str, str]:
    """``audit.json`` and ``tasks.jsonl`` under ``output`` (local or s3://); returns their URIs."""
    base = str(output).rstrip("/")
    uris = {"tasks": f"{base}/tasks.jsonl", "manifest": f"{base}/audit.json"}
    storage.write_text(uris["tasks"], plan.tasks_jsonl())
    storage.write_text(uris["manifest"], json.dumps(plan.manifest(), indent=2) + "\n")
    return uris


def read_manifest(audit: str, storage: Any) -> dict[str, Any]:
    """An audit folder's (or its ``audit.json``'s) manifest."""
    uri = audit if str(audit).endswith(".json") else str(audit).rstrip("/") + "/audit.json"
    try:
        data = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as err:
        raise InputError(f"{uri}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict) or data.get("format") != AUDIT_FORMAT:
        raise InputError(f"{uri}: expected an audit manifest ({AUDIT_FORMAT!r}, written by `preftune audit create`)")
    return data


# --------------------------------------------------------------------------------------------- the service


def _open_database():  # noqa: ANN202 - (settings, engine)
    """The feedback database (``PREFTUNE_DATABASE_URL``), migrated when PREFTUNE_AUTO_MIGRATE is on, else
    checked to be at the service's schema (a one-line error otherwise)."""
    from preftune.serve import db
    from preftune.serve.settings import load_settings

    settings = load_settings()
    engine = db.make_engine(settings.resolved_database_url(), pool_size=2)
    try:
        if settings.auto_migrate:
            db.migrate(engine)
        else:
            reason = db.check_ready(engine, db.head_revision())
            if reason is not None:
                from preftune.errors import StorageError

                raise StorageError(f"feedback database {db.redact_url(settings.resolved_database_url())}: {reason}")
    except BaseException:
        engine.dispose()
        raise
    return settings, engine


def import_tasks_to_database(tasks_jsonl: str, *, source: str = "audit") -> dict[str, Any]:
    """Import the tasks into the feedback database (``PREFTUNE_DATABASE_URL``), as ``preftune serve
    import-tasks`` does; returns the import counts and the service's ratings per task."""
    from preftune.serve import db, service

    settings, engine = _open_database()
    try:
        records = service.parse_candidates_jsonl(
            tasks_jsonl.splitlines(), source=source, max_text_chars=settings.max_text_chars
        )
        with db.make_sessionmaker(engine)() as s:
            result = service.import_tasks(s, records, source=source)
    finally:
        engine.dispose()
    return {**result.to_dict(), "ratings_per_task": settings.ratings_per_task}


def _http(url: str, token: str | None):  # noqa: ANN202 - an httpx.Client
    import httpx

    from preftune.errors import CredentialsError

    if not token:
        raise CredentialsError("the feedback service's admin API needs PREFTUNE_ADMIN_TOKEN (or --token)")
    return httpx.Client(base_url=url.rstrip("/"), headers={"authorization": f"Bearer {token}"}, timeout=60.0)


def _check(resp: Any, url: str) -> Any:
    from preftune.errors import CredentialsError, UnreachableError

    if resp.status_code in (401, 403):
        raise CredentialsError(f"{url}: the admin token was refused ({resp.status_code})")
    if resp.status_code >= 500:
        raise UnreachableError(f"{url}: the feedback service answered {resp.status_code}")
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail")
        except ValueError:
            detail = resp.text[:300]
        raise InputError(f"{url}: the feedback service refused the request ({resp.status_code}): {detail}")
    return resp


def import_tasks_over_http(tasks_jsonl: str, url: str, token: str | None) -> dict[str, Any]:
    """Import the tasks through the service's admin API (``POST /api/admin/tasks/import``)."""
    import httpx

    from preftune.errors import UnreachableError

    try:
        with _http(url, token) as client:
            result = _check(client.post("/api/admin/tasks/import", content=tasks_jsonl.encode("utf-8")), url).json()
            stats = _check(client.get("/api/admin/stats"), url).json()
    except httpx.TransportError as err:
        raise UnreachableError(f"feedback service {url} is unreachable: {err}") from None
    return {**result, "ratings_per_task": stats.get("ratings_per_task")}


def export_from_database() -> list[dict[str, Any]]:
    """Every judgement in the feedback database (``preftune.judgement`` v1 records)."""
    from preftune.serve import db, service

    _settings, engine = _open_database()
    try:
        return list(service.iter_export(db.make_sessionmaker(engine)))
    finally:
        engine.dispose()


def export_over_http(url: str, token: str | None) -> list[dict[str, Any]]:
    import httpx

    from preftune.errors import UnreachableError

    try:
        with _http(url, token) as client:
            text = _check(client.get("/api/admin/export"), url).text
    except httpx.TransportError as err:
        raise UnreachableError(f"feedback service {url} is unreachable: {err}") from None
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_export(uri: str, storage: Any) -> list[dict[str, Any]]:
    """A service export (``preftune.judgement`` v1 JSONL, local or s3://); bad lines name file:line."""
    out = []
    for lineno, line in enumerate(storage.read_text(uri).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{uri}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(rec, dict) or rec.get("format") != "preftune.judgement":
            raise InputError(f"{uri}:{lineno}: expected a preftune.judgement record (a feedback-service export)")
        if not isinstance(rec.get("candidates"), list) or "item_id" not in rec:
            raise InputError(f"{uri}:{lineno}: item_id and candidates are required")
        out.append(rec)
    return out


# --------------------------------------------------------------------------------------------- status


def audit_status(manifest: Mapping[str, Any], records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per family: sampled items, items with a judgement, items with K, judgements."""
    k = int(manifest.get("raters", 2))
    family_of = {it["audit_item_id"]: it["family"] for it in manifest.get("items", [])}
    raters: dict[str, set[str]] = defaultdict(set)
    for r in records:
        aid = str(r.get("item_id"))
        if aid in family_of and (r.get("best") is not None or r.get("all_unacceptable")):
            raters[aid].add(str(r.get("rater_id")))
    fams: dict[str, dict[str, int]] = {}
    for aid, fam in family_of.items():
        f = fams.setdefault(fam, {"items": 0, "started": 0, "complete": 0, "judgements": 0})
        n = len(raters.get(aid, ()))
        f["items"] += 1
        f["started"] += n > 0
        f["complete"] += n >= k
        f["judgements"] += n
    total = sum(f["items"] for f in fams.values())
    complete = sum(f["complete"] for f in fams.values())
    return {
        "raters": k,
        "items": total,
        "complete": complete,
        "done": total > 0 and complete == total,
        "families": dict(sorted(fams.items())),
    }


# --------------------------------------------------------------------------------------------- measure


def _original_index(rec: Mapping[str, Any], chosen: str) -> int | None:
    for i, c in enumerate(rec.get("candidates") or []):
        text = c.get("text") if isinstance(c, Mapping) else c
        if isinstance(text, str) and _norm(text) == _norm(chosen):
            return i
    return None


def _by_position(rec: Mapping[str, Any]) -> dict[str, Any]:
    """The record with its candidates' texts left out, so agreement compares picks by position.

    A pick is then "the first or the second answer of the task" (whose order was randomised when
    the task was made), a two-value scale with chance agreement near one half: alpha is chance
    corrected. Compared by text (:mod:`preftune.agreement`'s default), every item would bring two
    values of its own and two random picks from different items would almost never match, so the
    expected disagreement would be near 1 and alpha would read like raw agreement (0.5 for coin
    flips).
    """
    return {**rec, "candidates": [{"id": (c.get("id") if isinstance(c, Mapping) else None)} for c in rec["candidates"]]}


def _mean_ci(values: Sequence[float], confidence: float, n_resamples: int, seed: int) -> list[float | None]:
    from scipy.stats import bootstrap

    arr = np.asarray(values, dtype=float)
    if arr.size < 3:
        return [None, None]
    if np.all(arr == arr[0]):
        return [float(arr[0]), float(arr[0])]
    res = bootstrap(
        (arr,),
        np.mean,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


@dataclass
class AuditResult:
    source: str
    records: int  # audit judgements of this dataset found in the export
    ignored: int  # export records that are not this dataset's audit
    agreement: dict[str, Any]  # family -> FamilyAgreement among re-raters
    with_original: dict[str, dict[str, Any]]  # family -> figures against the original label
    rated_items: dict[str, int] = field(default_factory=dict)  # family -> audit items with a judgement

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "records": self.records,
            "ignored": self.ignored,
            "families": {
                f: {"re_raters": a.to_dict(), "with_original": self.with_original.get(f)}
                for f, a in sorted(self.agreement.items())
            },
        }


def measure_audit(
    loaded: LoadedDataset, records: Sequence[Mapping[str, Any]], cfg: RunConfig, *, source: str
) -> AuditResult:
    """Agreement among the re-raters and with the original labels, per family (module docstring)."""
    from preftune.agreement import agreement_by_family

    items = _items(loaded)
    by_audit_id = {audit_item_id(item_id): pairs for item_id, pairs in items.items()}
    mine = [r for r in records if str(r.get("item_id")) in by_audit_id and r.get("rater_id") != ORIGINAL_RATER]
    if not mine:
        policies = sorted({str(r.get("policy") or "") for r in records} - {""})
        raise InputError(
            f"{source}: no judgement of an audit of this dataset ({loaded.uri}): expected the feedback-service "
            f"export of the tasks `preftune audit create --dataset {loaded.uri}` wrote ({len(records)} record(s) "
            f"read{', e.g. for ' + policies[0] if policies else ''})"
        )
    # the family is the dataset's (the export's may predate a re-mapping)
    rerated = []
    originals = []
    for r in mine:
        pairs = by_audit_id[str(r["item_id"])]
        fam = str(pairs[0].get("family") or "default")
        rerated.append({**r, "family": fam})
    seen: set[str] = set()
    for r in rerated:
        aid = str(r["item_id"])
        if aid in seen:
            continue
        seen.add(aid)
        for k, p in enumerate(by_audit_id[aid]):
            idx = _original_index(r, p["chosen"])
            if idx is not None:
                originals.append({**r, "rater_id": f"{ORIGINAL_RATER}:{k}", "best": idx, "all_unacceptable": False})
    opts = {"confidence": cfg.fit.confidence, "n_resamples": cfg.fit.bootstrap_resamples, "seed": cfg.run.seed}
    agreement = agreement_by_family([_by_position(r) for r in rerated], **opts)
    with_orig_alpha = agreement_by_family([_by_position(r) for r in rerated + originals], **opts)
    with_original: dict[str, dict[str, Any]] = {}
    by_item: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rerated:
        by_item[str(r["item_id"])].append(r)
    orig_of = {str(o["item_id"]): o["best"] for o in originals if o["rater_id"].endswith(":0")}
    per_family_match: dict[str, list[float]] = defaultdict(list)
    per_family_majority: dict[str, list[float]] = defaultdict(list)
    for aid, recs in by_item.items():
        if aid not in orig_of:
            continue
        fam = recs[0]["family"]
        picks = [r.get("best") for r in recs if not r.get("all_unacceptable") and r.get("best") is not None]
        if not picks:
            continue
        match = sum(p == orig_of[aid] for p in picks)
        per_family_match[fam].append(match / len(picks))
        if 2 * match != len(picks):  # a tied majority says nothing
            per_family_majority[fam].append(float(2 * match > len(picks)))
    for fam in agreement:
        a = with_orig_alpha.get(fam)
        m, maj = per_family_match.get(fam, []), per_family_majority.get(fam, [])
        with_original[fam] = {
            "alpha": a.to_dict()["alpha"] if a else None,
            "alpha_ci": a.to_dict()["alpha_ci"] if a else [None, None],
            "match_share": float(np.mean(m)) if m else None,
            "match_share_ci": _mean_ci(m, cfg.fit.confidence, cfg.fit.bootstrap_resamples, cfg.run.seed),
            "majority_match_share": float(np.mean(maj)) if maj else None,
            "majority_match_share_ci": _mean_ci(maj, cfg.fit.confidence, cfg.fit.bootstrap_resamples, cfg.run.seed),
            "items": len(m),
        }
    rated: dict[str, set[str]] = defaultdict(set)
    for r in rerated:
        if r.get("best") is not None or r.get("all_unacceptable"):
            rated[r["family"]].add(str(r["item_id"]))
    return AuditResult(
        source=source,
        records=len(mine),
        ignored=len(records) - len(mine),
        agreement=agreement,
        with_original=with_original,
        rated_items={f: len(items) for f, items in sorted(rated.items())},
    )


# --------------------------------------------------------------------------------------------- simulation


def simulate_audit(
    loaded: LoadedDataset,
    manifest: Mapping[str, Any],
    tasks: Sequence[Mapping[str, Any]],
    *,
    accuracy: float = 0.9,
    family_accuracy: Mapping[str, float] | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The demo world's audit raters judge the audit's tasks: a service-style export (``source: simulated``).

    See :class:`preftune.world.raters.AuditRaters` for how they judge.
    """
    from preftune.world.raters import AuditRaters

    items = _items(loaded)
    chosen_of = {audit_item_id(item_id): pairs[0]["chosen"] for item_id, pairs in items.items()}
    raters = AuditRaters(
        n_raters=int(manifest.get("raters", 3)), accuracy=accuracy, family_accuracy=family_accuracy, seed=seed
    )
    out: list[dict[str, Any]] = []
    for task in tasks:
        aid = str(task["item_id"])
        if aid not in chosen_of:
            raise InputError(f"audit task {aid}: not an item of the dataset {loaded.uri}")
        original = _original_index(task, chosen_of[aid])
        out.extend(raters.judge(task, original))
    return out
