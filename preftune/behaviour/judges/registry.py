"""The judge registry: one small named type per way of recognising a behaviour.

Like verl's ``core_algos`` registry of advantage estimators, a judge type is registered by name
(``@register_judge("rules", spec=RulesJudgeSpec)``) with

- ``spec``: the pydantic model of its suite section (its ``type`` field is the discriminator);
- ``labels(spec, family, judges)``: the behaviours it can output for a family, known without
  loading a model (None: only known once the model is loaded), so role typos fail at suite
  validation (``judges``: every judge spec of the suite, for ensembles);
- ``check(name, spec, ctx)``: static problems (paths, patterns, rubric coverage), as
  ``(location, message)`` pairs the suite reports with the file and line;
- the decorated ``build(name, spec, ctx)``: the loaded judge, before any generation.

Every judge has one job: for each (family, prompt, response) return a behaviour name or
``"unknown"``; ``"unknown"`` is counted and can be gated, never dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from preftune.errors import ConfigError, PreftuneError

UNKNOWN = "unknown"
BEHAVIOUR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StrictSpec(BaseModel):
    """A judge's suite section: unknown fields are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")


class Judge(Protocol):
    name: str

    def judge(self, family: str, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        """One behaviour name (or ``"unknown"``) per response."""


@dataclass
class CheckContext:
    """What a static check may consult: the suite's folder, the run's reward model, the other judges."""

    base_dir: Path | None
    reward_model: str | None
    judges: dict[str, Any]
    families: dict[str, Any]  # family name -> FamilySpec (raw, as written)


@dataclass
class BuildContext:
    """What building a judge may use: the resolved suite, per-family label filters, device, built judges."""

    suite: Any
    allowed: dict[str, set[str] | None]
    device: Any = "cpu"
    storage: Any = None
    reward_model: str | None = None
    built: dict[str, Judge] = field(default_factory=dict)


Problem = tuple[Sequence[Any], str]


@dataclass(frozen=True)
class JudgeType:
    name: str
    spec: type[BaseModel]
    build: Callable[[str, Any, BuildContext], Judge]
    labels: Callable[[Any, str, dict[str, Any]], set[str] | None]
    check: Callable[[str, Any, CheckContext], list[Problem]]
    members: Callable[[Any], list[str]]


JUDGE_TYPES: dict[str, JudgeType] = {}


def register_judge(
    name: str,
    *,
    spec: type[BaseModel],
    labels: Callable[[Any, str, dict[str, Any]], set[str] | None] | None = None,
    check: Callable[[str, Any, CheckContext], list[Problem]] | None = None,
    members: Callable[[Any], list[str]] | None = None,
) -> Callable[[Callable[[str, Any, BuildContext], Judge]], Callable[[str, Any, BuildContext], Judge]]:
    """Register ``build`` as the judge type ``name`` (its spec's ``type`` literal must be ``name``)."""

    def deco(build: Callable[[str, Any, BuildContext], Judge]) -> Callable[[str, Any, BuildContext], Judge]:
        if name in JUDGE_TYPES:
            raise ValueError(f"judge type {name!r} is already registered")
        JUDGE_TYPES[name] = JudgeType(
            name=name,
            spec=spec,
            build=build,
            labels=labels or (lambda s, f, js: None),
            check=check or (lambda n, s, c: []),
            members=members or (lambda s: []),
        )
        return build

    return deco


def judge_type(spec: Any) -> JudgeType:
    return JUDGE_TYPES[spec.type]


def check_model_path(path: str, base: Path | None) -> Path | None:
    """The local folder of a model path (relative to the suite), or None when it does not exist."""
    if path.startswith(("s3://", "demo:", "models:/")):
        return Path(path)  # resolved (and checked) when the judge is loaded, still before generation
    p = Path(path).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    return p if p.exists() else None


def resolve_judge_path(path: str, suite: Any) -> str:
    """A judge's model path as given in the suite, made absolute against the suite's folder."""
    if "://" in path or path.startswith("demo:"):
        return path
    p = Path(path).expanduser()
    if not p.is_absolute() and not suite.source.startswith("s3://"):
        p = Path(suite.source).resolve().parent / p
    return str(p)


def local_model_path(path: str, storage: Any) -> str:
    """A local folder for a model path: s3:// is fetched, demo: resolved; a missing folder is a ConfigError."""
    if path.startswith("s3://"):
        from preftune.storage import Storage

        try:
            return str((storage or Storage()).local_path(path))
        except PreftuneError as err:
            raise ConfigError(f"cannot fetch model {path}: {err.message}") from None
    if path.startswith("demo:"):
        from preftune.world import resolve_model_ref

        return str(resolve_model_ref(path))
    if not Path(path).exists():
        raise ConfigError(f"model path {path} does not exist")
    return path
