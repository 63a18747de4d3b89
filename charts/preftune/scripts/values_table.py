"""Write the values table of charts/preftune/README.md from values.schema.json and values.yaml.

    python charts/preftune/scripts/values_table.py          # rewrite the table in the README
    python charts/preftune/scripts/values_table.py --check  # exit 1 when the README's table is stale

One row per leaf of the schema: the key, its type (with enum, pattern or bounds), the default from
values.yaml and the description (the schema's, else the values.yaml comment starting with ``# --``).
The table sits between the BEGIN/END markers; tests/test_chart.py runs ``--check``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[1]
BEGIN = "<!-- BEGIN values table (charts/preftune/scripts/values_table.py) -->"
END = "<!-- END values table -->"


def _comments(values_text: str) -> dict[str, str]:
    """``# --`` comments of values.yaml by dotted key (the comment block right above a key)."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    for line in values_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = [stripped[4:].strip()]
            continue
        if stripped.startswith("#") and pending:
            pending.append(stripped[1:].strip())
            continue
        m = re.match(r"^(\s*)([A-Za-z0-9_]+):", line)
        if not m:
            pending = []
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        if pending:
            out[".".join(k for _, k in stack)] = " ".join(pending)
        pending = []
    return out


def _type(s: dict[str, Any]) -> str:
    if "anyOf" in s or "oneOf" in s:
        return " or ".join(_type(x) for x in s.get("anyOf") or s.get("oneOf"))
    t = s.get("type", "any")
    t = "/".join(t) if isinstance(t, list) else t
    extra = []
    if "enum" in s:
        extra.append("one of " + ", ".join(f"`{e}`" for e in s["enum"]))
    for k, sym in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<=")):
        if k in s:
            extra.append(f"{sym} {s[k]}")
    if t == "array" and isinstance(s.get("items"), dict) and "type" in s["items"]:
        t = f"array of {s['items']['type']}"
    return t + (f" ({'; '.join(extra)})" if extra else "")


def rows(schema: dict[str, Any], values: Any, comments: dict[str, str], prefix: str = "") -> list[str]:
    out = []
    for key, sub in (schema.get("properties") or {}).items():
        path = f"{prefix}{key}"
        default = values.get(key) if isinstance(values, dict) else None
        if sub.get("type") == "object" and sub.get("properties"):
            out += rows(sub, default, comments, path + ".")
            continue
        desc = sub.get("description") or comments.get(path, "")
        shown = json.dumps(default) if default not in (None, "", [], {}) else f"`{json.dumps(default)}`"
        if default not in (None, "", [], {}):
            shown = f"`{shown}`"
        desc = desc.replace("|", "\\|")
        out.append(f"| `{path}` | {_type(sub)} | {shown} | {desc} |")
    return out


def table() -> str:
    schema = json.loads((CHART / "values.schema.json").read_text())
    text = (CHART / "values.yaml").read_text()
    lines = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    lines += rows(schema, yaml.safe_load(text), _comments(text))
    return "\n".join(lines)


def render(readme: str) -> str:
    block = f"{BEGIN}\n{table()}\n{END}"
    if BEGIN in readme:
        head, rest = readme.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    return readme.rstrip("\n") + "\n\n## All values\n\n" + block + "\n"


def main(argv: list[str]) -> int:
    path = CHART / "README.md"
    current = path.read_text()
    wanted = render(current)
    if "--check" in argv:
        if current != wanted:
            print("charts/preftune/README.md: the values table is stale; run charts/preftune/scripts/values_table.py")
            return 1
        return 0
    path.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
