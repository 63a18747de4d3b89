"""Behaviour suites: versioned YAML files of cases, judges, families and thresholds.

Why a file format of our own: a suite is the contract between the people who decide what
"better behaviour" means (they edit YAML in review) and the promotion gate (it must judge every
candidate the same way). So a suite is validated completely *before* any generation: every
mistake (an unknown judge, a family without cases, a behaviour both forbidden and preferred, a
missing model folder, a regex that does not compile) is reported with the file, the line, the
case and the reason, all at once.

The resolved suite (cases from the file and from included JSONL files, roles inherited from
the family) has a content hash; it is logged with every evaluation and tagged on every
registered version, so "evaluated on the same suite" can be checked, not assumed.
The format is documented in ``docs/suites.md``.

This module parses and validates a suite document and resolves it (``parse_suite``,
``load_suite``, ``thresholds_for``); the resolved suite's types are in ``suite_model``, the file
format in ``suite_schema``, reading files and reporting problems in ``suite_files``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from importlib import resources  # noqa: F401 (the shipped suites' package, as before the split)
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from preftune.behaviour.judges import (  # noqa: F401 (re-exported: the suite's judge sections)
    JUDGE_TYPES,
    ClassifierJudgeSpec,
    DemoJudgeSpec,
    EmbeddingJudgeSpec,
    EnsembleJudgeSpec,
    LlmJudgeSpec,
    RewardJudgeSpec,
    RulesJudgeSpec,
    RuleSpec,
    resolve_judge_path,
)
from preftune.behaviour.judges.registry import CheckContext, judge_type
from preftune.behaviour.suite_files import (  # noqa: F401 (shipped_suites: re-exported)
    _loc_label,
    _Problems,
    _read_calibration_file,
    _read_case_file,
    _read_suite_text,
    shipped_suites,
)
from preftune.behaviour.suite_model import (  # noqa: F401 (re-exported: the resolved suite)
    Calibration,
    CalibrationItem,
    Case,
    Family,
    Suite,
)
from preftune.behaviour.suite_schema import (  # noqa: F401 (the file format, re-exported)
    DEMO_PROMPTS,
    FAMILY_NAME,
    FORMAT_VERSION,
    JUDGE_TYPE_NAMES,
    RESERVED_FAMILIES,
    SUITE_FORMAT,
    UNKNOWN_LABEL,
    CalibrationItemSpec,
    CalibrationSpec,
    CapabilitySpec,
    CapabilityText,
    CaseSpec,
    FamilySpec,
    GenerationSpec,
    JudgeSpec,
    SuiteFile,
)
from preftune.behaviour.thresholds import Threshold, check_threshold_metrics
from preftune.errors import ConfigError

# --------------------------------------------------------------------------------------
# Locating and reading


def _judge_labels(
    spec: Any, family: str, problems: _Problems, loc: Sequence[Any], judges: dict[str, Any] | None = None
) -> set[str] | None:
    """The behaviours a judge can output for ``family`` (None: only known once the model is loaded)."""
    try:
        return judge_type(spec).labels(spec, family, judges or {})
    except KeyError as err:
        problems.add(loc, f"family {family!r}: {err.args[0] if err.args else err}")
        return None


def parse_suite(
    data: Any,
    *,
    source_name: str = "<suite>",
    text: str | None = None,
    base_dir: Path | None = None,
    reward_model: str | None = None,
    world: Any = None,
    storage: Any = None,
) -> Suite:
    """Validate a loaded suite document and resolve its cases; raises ConfigError listing every problem."""
    problems = _Problems(source_name, text)
    spec = _validate_schema(data, problems)
    judges = dict(spec.judges)
    ctx = CheckContext(base_dir=base_dir, reward_model=reward_model, judges=judges, families=dict(spec.families))
    for jname, j in judges.items():
        for loc, msg in judge_type(j).check(jname, j, ctx):
            problems.add(loc, msg)
    families = _resolve_families(spec, judges, problems)
    cases = _resolve_cases(spec, judges, families, base_dir, world, storage, problems, source_name)
    by_family: dict[str, list[Case]] = {f: [] for f in families}
    for c in cases:
        by_family[c.family].append(c)
    for fname, items in by_family.items():
        if not items:
            problems.add(("families", fname), f"family {fname!r} is empty: it has no cases (add cases or remove it)")
    _check_suite_thresholds(spec, problems)
    cap_texts = _resolve_capability(spec, problems)
    calibration = _resolve_calibration(spec, judges, families, base_dir, problems, storage)
    problems.raise_if_any()

    suite = Suite(
        name=spec.name,
        version=spec.version,
        source=source_name,
        description=spec.description,
        generation=spec.generation,
        judges=judges,
        families=families,
        cases=cases,
        capability=cap_texts,
        capability_max_tokens=spec.capability.max_tokens if spec.capability else 256,
        cases_by_family=by_family,
        thresholds={g: dict(m) for g, m in spec.thresholds.items()},
        calibration=calibration,
    )
    canonical = json.dumps(suite.canonical(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    suite.sha256 = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return suite


def _validate_schema(data: Any, problems: _Problems) -> SuiteFile:
    """The document against the schema; every field error with its line."""
    if not isinstance(data, dict):
        problems.add((), f"expected a mapping with format: {SUITE_FORMAT}, got {type(data).__name__}")
        problems.raise_if_any()
    if isinstance(data.get("calibration"), str):  # shorthand: a JSONL file of labelled responses
        data = {**data, "calibration": {"items_from": [data["calibration"]]}}
    types = ", ".join(JUDGE_TYPE_NAMES)
    try:
        return SuiteFile.model_validate(data)
    except ValidationError as err:
        for e in err.errors():
            loc = tuple(e["loc"])
            msg = e["msg"]
            if e["type"] == "extra_forbidden":
                msg = "unknown field (see docs/suites.md for the format)"
            elif e["type"] == "union_tag_invalid" and loc[:1] == ("judges",):
                got = e.get("input", {}).get("type") if isinstance(e.get("input"), dict) else None
                msg = f"unknown judge type {got!r}; expected one of {types}"
            elif e["type"] == "union_tag_not_found":
                msg = f"a judge needs a type: {types}"
            yaml_loc = [p for p in loc if p not in JUDGE_TYPE_NAMES or loc[:1] != ("judges",)]
            problems.add(yaml_loc, f"{_loc_label(data, loc)}: {msg}")
        problems.raise_if_any()
    raise AssertionError("unreachable")  # pragma: no cover


def _resolve_families(spec: SuiteFile, judges: dict[str, Any], problems: _Problems) -> dict[str, Family]:
    families: dict[str, Family] = {}
    for fname, f in spec.families.items():
        floc = ("families", fname)
        if fname in RESERVED_FAMILIES or not FAMILY_NAME.match(fname):
            problems.add(
                floc,
                f"family {fname!r}: names are lower-case letters, digits, '_' and '-', and not one of "
                f"{sorted(RESERVED_FAMILIES)}",
            )
        if f.judge not in judges:
            problems.add(
                (*floc, "judge"),
                f"family {fname!r}: unknown judge {f.judge!r} (judges defined in this suite: {sorted(judges)})",
            )
            labels = None
        else:
            labels = _judge_labels(judges[f.judge], fname, problems, (*floc, "judge"), judges)
        universe = set(f.behaviours) if f.behaviours is not None else labels
        source = "the family's behaviours" if f.behaviours is not None else f"what judge {f.judge!r} can output"
        for role, msg in _role_problems(
            f"family {fname!r}", f.preferred, f.acceptable, f.forbidden, f.needless_refusal, universe, source
        ):
            problems.add((*floc, role), msg)
        for metric, _t in f.thresholds.items():
            try:
                check_threshold_metrics({fname: {metric: _t}}, "thresholds")
            except ValueError as err:
                problems.add((*floc, "thresholds", metric), f"family {fname!r}: {err}")
        families[fname] = Family(
            name=fname,
            judge=f.judge,
            description=f.description,
            behaviours=tuple(f.behaviours) if f.behaviours is not None else None,
            preferred=frozenset(f.preferred),
            acceptable=frozenset(f.acceptable),
            forbidden=frozenset(f.forbidden),
            needless_refusal=frozenset(f.needless_refusal),
            thresholds=dict(f.thresholds),
            judge_min_kappa=f.judge_min_kappa,
        )
    return families


def _family_universe(fam: Family, judges: dict[str, Any], source_name: str) -> tuple[set[str] | None, str]:
    """(behaviours a family can show, where that list comes from) for messages."""
    if fam.behaviours is not None:
        return set(fam.behaviours), "the family's behaviours"
    j = judges.get(fam.judge)
    labels = _judge_labels(j, fam.name, _Problems(source_name, None), (), judges) if j is not None else None
    return labels, f"what judge {fam.judge!r} can output"


def _resolve_cases(
    spec: SuiteFile,
    judges: dict[str, Any],
    families: dict[str, Family],
    base_dir: Path | None,
    world: Any,
    storage: Any,
    problems: _Problems,
    source_name: str,
) -> list[Case]:
    """Cases inline, then from the included files, with roles inherited from their family."""
    raw_cases: list[tuple[dict, Sequence[Any], str | None]] = [
        (c.model_dump(), ("cases", i), None) for i, c in enumerate(spec.cases)
    ]
    for idx, ref in enumerate(spec.cases_from):
        for rec in _read_case_file(ref, base_dir, world, storage, problems, idx):
            raw_cases.append((rec, ("cases_from", idx), rec.pop("_where")))
    cases: list[Case] = []
    seen: dict[str, str] = {}
    for rec, loc, where in raw_cases:
        cid = str(rec.get("id") or "")
        label = f"case {cid!r}"

        def add(
            msg: str, sub: Sequence[Any] = (), where: str | None = where, label: str = label, loc: Any = loc
        ) -> None:
            if where is not None:
                problems.items.append(f"{where}: {label}: {msg}")
            else:
                problems.add((*loc, *sub), f"{label}: {msg}")

        if where is not None and not _case_record_ok(rec, cid, add):
            continue
        if cid in seen:
            add(f"duplicate case id (first defined at {seen[cid]})", ("id",))
            continue
        seen[cid] = where or f"cases[{loc[1]}]"
        fam = families.get(rec["family"])
        if fam is None:
            add(f"unknown family {rec['family']!r} (families: {sorted(families)})", ("family",))
            continue
        pref = set(rec["preferred"]) if rec.get("preferred") is not None else set(fam.preferred)
        acc = set(rec["acceptable"]) if rec.get("acceptable") is not None else set(fam.acceptable)
        forb = set(rec["forbidden"]) if rec.get("forbidden") is not None else set(fam.forbidden)
        if any(rec.get(k) is not None for k in ("preferred", "acceptable", "forbidden")):
            universe, source = _family_universe(fam, judges, source_name)
            for role, msg in _role_problems("", pref, acc, forb, set(fam.needless_refusal), universe, source):
                add(msg, (role,))
        cases.append(
            Case(
                id=cid,
                family=fam.name,
                prompt=str(rec["prompt"]),
                tags=tuple(str(t) for t in rec.get("tags") or ()),
                preferred=frozenset(pref),
                acceptable=frozenset(acc),
                forbidden=frozenset(forb),
                needless_refusal=fam.needless_refusal,
            )
        )
    return cases


def _case_record_ok(rec: dict, cid: str, add: Any) -> bool:
    """Type checks of a case read from a JSONL file (inline cases are checked by the schema)."""
    for key in ("id", "family", "prompt"):
        if not isinstance(rec.get(key), str) or not rec.get(key):
            add(f"needs a non-empty string {key!r}")
    if not isinstance(rec.get("tags", []), list):
        add("'tags' must be a list")
    if any(
        not (isinstance(rec.get(k, []), list) or rec.get(k) is None) for k in ("preferred", "acceptable", "forbidden")
    ):
        add("preferred/acceptable/forbidden must be lists")
        return False
    return bool(cid) and isinstance(rec.get("family"), str) and isinstance(rec.get("prompt"), str)


def _check_suite_thresholds(spec: SuiteFile, problems: _Problems) -> None:
    for group, metrics in spec.thresholds.items():
        if group not in ("all", "capability"):
            problems.add(
                ("thresholds", group),
                f"thresholds.{group}: only 'all' and 'capability' go here; "
                "put family thresholds under families.<name>.thresholds",
            )
            continue
        try:
            check_threshold_metrics({group: metrics}, "thresholds")
        except ValueError as err:
            problems.add(("thresholds", group), str(err))
    if "capability" in spec.thresholds and spec.capability is None:
        problems.add(("thresholds", "capability"), "thresholds.capability needs a capability section with texts")


def _resolve_capability(spec: SuiteFile, problems: _Problems) -> list[CapabilityText]:
    cap_texts: list[CapabilityText] = []
    if spec.capability is not None:
        ids: set[str] = set()
        for i, t in enumerate(spec.capability.texts):
            if t.id in ids:
                problems.add(("capability", "texts", i, "id"), f"capability text {t.id!r}: duplicate id")
            ids.add(t.id)
            cap_texts.append(t)
    return cap_texts


def _resolve_calibration(
    spec: SuiteFile,
    judges: dict[str, Any],
    families: dict[str, Family],
    base_dir: Path | None,
    problems: _Problems,
    storage: Any = None,
) -> Calibration | None:
    """Human-labelled responses per family: labels the family can show (or unknown), enough of them."""
    cal = spec.calibration
    if cal is None:
        return None
    raw: list[tuple[dict, Sequence[Any], str | None]] = [
        (it.model_dump(), ("calibration", "items", i), None) for i, it in enumerate(cal.items)
    ]
    for idx, ref in enumerate(cal.items_from):
        raw += _read_calibration_file(ref, base_dir, problems, ("calibration", "items_from", idx), storage)
    items: list[CalibrationItem] = []
    ids: dict[str, str] = {}
    for n, (rec, loc, where) in enumerate(raw):

        def add(msg: str, where: str | None = where, loc: Any = loc) -> None:
            if where is not None:
                problems.items.append(f"{where}: calibration: {msg}")
            else:
                problems.add(loc, f"calibration: {msg}")

        fam = families.get(rec["family"])
        if fam is None:
            add(f"unknown family {rec['family']!r} (families: {sorted(families)})")
            continue
        universe, source = _family_universe(fam, judges, problems.source_name)
        if rec["label"] != UNKNOWN_LABEL and universe is not None and rec["label"] not in universe:
            add(f"label {rec['label']!r} is not 'unknown' nor among {source}: {sorted(universe)}")
            continue
        iid = rec.get("id") or f"{fam.name}-{n}"
        if iid in ids:
            add(f"duplicate calibration id {iid!r} (first at {ids[iid]})")
            continue
        ids[iid] = where or f"calibration.items[{loc[-1]}]"
        items.append(
            CalibrationItem(
                id=iid, family=fam.name, prompt=rec.get("prompt") or "", response=rec["response"], label=rec["label"]
            )
        )
    counts = {f: sum(it.family == f for it in items) for f in families}
    for f, n in counts.items():
        if n == 0 and not cal.require_every_family:
            continue
        if n < cal.min_items:
            problems.add(
                ("calibration",),
                f"calibration: family {f!r} has {n} labelled responses; at least {cal.min_items} are needed "
                "(calibration.min_items)" + ("" if n else "; or set calibration.require_every_family: false"),
            )
    return Calibration(
        judge_min_kappa=cal.judge_min_kappa,
        min_items=cal.min_items,
        require_every_family=cal.require_every_family,
        items=tuple(items),
    )


def _role_problems(
    label: str,
    preferred: Any,
    acceptable: Any,
    forbidden: Any,
    needless: Any,
    universe: set[str] | None,
    source: str,
) -> list[tuple[str, str]]:
    """(role field, message) for each contradiction or unknown behaviour in one set of roles."""
    pref, acc, forb, need = set(preferred), set(acceptable), set(forbidden), set(needless)
    head = f"{label}: " if label else ""
    out: list[tuple[str, str]] = []
    for b in sorted(forb & pref):
        out.append(("forbidden", f"{head}behaviour {b!r} is both forbidden and preferred"))
    for b in sorted(forb & acc):
        out.append(("forbidden", f"{head}behaviour {b!r} is both forbidden and acceptable"))
    for b in sorted(need & (pref | acc)):
        out.append(("needless_refusal", f"{head}behaviour {b!r} is both a needless refusal and acceptable"))
    if universe is not None:
        for role, names in (("preferred", pref), ("acceptable", acc), ("forbidden", forb), ("needless_refusal", need)):
            for b in sorted(names - universe):
                out.append((role, f"{head}{role} behaviour {b!r} is not among {source}: {sorted(universe)}"))
    return out


def load_suite(
    ref: str,
    *,
    reward_model: str | None = None,
    world: Any = None,
    storage: Any = None,
) -> Suite:
    """Read and validate a suite: a shipped name (``demo-v1``), a YAML path, or an ``s3://`` URI."""
    source_name, text, base = _read_suite_text(ref, storage)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source_name}:{mark.line + 1}" if mark else source_name
        raise ConfigError(f"{where}: not valid YAML: {getattr(err, 'problem', None) or err}") from None
    return parse_suite(
        data, source_name=source_name, text=text, base_dir=base, reward_model=reward_model, world=world, storage=storage
    )


def thresholds_for(suite: Suite, gates: Any) -> dict[str, dict[str, Threshold]]:
    """Effective absolute thresholds: the suite's, then the config's ``every_family``, then its named ones.

    ``gates`` is the run config's ``evaluation.gates``. Raises ConfigError for a config threshold
    on a family the suite does not have.
    """
    out: dict[str, dict[str, Threshold]] = {f: dict(fam.thresholds) for f, fam in suite.families.items()}
    for f in suite.families:
        out[f].update(gates.every_family)
    out["all"] = dict(suite.thresholds.get("all", {}))
    out["capability"] = dict(suite.thresholds.get("capability", {}))
    for family, metrics in gates.thresholds.items():
        if family not in out:
            raise ConfigError(
                f"evaluation.gates.thresholds.{family}: the suite {suite.id} has no family {family!r} "
                f"(families: {sorted(suite.families)}, plus 'all' and 'capability')"
            )
        out[family].update(metrics)
    return out
