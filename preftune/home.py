"""The preftune home: where the demo world, the local MLflow store and caches live."""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "PREFTUNE_HOME"


def preftune_home() -> Path:
    """``$PREFTUNE_HOME`` if set, else ``~/.preftune``; created on first use."""
    home = Path(os.environ.get(ENV_HOME) or Path.home() / ".preftune").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home
