"""PPO checkpoints: full training state, published atomically through the storage layer.

Layout under the checkpoint root (a local folder or ``s3://`` prefix)::

    <root>/
      latest.json            {"format": "preftune.ppo_checkpoint", "version": 1, "update": 20,
                              "path": "update-000020", "history": ["update-000010", "update-000020"],
                              "fingerprint": "<hash of the settings a resume must share>"}
      update-000010/         state.pt (see PPOTrainer.state_dict) + adapter/ (human-inspectable)
      update-000020/

A checkpoint folder is published whole (``Storage.put_dir``: staging + rename locally, a
completion marker on S3) and only *then* does ``latest.json`` (one atomic write) point to it. A
process killed at any instant therefore leaves ``latest.json`` naming a complete checkpoint (or
no ``latest.json`` at all), which is what a restart of the same command resumes from.

``state.pt`` holds only tensors, numbers, strings, lists and dicts, and is read with
``torch.load(weights_only=True)``: a checkpoint fetched from a bucket cannot run code.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.errors import InputError
from preftune.storage import Storage

FORMAT = "preftune.ppo_checkpoint"
VERSION = 1
POINTER = "latest.json"
STATE_FILE = "state.pt"


@dataclass(frozen=True)
class CheckpointInfo:
    update: int
    uri: str
    fingerprint: str


class CheckpointStore:
    """Save, find and fetch checkpoints under one root; keeps the newest ``keep``."""

    def __init__(self, root: str, storage: Storage, keep: int, fingerprint: str) -> None:
        self.root = root.rstrip("/")
        self.storage = storage
        self.keep = keep
        self.fingerprint = fingerprint

    def _uri(self, name: str) -> str:
        return Storage.join(self.root, name)

    def _pointer(self) -> dict[str, Any] | None:
        uri = self._uri(POINTER)
        if not self.storage.exists(uri):
            return None
        try:
            data = json.loads(self.storage.read_text(uri))
        except json.JSONDecodeError as err:
            raise InputError(
                f"{uri}: not valid JSON ({err}); delete the checkpoint folder or use --no-resume"
            ) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
            raise InputError(f"{uri}: not a {FORMAT} v{VERSION} pointer; delete it or use --no-resume")
        return data

    def latest(self) -> CheckpointInfo | None:
        """The newest complete checkpoint, or None."""
        data = self._pointer()
        if data is None:
            return None
        return CheckpointInfo(
            update=int(data["update"]), uri=self._uri(str(data["path"])), fingerprint=str(data.get("fingerprint", ""))
        )

    def save(self, update: int, write: Callable[[Path], None]) -> str:
        """Build a checkpoint with ``write(folder)``, publish it, then move the pointer to it."""
        name = f"update-{update:06d}"
        uri = self._uri(name)
        with tempfile.TemporaryDirectory(prefix="preftune-ppo-ckpt-") as tmp:
            folder = Path(tmp) / name
            folder.mkdir()
            write(folder)
            self.storage.put_dir(folder, uri)
        old = self._pointer()
        history = [h for h in (old or {}).get("history", []) if h != name] + [name]
        pointer = {
            "format": FORMAT,
            "version": VERSION,
            "update": update,
            "path": name,
            "history": history[-self.keep :],
            "fingerprint": self.fingerprint,
        }
        self.storage.write_text(self._uri(POINTER), json.dumps(pointer, indent=2) + "\n")
        for stale in history[: -self.keep]:  # only after the pointer no longer names them
            self.storage.delete(self._uri(stale))
        return uri

    def fetch(self, info: CheckpointInfo, local_dir: Path) -> Path:
        """A local copy of the checkpoint folder (the folder itself when the root is local)."""
        from preftune.storage import parse_uri

        parsed = parse_uri(info.uri)
        if parsed.scheme == "file":
            path = Path(parsed.key)
            if not (path / STATE_FILE).is_file():
                raise InputError(f"{info.uri}: checkpoint has no {STATE_FILE}; delete it or use --no-resume")
            return path
        return self.storage.get_dir(info.uri, local_dir)

    def clear(self) -> None:
        """Forget every checkpoint (``--no-resume``): the pointer first, then the folders."""
        data = self._pointer()
        self.storage.delete(self._uri(POINTER))
        for name in (data or {}).get("history", []):
            self.storage.delete(self._uri(name))


def local_scratch(prefix: str) -> Path:
    """A temporary folder for downloads (the caller removes it with :func:`remove_scratch`)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def remove_scratch(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
