"""The torch device a step runs on, and how many CPU threads torch uses while it runs.

One rule for every step: the configured device, else ``$PREFTUNE_DEVICE``, else a GPU when one
is visible, else the CPU. Asking for CUDA on a machine without one is a config error (exit 2)
naming the setting.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from preftune.errors import ConfigError

ENV_DEVICE = "PREFTUNE_DEVICE"


def select_device(preference: str | None = None, *, setting: str = "device") -> Any:
    """``preference``, else ``$PREFTUNE_DEVICE``, else ``cuda`` when a GPU is visible, else ``cpu`` (a torch.device).

    ``setting`` names the config field in the error (``ppo.device``, ``evaluation.device``).
    """
    import torch

    choice = preference or os.environ.get(ENV_DEVICE)
    if choice:
        dev = torch.device(choice)
        if dev.type == "cuda" and not torch.cuda.is_available():
            where = setting if preference else f"${ENV_DEVICE}"
            raise ConfigError(f"{where} is {choice!r} but no CUDA GPU is visible: set it to cpu or leave it empty")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def torch_threads(threads: int | None, *, deterministic: bool = False) -> Iterator[None]:
    """Pin torch's CPU threads (reproducible float reductions, no oversubscription) and, with
    ``deterministic``, deterministic algorithms, for the duration of a step; then restore both."""
    import torch

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)  # trick: reproducible (and resumable) runs
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        if deterministic:
            torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
