"""What every component body does around its step (kfp-free, imported inside the component functions).

A component's code is shipped to the pod as the source of one function, so it imports from
here at run time (the preftune image has the package installed). The helpers turn user errors
into the contract's exit codes with one line on stderr (no traceback), and write the typed
outputs the way both Kubeflow and its local runner expect (every output artifact has a file or
folder at its path, otherwise the local step cache ignores the entry).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def call(fn: Callable[..., Any], /, **kwargs: Any) -> Any:
    """Run a step (a :mod:`preftune.pipeline` function); a PreftuneError exits the task with its code and one line."""
    from preftune.errors import PreftuneError

    try:
        return fn(**kwargs)
    except PreftuneError as err:
        print(f"error: {err.message}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)


def write_text(path: str, text: str) -> None:
    """A text artifact (Markdown, HTML), newline-terminated."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def write_param(path: str, value: str) -> None:
    """An output parameter's file: its exact value (the executor reads the file as it is)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(str(value), encoding="utf-8")


def write_metrics(artifact: Any, metrics: Mapping[str, float]) -> None:
    """Log ``metrics`` on a kfp Metrics artifact (shown by the Kubeflow UI) and write them to its file."""
    from preftune.pipeline.artifacts import metric_key, write_metrics_file

    clean = {metric_key(k): float(v) for k, v in metrics.items()}
    for k, v in clean.items():
        artifact.log_metric(k, v)
    write_metrics_file(artifact.path, clean)
