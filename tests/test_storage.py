"""The storage layer against local folders and a real S3-compatible server (moto, own process).

The code under test only gets the server's endpoint URL. Transient failures come from a
real HTTP proxy on loopback that answers 503 or drops the connection for the first
requests and then forwards to the server.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from preftune import storage as storage_mod
from preftune.config import StorageSection
from preftune.errors import CredentialsError, ExitCode, StorageError, UnreachableError
from preftune.storage import (
    MARKER_NAME,
    ParsedURI,
    Storage,
    atomic_write_bytes,
    atomic_write_text,
    parse_uri,
)
from preftune.storage import local as storage_local
from preftune.storage import s3 as storage_s3

# Fixtures s3_server, s3_client and s3_bucket: tests/support/s3.py, imported by tests/conftest.py.

# --------------------------------------------------------------------------------------
# helpers


def _leftovers(folder: Path) -> list[str]:
    """Hidden temp files/folders the storage layer might have left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


MODEL_V1 = {
    "config.json": b'{"model_type": "gpt2"}',
    "model.safetensors": os.urandom(200_000),
    "tokenizer/vocab.json": '{"é": 1}'.encode(),
    "tokenizer/merges.txt": b"a b\n",
}
MODEL_V2 = {
    "config.json": b'{"model_type": "gpt2", "n_layer": 3}',
    "model.safetensors": os.urandom(150_000),
    "extra/deep/nested.bin": b"\x00\x01\x02",
}


@pytest.fixture
def s3(s3_server: str) -> Storage:
    return Storage(s3_endpoint_url=s3_server, max_attempts=3, connect_timeout=5, read_timeout=20)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FlakyProxy:
    """A loopback HTTP proxy that fails the first ``fail_first`` requests, then forwards.

    ``mode="503"`` answers them with 503 Service Unavailable; ``mode="drop"`` closes the
    connection without an answer (what a restarting endpoint or load balancer does).
    """

    def __init__(self, upstream: str, fail_first: int, mode: str = "503"):
        self.upstream = urlsplit(upstream)
        self.fail_first = fail_first
        self.mode = mode
        self.failed = 0
        self.forwarded = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy.lock:
                    fail = proxy.failed < proxy.fail_first
                    if fail:
                        proxy.failed += 1
                    else:
                        proxy.forwarded += 1
                if fail and proxy.mode == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fail:
                    payload = b"<Error><Code>ServiceUnavailable</Code><Message>try again</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for key, value in resp.getheaders():
                        if key.lower() in ("transfer-encoding", "connection", "content-length", "server", "date"):
                            continue
                        self.send_header(key, value)
                    if self.command == "HEAD":
                        self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
                    else:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FlakyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------------------
# URIs


def test_parse_uri_plain_paths_file_and_s3(tmp_path: Path) -> None:
    assert parse_uri(str(tmp_path / "a")) == ParsedURI("file", "", str(tmp_path / "a"))
    assert parse_uri(tmp_path / "a") == ParsedURI("file", "", str(tmp_path / "a"))
    assert parse_uri("relative/dir") == ParsedURI("file", "", "relative/dir")
    assert parse_uri("file:///data/x.jsonl") == ParsedURI("file", "", "/data/x.jsonl")
    assert parse_uri("file://localhost/data/x") == ParsedURI("file", "", "/data/x")
    assert parse_uri("~/x").key == os.path.expanduser("~/x")
    assert parse_uri("s3://bucket/a/b/") == ParsedURI("s3", "bucket", "a/b")
    assert parse_uri("S3://bucket") == ParsedURI("s3", "bucket", "")


@pytest.mark.parametrize("uri", ["gs://bucket/x", "http://example.com/x", "s3a://bucket/x", "hdfs://nn/x"])
def test_unknown_scheme_is_one_clear_line(uri: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError) as info:
        Storage().write_text(uri, "x")
    message = str(info.value)
    assert uri in message
    assert "s3://bucket/prefix" in message and "file" in message
    assert "\n" not in message
    assert info.value.exit_code == ExitCode.INPUT
    assert not any(tmp_path.iterdir())
    with pytest.raises(StorageError, match="not supported"):
        Storage(root=uri)


