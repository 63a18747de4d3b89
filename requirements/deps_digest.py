"""Print the sha256 of pyproject.toml's dependency lists (what the lock files are made from)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def digest(pyproject: Path = ROOT / "pyproject.toml") -> str:
    project = tomllib.loads(pyproject.read_text())["project"]
    inputs = {
        "requires-python": project.get("requires-python"),
        "dependencies": project["dependencies"],
        "optional-dependencies": {k: project["optional-dependencies"][k] for k in ("dev", "gpu")},
        "torch": {name: (ROOT / "requirements" / f"{name}.in").read_text() for name in ("cpu", "cuda")},
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


if __name__ == "__main__":
    print(digest())
