"""observe's own state, kept beside the artifacts: the logs watermark and the window history.

``<state>/watermark.json``: ``{"files": {uri: {"offset", "size", "lines", "head", "head_len", "inode"[,
"records"]}}, "last_end_ms": int | null}`` (the byte offset read up to and what identifies the file:
:mod:`preftune.observe.tail`).
``<state>/history.jsonl``: one line a window: ``{"window", "start", "end", "model_version",
"counts": {family: {behaviour: n}}, "verdict"}`` (what the "recent windows" baseline pools).
Both are written only after the window's MLflow run is complete, so a failed window is read again.
"""

from __future__ import annotations

import json
from typing import Any


class ObserveState:
    def __init__(self, storage: Any, root: str):
        self.storage, self.root = storage, root.rstrip("/")

    def _read_json(self, name: str, default: Any) -> Any:
        uri = f"{self.root}/{name}"
        if not self.storage.exists(uri):
            return default
        return json.loads(self.storage.read_text(uri))

    def watermark(self) -> dict[str, Any]:
        return self._read_json("watermark.json", {"files": {}, "last_end_ms": None})

    def history(self) -> list[dict[str, Any]]:
        uri = f"{self.root}/history.jsonl"
        if not self.storage.exists(uri):
            return []
        return [json.loads(line) for line in self.storage.read_text(uri).splitlines() if line.strip()]

    def save(self, watermark: dict[str, Any], window: dict[str, Any]) -> None:
        history = self.history() + [window]
        self.storage.write_text(
            f"{self.root}/history.jsonl", "".join(json.dumps(h, sort_keys=True) + "\n" for h in history)
        )
        self.storage.write_text(f"{self.root}/watermark.json", json.dumps(watermark, sort_keys=True, indent=2))