@pytest.mark.parametrize("uri", ["s3://", "s3:///key", "file://otherhost/x", ""])
def test_malformed_uris_are_rejected(uri: str) -> None:
    with pytest.raises(StorageError):
        parse_uri(uri)


def test_join_and_default_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Storage.join("s3://b/runs/", "r1", "/model/") == "s3://b/runs/r1/model"
    assert Storage.join("s3://b", "x") == "s3://b/x"
    assert Storage.join(str(tmp_path), "r1", "m") == str(tmp_path / "r1" / "m")
    monkeypatch.setenv("PREFTUNE_HOME", str(tmp_path / "home"))
    assert Storage().default_root() == str(tmp_path / "home" / "artifacts")
    assert Storage(root="s3://b/p").default_root() == "s3://b/p"


def test_from_config_section(monkeypatch: pytest.MonkeyPatch) -> None:
    section = StorageSection(
        root="s3://b/p", s3_endpoint_url="http://minio:9000", s3_region="eu-west-1", max_attempts=2
    )
    st = Storage.from_config(section)
    assert (st.root, st.endpoint_url, st.region, st.max_attempts) == ("s3://b/p", "http://minio:9000", "eu-west-1", 2)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://from-env:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    st = Storage.from_config(StorageSection())
    assert st.endpoint_url == "http://from-env:9000"
    assert st.region == "us-east-1"
    assert st.max_attempts == 5
    assert st.s3_backend._client is None  # nothing touched the network yet


# --------------------------------------------------------------------------------------
# local files and folders


def test_local_roundtrip_text_bytes_and_listing(tmp_path: Path) -> None:
    st = Storage()
    target = tmp_path / "deep" / "er" / "report.json"
    st.write_text(str(target), "héllo\n")
    assert st.read_text(str(target)) == "héllo\n"
    st.write_bytes(f"file://{tmp_path}/blob.bin", b"\x00\xff")
    assert st.read_bytes(str(tmp_path / "blob.bin")) == b"\x00\xff"
    assert st.exists(str(target)) and not st.exists(str(tmp_path / "nope"))
    assert st.list(str(tmp_path)) == ["blob.bin", "deep/er/report.json"]
    assert st.list(str(tmp_path / "nope")) == []
    assert st.delete(str(tmp_path / "deep")) is True
    assert st.delete(str(tmp_path / "deep")) is False
    assert st.list(str(tmp_path)) == ["blob.bin"]
    assert _leftovers(tmp_path) == []


def test_local_missing_file_is_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"does not exist"):
        Storage().read_text(str(tmp_path / "missing.jsonl"))
    with pytest.raises(StorageError, match=r"is a folder"):
        Storage().read_bytes(str(tmp_path))


def test_atomic_write_failure_mid_write_keeps_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "config.yaml"
    atomic_write_text(target, "old: true\n")
    os.chmod(target, 0o640)

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage_local.os, "fsync", disk_full)
    with pytest.raises(StorageError, match=r"cannot write .*config.yaml: No space left on device"):
        atomic_write_text(target, "new: true\n" * 1000)
    monkeypatch.undo()
    assert target.read_text() == "old: true\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]

    atomic_write_bytes(target, b"new: true\n")
    assert target.read_bytes() == b"new: true\n"
    assert (target.stat().st_mode & 0o777) == 0o640  # the file keeps its permissions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_atomic_write_failure_on_replace_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")

    def boom(src: Any, dst: Any) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(storage_local.os, "replace", boom)
    with pytest.raises(StorageError):
        Storage().write_text(str(target), "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_local_folder_roundtrip_and_overwrite(tmp_path: Path) -> None:
    st = Storage()
    src1 = _make_tree(tmp_path / "v1", MODEL_V1)
    src2 = _make_tree(tmp_path / "v2", MODEL_V2)
    dest = tmp_path / "artifacts" / "model"
    st.put_dir(str(src1), str(dest))
    assert _read_tree(dest) == MODEL_V1
    st.put_dir(str(src2), str(dest))  # replaces: files of v1 that v2 lacks are gone
    assert _read_tree(dest) == MODEL_V2
    out = st.get_dir(str(dest), str(tmp_path / "copy"))
    assert _read_tree(out) == MODEL_V2
    assert _leftovers(tmp_path / "artifacts") == [] and _leftovers(tmp_path) == []


def test_local_folder_failure_mid_copy_keeps_old_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = Storage()
    dest = tmp_path / "out" / "model"
    st.put_dir(str(_make_tree(tmp_path / "v1", MODEL_V1)), str(dest))
    calls = {"n": 0}
    real_copy = storage_local._copy_file_synced

    def fail_second(src: str, dst: str) -> str:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_copy(src, dst)

    monkeypatch.setattr(storage_local, "_copy_file_synced", fail_second)
    with pytest.raises((StorageError, OSError)):
        st.put_dir(str(_make_tree(tmp_path / "v2", MODEL_V2)), str(dest))
    assert calls["n"] == 2
    assert _read_tree(dest) == MODEL_V1
    assert _leftovers(tmp_path / "out") == []


def test_put_dir_of_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"does not exist"):
        Storage().put_dir(str(tmp_path / "nope"), str(tmp_path / "dest"))


