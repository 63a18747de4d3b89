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
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from preftune.errors import ConfigError, PreftuneError
from preftune.evaluate.config import Threshold, check_threshold_metrics
from preftune.evaluate.judges import (  # noqa: F401 (re-exported: the suite's judge sections)
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
from preftune.evaluate.judges.registry import CheckContext, judge_type

SUITE_FORMAT = "preftune.suite"
FORMAT_VERSION = 1
RESERVED_FAMILIES = frozenset({"all", "capability", "every_family"})
FAMILY_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
UNKNOWN_LABEL = "unknown"
DEMO_PROMPTS = "demo:prompts-eval"
"""``cases_from`` entry that reads the demo world's held-out prompts (built on demand)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerationSpec(_Strict):
    """Fixed, seeded sampling: part of the suite, so two evaluations of one model agree."""

    seed: int = Field(0, ge=0, description="Seed of the sampling (batch i uses seed + i).")
    samples_per_prompt: int = Field(4, ge=1, le=256, description="Samples drawn per case.")
    temperature: float = Field(1.0, gt=0.0, le=5.0, description="Sampling temperature (also used for the KL).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0: off).")
    max_new_tokens: int = Field(48, ge=1, le=4096, description="Longest response in new tokens.")
    batch_size: int = Field(64, ge=1, le=4096, description="Sequences per generation batch (part of the seeding).")


JudgeSpec = Annotated[Union[tuple(t.spec for t in JUDGE_TYPES.values())], Field(discriminator="type")]  # noqa: UP007
"""Every registered judge type's suite section, told apart by ``type``."""
JUDGE_TYPE_NAMES = tuple(JUDGE_TYPES)


class FamilySpec(_Strict):
    description: str = ""
    judge: str = Field(..., min_length=1)
    behaviours: list[str] | None = None
    preferred: list[str] = Field(default_factory=list)
    acceptable: list[str] = Field(default_factory=list)
    forbidden: list[str] = Field(default_factory=list)
    needless_refusal: list[str] = Field(default_factory=list)
    thresholds: dict[str, Threshold] = Field(default_factory=dict)
    judge_min_kappa: float | None = Field(
        None, ge=-1.0, le=1.0, description="This family's floor on its judge's Cohen's kappa (default: calibration's)."
    )


class CaseSpec(_Strict):
    id: str = Field(..., min_length=1)
    family: str = Field(..., min_length=1)
    prompt: str = Field(..., min_length=1)
    tags: list[str] = Field(default_factory=list)
    preferred: list[str] | None = None
    acceptable: list[str] | None = None
    forbidden: list[str] | None = None


class CapabilityText(_Strict):
    id: str = Field(..., min_length=1)
    text: str = Field(..., min_length=1, description="The text whose log-likelihood is measured.")
    prompt: str | None = Field(
        None, description="Optional user prompt: then only ``text`` is scored, as the response to this prompt."
    )


class CapabilitySpec(_Strict):
    max_tokens: int = Field(256, ge=2, description="Texts are truncated to this many policy tokens.")
    texts: list[CapabilityText] = Field(..., min_length=2)


class CalibrationItemSpec(_Strict):
    """One human-labelled response: what the family's judge should have said."""

    id: str | None = Field(None, min_length=1)
    family: str = Field(..., min_length=1)
    prompt: str = ""
    response: str = Field(..., min_length=1)
    label: str = Field(..., min_length=1, description="The behaviour a person saw, or 'unknown' (none of them).")


class CalibrationSpec(_Strict):
    """Human labels the judges are measured against before their verdicts gate anything."""

    judge_min_kappa: float = Field(
        0.6, ge=-1.0, le=1.0, description="A family whose judge agrees less (Cohen's kappa) is not gated: exit 2."
    )
    min_items: int = Field(10, ge=2, description="Labelled responses each calibrated family needs at least.")
    require_every_family: bool = Field(True, description="Every family needs labelled responses.")
    items: list[CalibrationItemSpec] = Field(default_factory=list)
    items_from: list[str] = Field(
        default_factory=list, description="JSONL files of labelled responses (relative to the suite)."
    )


class SuiteFile(_Strict):
    format: Literal["preftune.suite"]
    format_version: Literal[1] = 1
    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    version: int = Field(..., ge=1)
    description: str = ""
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    judges: dict[str, JudgeSpec] = Field(..., min_length=1)
    families: dict[str, FamilySpec] = Field(..., min_length=1)
    cases: list[CaseSpec] = Field(default_factory=list)
    cases_from: list[str] = Field(default_factory=list)
    capability: CapabilitySpec | None = None
    thresholds: dict[str, dict[str, Threshold]] = Field(
        default_factory=dict, description="Thresholds on the pooled figures ('all') and the capability set."
    )
    calibration: CalibrationSpec | None = None


# --------------------------------------------------------------------------------------
# The resolved suite


@dataclass(frozen=True)
class Family:
    name: str
    judge: str
    description: str
    behaviours: tuple[str, ...] | None
    preferred: frozenset[str]
    acceptable: frozenset[str]
    forbidden: frozenset[str]
    needless_refusal: frozenset[str]
    thresholds: dict[str, Threshold]
    judge_min_kappa: float | None = None


@dataclass(frozen=True)
class CalibrationItem:
    id: str
    family: str
    prompt: str
    response: str
    label: str


@dataclass(frozen=True)
class Calibration:
    """The suite's human-labelled responses and the agreement its judges must reach."""

    judge_min_kappa: float
    min_items: int
    require_every_family: bool
    items: tuple[CalibrationItem, ...]

    def by_family(self) -> dict[str, list[CalibrationItem]]:
        out: dict[str, list[CalibrationItem]] = {}
        for it in self.items:
            out.setdefault(it.family, []).append(it)
        return out

    def min_kappa(self, family: Family) -> float:
        return family.judge_min_kappa if family.judge_min_kappa is not None else self.judge_min_kappa


@dataclass(frozen=True)
class Case:
    id: str
    family: str
    prompt: str
    tags: tuple[str, ...]
    preferred: frozenset[str]
    acceptable: frozenset[str]
    forbidden: frozenset[str]
    needless_refusal: frozenset[str]

    def roles(self, behaviour: str) -> dict[str, bool]:
        """Which roles a judged behaviour plays for this case (preferred counts as acceptable)."""
        return {
            "preferred": behaviour in self.preferred,
            "acceptable": behaviour in self.preferred or behaviour in self.acceptable,
            "forbidden": behaviour in self.forbidden,
            "needless_refusal": behaviour in self.needless_refusal,
            "unknown": behaviour == "unknown",
        }


@dataclass
class Suite:
    """A validated suite with every case resolved."""

    name: str
    version: int
    source: str
    description: str
    generation: GenerationSpec
    judges: dict[str, Any]
    families: dict[str, Family]
    cases: list[Case]
    capability: list[CapabilityText]
    capability_max_tokens: int
    sha256: str = ""
    cases_by_family: dict[str, list[Case]] = field(default_factory=dict)
    thresholds: dict[str, dict[str, Threshold]] = field(default_factory=dict)
    calibration: Calibration | None = None

    @property
    def id(self) -> str:
        """``<name>-v<version>``: what reports, metrics and registry tags call the suite."""
        return f"{self.name}-v{self.version}"

    def canonical(self) -> dict[str, Any]:
        """Everything that determines the figures, as plain JSON (what the hash covers)."""
        return {
            "name": self.name,
            "version": self.version,
            "generation": self.generation.model_dump(mode="json"),
            "judges": {k: v.model_dump(mode="json") for k, v in sorted(self.judges.items())},
            "families": {
                name: {
                    "judge": f.judge,
                    "behaviours": list(f.behaviours) if f.behaviours is not None else None,
                    "preferred": sorted(f.preferred),
                    "acceptable": sorted(f.acceptable),
                    "forbidden": sorted(f.forbidden),
                    "needless_refusal": sorted(f.needless_refusal),
                    "thresholds": {m: t.model_dump(mode="json") for m, t in sorted(f.thresholds.items())},
                    **({"judge_min_kappa": f.judge_min_kappa} if f.judge_min_kappa is not None else {}),
                }
                for name, f in sorted(self.families.items())
            },
            "cases": [
                {
                    "id": c.id,
                    "family": c.family,
                    "prompt": c.prompt,
                    "tags": list(c.tags),
                    "preferred": sorted(c.preferred),
                    "acceptable": sorted(c.acceptable),
                    "forbidden": sorted(c.forbidden),
                    "needless_refusal": sorted(c.needless_refusal),
                }
                for c in self.cases
            ],
            "capability": {
                "max_tokens": self.capability_max_tokens,
                "texts": [{"id": t.id, "prompt": t.prompt, "text": t.text} for t in self.capability],
            },
            "thresholds": {
                g: {m: t.model_dump(mode="json") for m, t in sorted(ms.items())}
                for g, ms in sorted(self.thresholds.items())
            },
            **({"calibration": self._canonical_calibration()} if self.calibration is not None else {}),
        }

    def _canonical_calibration(self) -> dict[str, Any]:
        cal = self.calibration
        assert cal is not None
        return {
            "judge_min_kappa": cal.judge_min_kappa,
            "min_items": cal.min_items,
            "require_every_family": cal.require_every_family,
            "items": [
                {"id": i.id, "family": i.family, "prompt": i.prompt, "response": i.response, "label": i.label}
                for i in cal.items
            ],
        }


# --------------------------------------------------------------------------------------
# Locating and reading


def shipped_suites() -> list[str]:
    """Names of the suites shipped with preftune (``preftune/suites/*.yaml``)."""
    root = resources.files("preftune.suites")
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_suite_text(ref: str, storage: Any | None) -> tuple[str, str, Path | None]:
    """(source name, YAML text, local folder for relative paths) of a suite name, path or URI."""
    if re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", ref) and not ref.endswith((".yaml", ".yml")):
        res = resources.files("preftune.suites").joinpath(f"{ref}.yaml")
        if not res.is_file():
            raise ConfigError(
                f"suite {ref!r}: no shipped suite of that name (shipped: {', '.join(shipped_suites())}); "
                "give a path to a YAML file for your own suite"
            )
        with resources.as_file(res) as p:
            return str(p), p.read_text(encoding="utf-8"), p.parent
    if ref.startswith("s3://"):
        from preftune.storage import Storage

        st = storage or Storage()
        try:
            local = st.local_path(ref)
        except PreftuneError as err:
            raise ConfigError(f"{ref}: cannot read the suite: {err.message}") from None
        return ref, local.read_text(encoding="utf-8"), local.parent
    p = Path(ref).expanduser()
    try:
        return str(p), p.read_text(encoding="utf-8"), p.resolve().parent
    except FileNotFoundError:
        raise ConfigError(f"{p}: suite file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{p}: cannot read the suite: {err}") from None


def _line_of(source: str, loc: Sequence[Any]) -> int | None:
    """1-based line of the YAML node at ``loc`` (or of its nearest existing parent)."""
    try:
        node = yaml.compose(source)
    except yaml.YAMLError:
        return None
    if node is None:
        return None
    line = node.start_mark.line + 1
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(key)]
            if not match:
                return line
            node = match[0][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            return line
        line = node.start_mark.line + 1
    return line


class _Problems:
    """Collects every problem of a suite, each with file:line and what to fix."""

    def __init__(self, source_name: str, text: str | None):
        self.source_name = source_name
        self.text = text
        self.items: list[str] = []

    def add(self, loc: Sequence[Any], message: str, line: int | None = None) -> None:
        if line is None and self.text is not None:
            line = _line_of(self.text, loc)
        where = f"{self.source_name}:{line}" if line else self.source_name
        self.items.append(f"{where}: {message}")

    def raise_if_any(self) -> None:
        if self.items:
            shown = self.items[:20]
            more = f" (and {len(self.items) - 20} more)" if len(self.items) > 20 else ""
            raise ConfigError("invalid suite: " + "; ".join(shown) + more)


def _loc_label(data: Any, loc: Sequence[Any]) -> str:
    """Human label of a pydantic error location, naming the case id when inside ``cases``."""
    parts = [str(p) for p in loc]
    if len(loc) >= 2 and loc[0] == "cases" and isinstance(loc[1], int) and isinstance(data, dict):
        cases = data.get("cases")
        if isinstance(cases, list) and loc[1] < len(cases) and isinstance(cases[loc[1]], dict):
            cid = cases[loc[1]].get("id")
            rest = ".".join(parts[2:])
            label = f"case {cid!r} (cases[{loc[1]}])" if cid else f"cases[{loc[1]}]"
            return f"{label}{': ' + rest if rest else ''}"
    if len(loc) >= 3 and loc[0] == "judges" and loc[2] in JUDGE_TYPE_NAMES:
        parts = [parts[0], parts[1], *parts[3:]]  # drop the discriminator tag pydantic inserts
    return ".".join(parts) or "<top level>"


def _read_case_file(ref: str, base: Path | None, world: Any, storage: Any, problems: _Problems, idx: int) -> list[dict]:
    """Cases from a JSONL file of ``{"id", "family", "prompt", "tags"}`` records."""
    if ref == DEMO_PROMPTS:
        from preftune.config import WorldSection
        from preftune.world import ensure_world

        path = Path(ensure_world(world or WorldSection()).prompts_eval)
    elif ref.startswith("s3://"):
        from preftune.storage import Storage

        try:
            path = (storage or Storage()).local_path(ref)
        except PreftuneError as err:
            problems.add(("cases_from", idx), f"cases_from[{idx}] {ref}: {err.message}")
            return []
    else:
        path = Path(ref).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path
    out: list[dict] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    problems.items.append(f"{path}:{n}: not valid JSON: {err.msg}")
                    continue
                if not isinstance(rec, dict):
                    problems.items.append(f"{path}:{n}: expected an object with id, family, prompt")
                    continue
                rec = {
                    k: rec[k]
                    for k in ("id", "family", "prompt", "tags", "preferred", "acceptable", "forbidden")
                    if k in rec
                }
                rec["_where"] = f"{path}:{n}"
                out.append(rec)
    except FileNotFoundError:
        problems.add(("cases_from", idx), f"cases_from[{idx}]: case file {path} not found")
    except (OSError, UnicodeDecodeError) as err:
        problems.add(("cases_from", idx), f"cases_from[{idx}]: cannot read {path}: {err}")
    return out


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


def _read_calibration_file(
    ref: str, base: Path | None, problems: _Problems, loc: Sequence[Any], storage: Any = None
) -> list[tuple[dict, Sequence[Any], str | None]]:
    """Labelled responses from a JSONL file of ``{"family", "prompt", "response", "label"}`` (+ optional id).

    Relative paths are relative to the suite, also when the suite itself is an ``s3://`` URI.
    """
    src = problems.source_name
    if not ref.startswith("s3://") and src.startswith("s3://") and not Path(ref).is_absolute():
        ref = src.rsplit("/", 1)[0] + "/" + ref
    if ref.startswith("s3://"):
        from preftune.storage import Storage

        try:
            path = (storage or Storage()).local_path(ref)
        except PreftuneError as err:
            problems.add(loc, f"calibration file {ref}: {err.message}")
            return []
    else:
        path = Path(ref).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        problems.add(loc, f"calibration file {path} not found")
        return []
    except (OSError, UnicodeDecodeError) as err:
        problems.add(loc, f"cannot read calibration file {path}: {err}")
        return []
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = CalibrationItemSpec.model_validate_json(line).model_dump()
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "record"
            problems.items.append(
                f"{path}:{n}: calibration record: {where}: {first['msg']} "
                '(expected {"family", "prompt", "response", "label"}, optional "id")'
            )
            continue
        out.append((rec, loc, f"{path}:{n}"))
    return out


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
