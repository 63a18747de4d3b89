"""Reading a suite and the files it includes, and reporting every problem with its file and line."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from preftune.behaviour.suite_schema import DEMO_PROMPTS, JUDGE_TYPE_NAMES, CalibrationItemSpec
from preftune.errors import ConfigError, PreftuneError


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
