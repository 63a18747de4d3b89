"""Run the ``preference-retraining`` pipeline with kfp's local runner (no cluster, no Docker).

Every step runs as a subprocess of this interpreter (``SubprocessRunner(use_venv=False)``): the
same components as on a cluster, with the same inputs, conditions and step cache. Outputs go
under ``<preftune home>/pipelines/runs``, the step cache under ``<preftune home>/pipelines/cache``.

The local runner prints every task's inputs and logs; they go to a log file per run
(``<home>/pipelines/logs/<pipeline run id>.log``) and the console shows one line per task,
unless ``verbose``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import RunConfig

_TASK_START = re.compile(r"Executing task .*?'([\w-]+)'")
_TASK_END = re.compile(r"Task .*?'([\w-]+)'.* finished with status .*?(SUCCESS|FAILURE)")
_CACHE_HIT = re.compile(r"Task ([\w-]+) cache hit")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class LocalRun:
    """What a local pipeline run did."""

    pipeline_run_id: str
    outcome: dict[str, Any] | None
    log_path: Path
    seconds: float
    task_seconds: dict[str, float] = field(default_factory=dict)
    cached_tasks: list[str] = field(default_factory=list)
    kfp_error: str | None = None


TASK_ENV = {
    # Tasks run as `python -m ...` in the caller's working directory. Run from a clone of the repo
    # with preftune installed (`pip install .`), the clone's `preftune/` folder would shadow the
    # installed package, which alone has `preftune.components`: keep the working directory off
    # sys.path (Python >= 3.11), so every task imports the installed preftune.
    "PYTHONSAFEPATH": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def pipelines_home() -> Path:
    from preftune.home import preftune_home

    return preftune_home() / "pipelines"


class _TaskTracker(io.TextIOBase):
    """A stdout stand-in: everything goes to the log file; task starts and ends become one line each."""

    def __init__(self, log: TextIO, notify: Callable[[str, str, float | None], None] | None, echo: TextIO | None):
        self._log, self._notify, self._echo = log, notify, echo
        self._buf = ""
        self._started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.cached: list[str] = []

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._log.write(text)
        if self._echo is not None:
            self._echo.write(text)
        self._buf += text
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self._line(_ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        self._log.flush()
        if self._echo is not None:
            self._echo.flush()

    def _line(self, line: str) -> None:
        if m := _TASK_START.search(line):
            self._started[m.group(1)] = time.perf_counter()
            if self._notify:
                self._notify(m.group(1), "started", None)
        elif m := _TASK_END.search(line):
            name = m.group(1)
            took = time.perf_counter() - self._started.get(name, time.perf_counter())
            self.seconds[name] = took
            if self._notify:
                self._notify(name, "succeeded" if m.group(2) == "SUCCESS" else "failed", took)
        elif m := _CACHE_HIT.search(line):
            self.cached.append(m.group(1))


@contextlib.contextmanager
def _kfp_logging(stream: TextIO) -> Iterator[None]:
    """kfp logs through the root logger (INFO) and prints; send both to ``stream`` for the run."""
    import logging

    root = logging.getLogger()
    old_level = root.level
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(stream):
            yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def run_local(
    cfg: RunConfig,
    *,
    notify: Callable[[str, str, float | None], None] | None = None,
    verbose: bool = False,
    root: str | Path | None = None,
) -> LocalRun:
    """Run the pipeline for ``cfg`` locally and return its outcome (read from its MLflow run).

    The caller checks the run first (:func:`preftune.pipeline.preflight.preflight` with ``local=True``).
    ``notify(task, "started" | "succeeded" | "failed", seconds)`` is called as tasks start and end.
    """
    from kfp import local
    from preftune.pipelines.retraining import build_pipeline, pipeline_parameters

    from preftune import tracking
    from preftune.pipeline.context import environ
    from preftune.pipeline.lifecycle import read_outcome

    base = Path(root) if root is not None else pipelines_home()
    (base / "logs").mkdir(parents=True, exist_ok=True)
    pid = f"local-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    log_path = base / "logs" / f"{pid}.log"
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(base / "runs"),
        raise_on_error=False,
        enable_caching=bool(cfg.kubernetes.caching),
        cache_root=str(base / "cache"),
    )
    pipeline = build_pipeline(cfg, target="local")
    t0 = time.perf_counter()
    kfp_error = None
    env = {
        tracking.ENV_PIPELINE_RUN_ID: pid,
        tracking.ENV_PARENT_RUN_ID: None,
        **TASK_ENV,
        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false"),
    }
    with open(log_path, "w", encoding="utf-8") as log, environ(**env), warnings.catch_warnings():
        # The subprocess runner warns that the preftune image is not a Python image (it runs this
        # interpreter instead, which has preftune), and that resources have no local effect.
        warnings.filterwarnings("ignore", message=".*base image.*", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
        tracker = _TaskTracker(log, notify, sys.__stdout__ if verbose else None)
        with _kfp_logging(tracker):
            try:
                pipeline(config=pipeline_parameters(cfg)["config"])
            except Exception as err:  # noqa: BLE001 - the local runner's own errors; the outcome says more
                kfp_error = f"{type(err).__name__}: {err}"
                print(kfp_error, file=log)
        tracker.flush()
        outcome = None
        with contextlib.suppress(Exception):
            outcome = read_outcome(cfg, pid)
    return LocalRun(
        pipeline_run_id=pid,
        outcome=outcome,
        log_path=log_path,
        seconds=time.perf_counter() - t0,
        task_seconds=dict(tracker.seconds),
        cached_tasks=list(tracker.cached),
        kfp_error=kfp_error,
    )
