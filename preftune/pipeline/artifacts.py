"""Files the components write for Kubeflow: a Metrics artifact's file, copies, metric names."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path


def write_metrics_file(path: str, metrics: Mapping[str, float]) -> None:
    """A Metrics artifact's file (the local step cache reuses an output only when its file exists)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(dict(metrics), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def copy_file(src: str | Path, dst: str) -> bool:
    """Copy ``src`` to an artifact path (False when ``src`` is missing)."""
    if not Path(src).is_file():
        return False
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return True


def metric_key(name: str) -> str:
    """A name Kubeflow's metrics UI accepts (letters, digits, '.', '_', '-')."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