# --------------------------------------------------------------------------------------
# S3: files


def test_s3_roundtrip_text_and_bytes(s3: Storage, s3_bucket: str) -> None:
    base = f"s3://{s3_bucket}/runs/r1"
    s3.write_text(f"{base}/report.json", '{"ok": "é"}')
    s3.write_bytes(f"{base}/data/blob.bin", b"\x00\x01\xff")
    assert s3.read_text(f"{base}/report.json") == '{"ok": "é"}'
    assert s3.read_bytes(f"{base}/data/blob.bin") == b"\x00\x01\xff"
    assert s3.exists(f"{base}/report.json")
    assert not s3.exists(f"{base}/missing.json")
    assert s3.list(base) == ["data/blob.bin", "report.json"]
    s3.write_text(f"{base}/report.json", "v2")  # overwrite is one PUT
    assert s3.read_text(f"{base}/report.json") == "v2"
    assert s3.delete(f"{base}/report.json") is True
    assert s3.delete(f"{base}/report.json") is False
    assert s3.list(base) == ["data/blob.bin"]


def test_s3_endpoint_from_environment(s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    st = Storage()
    st.write_text(f"s3://{s3_bucket}/x.txt", "via env")
    assert st.read_text(f"s3://{s3_bucket}/x.txt") == "via env"


def test_s3_missing_key_and_bucket(s3: Storage, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/nope/data.jsonl"
    with pytest.raises(StorageError) as info:
        s3.read_text(uri)
    assert str(info.value) == f"{uri} does not exist"
    assert info.value.__cause__ is None and info.value.__suppress_context__

    with pytest.raises(StorageError) as info:
        s3.read_text("s3://no-such-bucket-preftune/x")
    assert "bucket 'no-such-bucket-preftune' does not exist" in str(info.value)
    with pytest.raises(StorageError, match=r"does not exist"):
        s3.get_dir(f"s3://{s3_bucket}/no-model", "/tmp/never-created-preftune")
    assert not Path("/tmp/never-created-preftune").exists()


# --------------------------------------------------------------------------------------
# S3: folders and the completion marker


def test_s3_folder_roundtrip_with_marker(s3: Storage, s3_bucket: str, s3_client: Any, tmp_path: Path) -> None:
    src = _make_tree(tmp_path / "model", MODEL_V1)
    uri = f"s3://{s3_bucket}/models/m1"
    assert s3.put_dir(str(src), uri) == uri
    assert s3.exists(uri)
    assert s3.list(uri) == sorted(MODEL_V1)

    marker = json.loads(s3_client.get_object(Bucket=s3_bucket, Key=f"models/m1/{MARKER_NAME}")["Body"].read())
    listed = {f["path"]: f for f in marker["files"]}
    assert set(listed) == set(MODEL_V1)
    for rel, data in MODEL_V1.items():
        assert listed[rel]["size"] == len(data)
        assert listed[rel]["sha256"] == hashlib.sha256(data).hexdigest()

    dest = tmp_path / "download" / "m1"
    dest.mkdir(parents=True)
    (dest / "stale.txt").write_text("from an older download")
    assert s3.get_dir(uri, str(dest)) == dest
    assert _read_tree(dest) == MODEL_V1  # the old local folder was replaced as a whole
    assert _leftovers(dest.parent) == []


def test_s3_folder_without_marker_is_not_visible(s3: Storage, s3_bucket: str, s3_client: Any, tmp_path: Path) -> None:
    for rel, data in MODEL_V1.items():  # half a publish: files but no marker
        s3_client.put_object(Bucket=s3_bucket, Key=f"models/half/{rel}", Body=data)
    uri = f"s3://{s3_bucket}/models/half"
    assert s3.exists(uri) is False
    with pytest.raises(StorageError) as info:
        s3.get_dir(uri, str(tmp_path / "dest"))
    assert str(info.value).startswith(f"incomplete folder {uri}: no {MARKER_NAME} marker")
    assert not (tmp_path / "dest").exists()
    with pytest.raises(StorageError, match="incomplete folder"):
        s3.local_path(uri, cache_dir=tmp_path / "cache")


def test_s3_folder_with_wrong_sizes_raises(s3: Storage, s3_bucket: str, s3_client: Any, tmp_path: Path) -> None:
    uri = f"s3://{s3_bucket}/models/m"
    s3.put_dir(str(_make_tree(tmp_path / "src", MODEL_V1)), uri)
    s3_client.put_object(Bucket=s3_bucket, Key="models/m/model.safetensors", Body=b"truncated")
    with pytest.raises(
        StorageError, match=r"incomplete folder .*model.safetensors has 9 bytes, the marker says 200000"
    ):
        s3.exists(uri)
    with pytest.raises(StorageError, match=r"incomplete folder"):
        s3.get_dir(uri, str(tmp_path / "dest"))
    s3_client.delete_object(Bucket=s3_bucket, Key="models/m/config.json")
    with pytest.raises(StorageError, match=r"config.json is listed in its marker but missing"):
        s3.get_dir(uri, str(tmp_path / "dest"))
    assert not (tmp_path / "dest").exists()


def test_s3_folder_same_size_different_content_is_caught(
    s3: Storage, s3_bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    uri = f"s3://{s3_bucket}/models/m"
    s3.put_dir(str(_make_tree(tmp_path / "src", MODEL_V1)), uri)
    s3_client.put_object(Bucket=s3_bucket, Key="models/m/tokenizer/merges.txt", Body=b"x y\n")
    with pytest.raises(StorageError, match=r"merges.txt does not match its marker"):
        s3.get_dir(uri, str(tmp_path / "dest"))
    assert not (tmp_path / "dest").exists() and _leftovers(tmp_path) == []


def test_s3_folder_overwrite_replaces_whole_folder(s3: Storage, s3_bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{s3_bucket}/models/champion"
    s3.put_dir(str(_make_tree(tmp_path / "v1", MODEL_V1)), uri)
    s3.put_dir(str(_make_tree(tmp_path / "v2", MODEL_V2)), uri)
    assert s3.list(uri) == sorted(MODEL_V2)  # files only v1 had are deleted
    assert _read_tree(s3.get_dir(uri, str(tmp_path / "out"))) == MODEL_V2


def test_s3_interrupted_republish_hides_the_folder(
    s3: Storage, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"s3://{s3_bucket}/models/champion"
    s3.put_dir(str(_make_tree(tmp_path / "v1", MODEL_V1)), uri)
    client = s3.s3_backend.client(uri)
    real_upload = client.upload_file
    calls = {"n": 0}

    def crash_on_second(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the process is killed mid-publish
        real_upload(*args, **kwargs)

    monkeypatch.setattr(client, "upload_file", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        s3.put_dir(str(_make_tree(tmp_path / "v2", MODEL_V2)), uri)
    monkeypatch.undo()
    # Neither half-old nor half-new: the folder is not there until a publish completes.
    assert s3.exists(uri) is False
    with pytest.raises(StorageError, match="incomplete folder"):
        s3.get_dir(uri, str(tmp_path / "out"))
    s3.put_dir(str(tmp_path / "v2"), uri)
    assert _read_tree(s3.get_dir(uri, str(tmp_path / "out"))) == MODEL_V2


def test_s3_delete_folder(s3: Storage, s3_bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{s3_bucket}/models/old"
    s3.put_dir(str(_make_tree(tmp_path / "v1", MODEL_V1)), uri)
    s3.write_text(f"s3://{s3_bucket}/models/keep.txt", "keep")
    assert s3.delete(uri) is True
    assert not s3.exists(uri) and s3.list(uri) == []
    assert s3.read_text(f"s3://{s3_bucket}/models/keep.txt") == "keep"
    assert s3.delete(uri) is False
    with pytest.raises(StorageError, match="refusing to delete the whole bucket"):
        s3.delete(f"s3://{s3_bucket}")


def test_local_path_materialises_and_caches(
    s3: Storage, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"s3://{s3_bucket}/models/policy"
    cache = tmp_path / "cache"
    s3.put_dir(str(_make_tree(tmp_path / "v1", MODEL_V1)), uri)
    path = s3.local_path(uri, cache_dir=cache)
    assert path == cache / s3_bucket / "models" / "policy"
    files = _read_tree(path)
    assert files.pop(storage_mod.CACHE_STAMP_NAME)
    assert files == MODEL_V1

    # Unchanged on S3: served from the cache without downloading.
    client = s3.s3_backend.client(uri)

    def no_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("downloaded although the cache is current")

    monkeypatch.setattr(client, "download_file", no_download)
    assert s3.local_path(uri, cache_dir=cache) == path
    monkeypatch.undo()

    # Re-published: the cache follows.
    s3.put_dir(str(_make_tree(tmp_path / "v2", MODEL_V2)), uri)
    path = s3.local_path(uri, cache_dir=cache)
    files = _read_tree(path)
    files.pop(storage_mod.CACHE_STAMP_NAME)
    assert files == MODEL_V2

    # A single file works too; local paths come back unchanged.
    s3.write_text(f"s3://{s3_bucket}/data/prompts.jsonl", '{"id": 1}\n')
    file_path = s3.local_path(f"s3://{s3_bucket}/data/prompts.jsonl", cache_dir=cache)
    assert file_path.read_text() == '{"id": 1}\n'
    s3.write_text(f"s3://{s3_bucket}/data/prompts.jsonl", '{"id": 2}\n')
    assert s3.local_path(f"s3://{s3_bucket}/data/prompts.jsonl", cache_dir=cache).read_text() == '{"id": 2}\n'
    assert s3.local_path(str(tmp_path / "v1")) == tmp_path / "v1"


# --------------------------------------------------------------------------------------
# S3: credentials, reachability, retries


def test_missing_credentials_is_one_clear_line(
    s3_server: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    (tmp_path / "config").write_text("")
    (tmp_path / "credentials").write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    st = Storage(s3_endpoint_url=s3_server, max_attempts=1)
    uri = f"s3://{s3_bucket}/data.jsonl"
    with pytest.raises(CredentialsError) as info:
        st.write_text(uri, "x")
    message = str(info.value)
    assert message.startswith(f"no S3 credentials for {uri}")
    assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in message and s3_server in message
    assert "\n" not in message and info.value.exit_code == ExitCode.CREDENTIALS
    with pytest.raises(CredentialsError):
        st.put_dir(str(_make_tree(tmp_path / "m", {"a": b"1"})), f"s3://{s3_bucket}/m")


def test_unreachable_endpoint_names_it(tmp_path: Path, s3_server: str) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    st = Storage(s3_endpoint_url=endpoint, max_attempts=1, connect_timeout=1, read_timeout=1)
    with pytest.raises(UnreachableError) as info:
        st.read_text("s3://bucket/data.jsonl")
    message = str(info.value)
    assert message.startswith(f"cannot reach S3 endpoint {endpoint} to read s3://bucket/data.jsonl")
    assert "s3_endpoint_url" in message and "\n" not in message
    assert info.value.exit_code == ExitCode.UNREACHABLE
    with pytest.raises(UnreachableError, match=endpoint):
        st.put_dir(str(_make_tree(tmp_path / "m", {"a": b"1"})), "s3://bucket/m")
    with pytest.raises(UnreachableError, match=endpoint):
        st.get_dir("s3://bucket/m", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_transient_503_is_retried(s3_server: str, s3_bucket: str) -> None:
    with FlakyProxy(s3_server, fail_first=2, mode="503") as proxy:
        st = Storage(s3_endpoint_url=proxy.url, max_attempts=3)
        st.write_text(f"s3://{s3_bucket}/a.txt", "survived")
        assert proxy.failed == 2
        assert st.read_text(f"s3://{s3_bucket}/a.txt") == "survived"
        assert proxy.forwarded >= 2


def test_persistent_503_gives_up_with_one_line(s3_server: str, s3_bucket: str) -> None:
    with FlakyProxy(s3_server, fail_first=1, mode="503") as proxy:
        st = Storage(s3_endpoint_url=proxy.url, max_attempts=1)
        with pytest.raises(UnreachableError) as info:
            st.read_text(f"s3://{s3_bucket}/a.txt")
        assert proxy.failed == 1 and proxy.forwarded == 0
    message = str(info.value)
    assert proxy.url in message and "503" in message and "after 1 attempt" in message
    assert "\n" not in message


def test_folder_publish_rides_out_dropped_connections(s3_server: str, s3_bucket: str, tmp_path: Path) -> None:
    # max_attempts=2: botocore gives up after two dropped connections; the folder-level
    # retry loop then tries again and resumes the publish.
    with FlakyProxy(s3_server, fail_first=2, mode="drop") as proxy:
        st = Storage(s3_endpoint_url=proxy.url, max_attempts=2, connect_timeout=2, read_timeout=5)
        uri = f"s3://{s3_bucket}/models/m"
        st.put_dir(str(_make_tree(tmp_path / "src", MODEL_V1)), uri)
        assert proxy.failed == 2
        assert _read_tree(st.get_dir(uri, str(tmp_path / "out"))) == MODEL_V1


@pytest.fixture(autouse=True)
def _no_real_sleep_in_outer_retry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep the folder-level back-off short in tests (its length is not what is tested)."""
    monkeypatch.setattr(storage_s3, "FOLDER_RETRY_BASE_DELAY", 0.05)
    yield


def test_s3_get_dir_into_unwritable_place_is_one_line(s3: Storage, s3_bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{s3_bucket}/models/m"
    s3.put_dir(str(_make_tree(tmp_path / "src", {"a.txt": b"a"})), uri)
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(StorageError, match=r"cannot create folder .*afile"):
        s3.get_dir(uri, str(tmp_path / "afile" / "model"))
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "model").write_text("a file where the folder should go")
    with pytest.raises(StorageError, match=r"exists and is not a folder"):
        s3.get_dir(uri, str(tmp_path / "dest" / "model"))
    assert (tmp_path / "dest" / "model").read_text() == "a file where the folder should go"
    assert _leftovers(tmp_path / "dest") == []


def test_s3_marker_with_escaping_path_is_rejected(s3: Storage, s3_bucket: str, s3_client: Any, tmp_path: Path) -> None:
    marker = {"format": "preftune.folder", "version": 1, "files": [{"path": "../evil.txt", "size": 4, "sha256": "0"}]}
    s3_client.put_object(Bucket=s3_bucket, Key="m/../evil.txt", Body=b"evil")
    s3_client.put_object(Bucket=s3_bucket, Key=f"m/{MARKER_NAME}", Body=json.dumps(marker).encode())
    with pytest.raises(StorageError, match=r"incomplete folder .*unsafe path"):
        s3.get_dir(f"s3://{s3_bucket}/m", str(tmp_path / "out" / "m"))
    assert not (tmp_path / "out" / "evil.txt").exists() and not (tmp_path / "out" / "m").exists()
