"""Reading only what was appended to a log file since the last window: a byte offset per file.

The watermark keeps, per file URI, ``{"offset", "size", "lines", "head", "inode"}``: the byte offset
up to which complete lines were read, the file's size then, the number of lines before the offset
(for ``file:line`` locations), a SHA-256 of the file's first bytes (``HEAD_BYTES``, or fewer when
the offset is smaller) and, for a local file, its inode. A window then reads ``[offset, size)`` only
(a seek locally, a ranged GET on S3), up to the last newline: a line the serving application is
still writing is read whole by the next window.

A file is read from byte 0 again when it is not the file the watermark saw: it is shorter than the
offset (truncated), its inode changed (rotated: a new file under the old name), or its first bytes
differ (rotated or rewritten with the same size or more, e.g. an S3 object replaced). Compressed
(gzip, zstd), Parquet, CSV and JSON-array files cannot be read from an offset: they are read whole
when their size changed, and only the records past the stored count (``records``) are new, unless
the file was truncated or (locally) replaced; fewer records than the count means a new file too.
A watermark written by an older observe (a record count per file) is honoured the same way once.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from typing import Any

from preftune.data.formats.containers import container_of
from preftune.storage.uri import parse_uri

HEAD_BYTES = 1024
"""How many leading bytes identify a file (hashed into the watermark)."""

_WHOLE_MAGIC = (b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"PAR1")  # gzip, zstd, parquet: no byte offsets


@dataclass(frozen=True)
class Chunk:
    """What a window reads of one file: ``data`` starts at byte ``start`` (line ``first_line``)."""

    uri: str
    data: bytes
    start: int
    first_line: int  # lines before ``start`` (0 at the file's beginning)
    skip_records: int  # records at the chunk's start already seen (whole-file reads, an older watermark)
    mark: dict[str, Any]  # the file's watermark once this chunk is read
    whole: bool = False  # not JSONL: the whole file, its first ``skip_records`` records seen before
    reset: str | None = None  # why the file is read from 0 again ("truncated", "rotated"), if it is


def _is_s3(uri: str) -> bool:
    return parse_uri(uri).scheme == "s3"


def _stat(uri: str, storage: Any) -> tuple[int, int | None]:
    """(size, inode or None) of the file."""
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        st = os.stat(parsed.key)
        return st.st_size, st.st_ino
    backend = storage.s3_backend
    with backend._s3_errors(uri, "read"):
        head = backend.client(uri).head_object(Bucket=parsed.bucket, Key=parsed.key)
    return int(head["ContentLength"]), None


def read_range(uri: str, storage: Any, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of the file: a seek locally, a ranged GET on S3."""
    if end <= start:
        return b""
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        with open(parsed.key, "rb") as fh:
            fh.seek(start)
            return fh.read(end - start)
    backend = storage.s3_backend
    with backend._s3_errors(uri, "read"):
        answer = backend.client(uri).get_object(Bucket=parsed.bucket, Key=parsed.key, Range=f"bytes={start}-{end - 1}")
        return answer["Body"].read()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def next_chunk(uri: str, storage: Any, mark: Any) -> Chunk:
    """The part of ``uri`` not read yet under its watermark entry ``mark`` (None: never read)."""
    size, inode = _stat(uri, storage)
    legacy = isinstance(mark, int)  # an older watermark: records read, no offset
    prev = {} if legacy or not isinstance(mark, dict) else mark
    offset = int(prev.get("offset", 0))
    reset = None
    if prev:
        if size < offset:
            reset = "truncated"
        elif inode is not None and prev.get("inode") not in (None, inode):
            reset = "rotated"
    head_len = min(HEAD_BYTES, size)
    head = read_range(uri, storage, 0, head_len)
    if head.startswith(_WHOLE_MAGIC) or container_of(uri, head) != "jsonl":
        # re-compressed or re-written whole on every change: neither the first bytes nor the size say
        # whether it is the same file; the inode and the record count do (see read_logs)
        reset = "rotated" if reset == "rotated" else None
        seen = mark if legacy else (0 if reset else int(prev.get("records", 0)))
        if prev and reset is None and size == int(prev.get("size", -1)):
            data = b""  # unchanged since the last window
        else:
            data = storage.read_bytes(uri)
        new = {"offset": size, "size": size, "records": seen, "lines": 0, "head": _digest(head), "head_len": head_len}
        return Chunk(uri, data, 0, 0, seen, {**new, "inode": inode}, whole=True, reset=reset)
    if prev and reset is None:
        known = int(prev.get("head_len", 0))
        if known and (known > len(head) or _digest(head[:known]) != prev.get("head")):
            reset = "rotated"
    if legacy or reset:
        offset, lines = 0, 0
    else:
        lines = int(prev.get("lines", 0))
    data = read_range(uri, storage, offset, size) if size > offset else b""
    end = data.rfind(b"\n") + 1  # complete lines only; a line being written waits for the next window
    data = data[:end]
    new = {
        "offset": offset + end,
        "size": size,
        "lines": lines + data.count(b"\n"),
        "head": _digest(head),
        "head_len": head_len,
        "inode": inode,
    }
    return Chunk(uri, data, offset, lines, mark if legacy else 0, new, reset=reset)


def from_start(chunk: Chunk) -> Chunk:
    """``chunk`` read as a new file (a whole-file read that holds fewer records than were read before)."""
    return replace(chunk, skip_records=0, reset="rotated")
