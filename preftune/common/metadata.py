"""Reading the metadata JSON a published folder carries (``dataset.json``, ``reward_model.json``, ``ppo_policy.json``).

Every reader fails the same way, with one line naming the file: missing (``missing``: what the
folder is not and how to make one), unreadable, not the expected ``format``, or another
``version`` than this preftune reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from preftune.errors import InputError


def read_metadata_json(
    path: str | Path,
    *,
    fmt: str,
    version: int | None = None,
    missing: str,
    what: str = "metadata",
) -> dict[str, Any]:
    """The JSON object at ``path``, checked for ``format == fmt`` (and ``version`` when given).

    ``missing``: the message when the file is not there (the caller knows what the folder should
    be); ``what``: how the file is named in the "cannot read" message.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(missing) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot read {what}: {err}") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        got = data.get("format") if isinstance(data, dict) else data
        raise InputError(f"{path}: expected format {fmt!r}, got {got!r}")
    if version is not None and data.get("version") != version:
        raise InputError(f"{path}: unsupported {fmt} version {data.get('version')!r} (this preftune reads {version})")
    return data


DATASET_FILE = "dataset.json"
DATASET_FORMAT = "preftune.dataset"
DATASET_VERSION = 1


def read_dataset_json(root: str | Path, name: str | None = None) -> dict[str, Any]:
    """``dataset.json`` of a local preference-dataset folder (``name``: how to call the dataset in errors)."""
    root = Path(root)
    return read_metadata_json(
        root / DATASET_FILE,
        fmt=DATASET_FORMAT,
        version=DATASET_VERSION,
        missing=f"{name or root}: not a preftune dataset (no {DATASET_FILE}); create one with `preftune collect`",
    )
