"""observe's logs watermark: a byte offset per file, so a window reads only what was appended --
and a rotated or truncated file is read from the start again (locally and on S3 by ranged GETs)."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from preftune.data.validation import ValidationReport
from preftune.observe import sources
from preftune.storage import Storage


def _line(i: int, answer: str = "Sure, here is how.") -> str:
    return (
        json.dumps(
            {
                "id": f"r{i}",
                "user": "alice@example.com",
                "messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": answer}],
            }
        )
        + "\n"
    )


def _read(path: str, storage: Storage, mark: dict) -> tuple[list, dict, ValidationReport]:
    report = ValidationReport()
    got, new = sources.read_logs(
        path, storage, mark, pii_fields=["user"], version_field="model_version", family_field="family", report=report
    )
    return got, new, report


class _CountingStorage(Storage):
    """A Storage that records whole-file reads (the offset path must not make any for JSONL)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.whole_reads: list[str] = []

    def read_bytes(self, uri):
        self.whole_reads.append(str(uri))
        return super().read_bytes(uri)


def test_appended_lines_are_read_once_and_a_line_being_written_waits(tmp_path):
    log = tmp_path / "serving.jsonl"
    log.write_text("".join(_line(i) for i in range(3)))
    storage = _CountingStorage()
    first, mark, _ = _read(str(log), storage, {})
    assert [r.id for r in first] == ["r0", "r1", "r2"]
    entry = mark[str(log)]
    assert entry["offset"] == log.stat().st_size and entry["lines"] == 3 and entry["inode"] == log.stat().st_ino
    with log.open("a") as fh:  # one whole line, one bad line, and half a line still being written
        fh.write(_line(3) + "{not json\n" + _line(4)[:20])
    second, mark, report = _read(str(log), storage, mark)
    assert [r.id for r in second] == ["r3"] and second[0].where == f"{log}:4"  # numbered from the file's start
    assert report.dropped == {"schema_error": 1}
    with log.open("a") as fh:
        fh.write(_line(4)[20:])
    third, mark, _ = _read(str(log), storage, mark)
    assert [r.id for r in third] == ["r4"] and third[0].where == f"{log}:6"
    assert "alice" not in json.dumps([r.__dict__ for r in first + second + third])
    assert _read(str(log), storage, mark)[0] == []
    assert storage.whole_reads == []  # seeks only, never the whole file again


def test_a_rotated_or_truncated_file_is_read_from_the_start(tmp_path):
    log = tmp_path / "serving.jsonl"
    log.write_text("".join(_line(i) for i in range(4)))
    storage = Storage()
    _, mark, _ = _read(str(log), storage, {})
    # rotation: the old file moved away, a new one (longer than the offset) under the same name
    os.rename(log, tmp_path / "serving.jsonl.1")
    log.write_text("".join(_line(i) for i in range(10, 16)))
    rotated, mark, _ = _read(str(log), storage, mark)
    assert [r.id for r in rotated] == [f"r{i}" for i in range(10, 16)]
    # truncation: the same file cut to zero, then new lines
    with log.open("r+") as fh:
        fh.truncate(0)
    assert _read(str(log), storage, mark)[0] == []  # empty now: nothing to read, and the offset is reset
    log_mark = _read(str(log), storage, mark)[1]
    with log.open("a") as fh:
        fh.write(_line(20))
    assert [r.id for r in _read(str(log), storage, log_mark)[0]] == ["r20"]
    # rewritten in place (same inode), no shorter than before, other first bytes: read from the start
    _, mark, _ = _read(str(log), storage, {})
    with log.open("r+") as fh:
        fh.write(_line(30) + _line(31))
    assert [r.id for r in _read(str(log), storage, mark)[0]] == ["r30", "r31"]


def test_s3_logs_are_read_by_ranged_gets_and_replaced_objects_from_the_start(s3_server, s3_bucket, s3_client):
    storage = _CountingStorage(s3_endpoint_url=s3_server)
    uri = f"s3://{s3_bucket}/logs/day.jsonl"
    body = "".join(_line(i) for i in range(5))
    s3_client.put_object(Bucket=s3_bucket, Key="logs/day.jsonl", Body=body.encode())
    first, mark, _ = _read(f"s3://{s3_bucket}/logs", storage, {})
    assert [r.id for r in first] == [f"r{i}" for i in range(5)]
    body += _line(5) + _line(6)  # the application appended (an S3 object is rewritten whole)
    s3_client.put_object(Bucket=s3_bucket, Key="logs/day.jsonl", Body=body.encode())
    second, mark, _ = _read(f"s3://{s3_bucket}/logs", storage, mark)
    assert [r.id for r in second] == ["r5", "r6"] and second[0].where == f"{uri}:6"
    assert storage.whole_reads == []  # ranged GETs only
    assert _read(f"s3://{s3_bucket}/logs", storage, mark)[0] == []
    # replaced by another object at least as long: other first bytes, read from the start
    replaced = "".join(_line(i, "No.") for i in range(100, 108))
    s3_client.put_object(Bucket=s3_bucket, Key="logs/day.jsonl", Body=replaced.encode())
    again, mark, _ = _read(f"s3://{s3_bucket}/logs", storage, mark)
    assert [r.id for r in again] == [f"r{i}" for i in range(100, 108)]
    # truncated (shorter than the offset): read from the start
    s3_client.put_object(Bucket=s3_bucket, Key="logs/day.jsonl", Body=_line(200).encode())
    assert [r.id for r in _read(f"s3://{s3_bucket}/logs", storage, mark)[0]] == ["r200"]


def test_compressed_logs_are_read_whole_and_an_older_record_count_watermark_is_honoured(tmp_path):
    storage = Storage()
    gz = tmp_path / "day.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(_line(i) for i in range(4)).encode()))
    first, mark, _ = _read(str(gz), storage, {})
    assert len(first) == 4 and mark[str(gz)]["records"] == 4
    assert _read(str(gz), storage, mark)[0] == []
    gz.write_bytes(gzip.compress("".join(_line(i) for i in range(6)).encode()))  # re-compressed with 2 more
    assert [r.id for r in _read(str(gz), storage, mark)[0]] == ["r4", "r5"]
    plain = tmp_path / "old.jsonl"
    plain.write_text("".join(_line(i) for i in range(5)))
    got, new, _ = _read(str(plain), storage, {str(plain): 3})  # what an older observe stored: records read
    assert [r.id for r in got] == ["r3", "r4"] and new[str(plain)]["offset"] == plain.stat().st_size


@pytest.mark.parametrize("mark", [{"offset": 10**9, "size": 10**9}, {}])
def test_a_missing_offset_or_a_huge_one_never_loses_the_file(tmp_path, mark):
    log = tmp_path / "x.jsonl"
    log.write_text(_line(1))
    got, _, _ = _read(str(log), Storage(), {str(log): mark} if mark else {})
    assert [r.id for r in got] == ["r1"]
