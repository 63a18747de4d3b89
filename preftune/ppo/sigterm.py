"""SIGTERM during a PPO run (a Kubernetes pod eviction or deletion, a plain ``kill``): checkpoint after the current
update, then exit with :data:`EXIT_TERMINATED`; rerunning the same command resumes from that checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from preftune.errors import PreftuneError

__all__ = ["EXIT_TERMINATED", "Terminated", "install_sigterm"]

EXIT_TERMINATED = 143
"""Exit code after SIGTERM (128 + 15, what Kubernetes and shells expect): a checkpoint was written."""


class Terminated(PreftuneError):
    """SIGTERM arrived: a checkpoint was written, the process should exit."""

    exit_code = EXIT_TERMINATED


class Terminable(Protocol):
    terminate_requested: bool


def install_sigterm(trainer: Terminable) -> Callable[[], None]:
    """SIGTERM asks the trainer to checkpoint after the current update and exit; returns an undo."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
        trainer.terminate_requested = True

    signal.signal(signal.SIGTERM, handler)

    def undo() -> None:
        signal.signal(signal.SIGTERM, previous)

    return undo
