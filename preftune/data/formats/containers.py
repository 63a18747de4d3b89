"""Containers: how records are stored, whatever their format.

A *file* is JSONL (one JSON object a line), a JSON array, Parquet, CSV (a header row; cells that
hold JSON -- numbers, ``true``/``false``, lists, objects -- are decoded) or an Arrow stream (the
shards ``datasets.save_to_disk`` writes), optionally gzip- or zstd-compressed (by magic bytes,
not name). A *folder* (local or an s3:// prefix) is a set of shards read in name order; a
``datasets.save_to_disk`` folder (``state.json`` naming its ``data-*.arrow`` files) is read as
that dataset. Each record is yielded with ``file:line`` (line = row for tabular files, 1-based).

Bytes are decoded line by line, so one badly encoded line is one dropped record
(``invalid_utf8``), not a failed import.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from typing import Any

from preftune.data.validation import ValidationReport
from preftune.errors import InputError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PARQUET_MAGIC = b"PAR1"
ARROW_STREAM_MAGIC = b"\xff\xff\xff\xff"  # an IPC stream's first message (continuation marker)
ARROW_FILE_MAGIC = b"ARROW1"
SHARD_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet", ".csv", ".arrow", ".gz", ".zst", ".zstd")


def decompress(uri: str, data: bytes) -> bytes:
    """Gzip or zstd bytes, uncompressed (by their magic bytes); anything else unchanged."""
    if data[:2] == GZIP_MAGIC:
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise InputError(f"{uri}: a gzip file that cannot be decompressed ({err})") from None
    if data[:4] == ZSTD_MAGIC:
        import zstandard

        try:
            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
        except zstandard.ZstdError as err:
            raise InputError(f"{uri}: a zstd file that cannot be decompressed ({err})") from None
    return data


def _base_name(uri: str) -> str:
    name = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    for suffix in (".gz", ".zst", ".zstd"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def container_of(uri: str, data: bytes) -> str:
    """``parquet``, ``arrow``, ``csv``, ``json-array`` or ``jsonl`` for uncompressed bytes."""
    name = _base_name(uri)
    if data[:4] == PARQUET_MAGIC:
        return "parquet"
    if data[:4] == ARROW_STREAM_MAGIC or data[:6] == ARROW_FILE_MAGIC or name.endswith(".arrow"):
        return "arrow"
    if name.endswith(".csv"):
        return "csv"
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if head == b"[":
        return "json-array"
    return "jsonl"


def read_raw_records(uri: str, data: bytes, report: ValidationReport) -> Iterator[tuple[str, Any]]:
    """Yield ``(file:line, parsed value)`` for each record of one file; bad lines go to ``report``."""
    data = decompress(uri, data)
    kind = container_of(uri, data)
    if kind == "parquet":
        yield from _table_records(uri, _read_parquet(uri, data), report)
    elif kind == "arrow":
        yield from _table_records(uri, _read_arrow(uri, data), report)
    elif kind == "csv":
        yield from _csv_records(uri, data, report)
    elif kind == "json-array":
        yield from _json_array_records(uri, data, report)
    else:
        yield from _jsonl_records(uri, data, report)


def _jsonl_records(uri: str, data: bytes, report: ValidationReport) -> Iterator[tuple[str, Any]]:
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark is not content
        data = data[3:]
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        where = f"{uri}:{lineno}"
        report.records_read += 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            report.drop("invalid_utf8", where, f"byte {err.start} of the line: {err.reason}")
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            report.drop("schema_error", where, f"not valid JSON ({err.msg} at column {err.colno})")
            continue
        yield where, value


def _json_array_records(uri: str, data: bytes, report: ValidationReport) -> Iterator[tuple[str, Any]]:
    try:
        values = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(
            f"{uri}: a JSON array file that does not parse ({err}); JSONL needs one object a line"
        ) from None
    for i, value in enumerate(values, start=1):  # "line" = the record's 1-based index in the array
        report.records_read += 1
        yield f"{uri}:{i}", value


def _decode_cell(cell: str) -> Any:
    text = cell.strip()
    if text[:1] in ("[", "{") or text in ("true", "false", "null"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return cell
    return cell  # numbers stay text: converters accept numeric strings where they want numbers


def _csv_records(uri: str, data: bytes, report: ValidationReport) -> Iterator[tuple[str, Any]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{uri}: a CSV file that is not UTF-8 (byte {err.start})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for rec in reader:
        report.records_read += 1
        where = f"{uri}:{reader.line_num}"
        if None in rec:
            report.drop("schema_error", where, "the row has more cells than the header")
            continue
        yield where, {k: _decode_cell(v) if isinstance(v, str) else v for k, v in rec.items()}


def _read_parquet(uri: str, data: bytes) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{uri}: not a readable Parquet file ({err})") from None


def _read_arrow(uri: str, data: bytes) -> Any:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        if data[:6] == ARROW_FILE_MAGIC:
            return ipc.open_file(pa.BufferReader(data)).read_all()
        return ipc.open_stream(pa.BufferReader(data)).read_all()
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{uri}: not a readable Arrow file ({err})") from None


def _table_records(uri: str, table: Any, report: ValidationReport) -> Iterator[tuple[str, Any]]:
    for row, rec in enumerate(table.to_pylist(), start=1):
        report.records_read += 1
        yield f"{uri}:{row}", rec


def expand_inputs(uri: str, storage: Any) -> list[str]:
    """The files to read for ``uri``: itself, a folder's shards in name order, or the shards a
    ``datasets.save_to_disk`` folder's ``state.json`` names."""
    files = storage.list(uri)
    if not files:
        return [uri]  # a file (reading it names a missing one in the storage's own words)
    base = uri.rstrip("/")
    if "dataset_dict.json" in files:
        splits = sorted({f.split("/", 1)[0] for f in files if "/" in f})
        raise InputError(
            f"{uri}: a datasets DatasetDict with splits {', '.join(splits)}: import one split's folder, "
            f"e.g. {base}/{splits[0] if splits else 'train'}"
        )
    if "state.json" in files:
        state = json.loads(storage.read_bytes(f"{base}/state.json"))
        names = [f["filename"] for f in state.get("_data_files", [])]
        if not names:
            raise InputError(f"{base}/state.json lists no data files (not a datasets.save_to_disk folder?)")
        return [f"{base}/{name}" for name in names]
    shards = [f for f in files if f.lower().endswith(SHARD_SUFFIXES) and not f.rsplit("/", 1)[-1].startswith(".")]
    if not shards:
        raise InputError(f"{uri}: a folder with no data files (expected {', '.join(SHARD_SUFFIXES)})")
    return [f"{base}/{f}" for f in shards]
