"""The S3 side: the client, one-line errors, retries, and publishing folders under a completion marker.

S3 has no rename, so a folder is published with a completion marker:

1. the marker ``<prefix>/_PREFTUNE_COMPLETE.json`` is deleted first (re-publishing makes the
   folder invisible rather than half-old, half-new);
2. every file is uploaded (each object itself is atomic);
3. objects under the prefix that are not part of the new folder are deleted;
4. the marker is written last. It lists every file with its size and sha256.

Readers treat a prefix without a marker as absent, check every listed file's size against the
bucket and each downloaded file's sha256, and rename the download into place like a local
folder. Every call uses botocore's ``standard`` retry mode with ``max_attempts``; whole-folder
operations are retried a few more rounds on connection errors. boto3 is imported on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from preftune.common.timestamps import utc_now
from preftune.errors import CredentialsError, PreftuneError, StorageError, UnreachableError
from preftune.home import preftune_home
from preftune.storage.local import _is_safe_relative, _local_files, _sha256_file, _staging_dir, atomic_write_text
from preftune.storage.uri import CACHE_STAMP_NAME, MARKER_FORMAT, MARKER_NAME, ParsedURI, parse_uri, s3_uri

DEFAULT_REGION = "us-east-1"
FOLDER_RETRY_ROUNDS = 3
FOLDER_RETRY_BASE_DELAY = 0.5

T = TypeVar("T")


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes/contexts (boto3 wraps ClientError in S3UploadFailedError)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                stack.append(linked)


_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AccessDenied",
    "AuthorizationHeaderMalformed",
    "403",
    "Forbidden",
}
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _transfer_config() -> Any:
    """Multipart above 64 MB, a few threads: model shards upload in parallel parts."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=64 * 1024 * 1024, max_concurrency=4, use_threads=True)


class S3Connection:
    """The S3 client (created on first use, reused: it is thread-safe), its errors as one line, retries,
    and the object primitives the folder protocol is made of."""

    def __init__(
        self,
        s3_endpoint_url: str | None,
        s3_region: str | None,
        max_attempts: int,
        connect_timeout: float,
        read_timeout: float,
        cache_dir: Path | None,
    ):
        self.s3_endpoint_url = s3_endpoint_url
        self.s3_region = s3_region
        self.max_attempts = max_attempts
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.cache_dir = cache_dir
        self._client: Any = None
        self._client_lock = threading.Lock()

    @property
    def endpoint_url(self) -> str | None:
        """The S3 endpoint: config, else ``$AWS_ENDPOINT_URL_S3``/``$AWS_ENDPOINT_URL``, else AWS."""
        return (
            self.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        )

    @property
    def region(self) -> str:
        return self.s3_region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or DEFAULT_REGION

    @property
    def endpoint_description(self) -> str:
        return self.endpoint_url or f"AWS S3 ({self.region})"

    # ---- the S3 client ---------------------------------------------------------------

    def client(self, uri: str) -> Any:
        """The boto3 S3 client, created on first use; raises CredentialsError without credentials."""
        if self._client is not None:
            return self._client
        with self._client_lock:
            if self._client is not None:
                return self._client
            try:
                import boto3
                from botocore.config import Config
            except ImportError:  # pragma: no cover - boto3 is a runtime dependency
                raise StorageError(f"{uri}: S3 URIs need boto3; pip install boto3") from None
            session = boto3.session.Session()
            try:
                credentials = session.get_credentials()
            except Exception as exc:  # a broken profile or credential process
                raise CredentialsError(f"cannot load S3 credentials for {uri}: {_first_line(exc)}") from None
            if credentials is None:
                raise CredentialsError(self._no_credentials_message(uri))
            endpoint = self.endpoint_url
            config = Config(
                region_name=self.region,
                retries={"mode": "standard", "total_max_attempts": self.max_attempts},
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                # S3-compatible stores (MinIO, Ceph) are addressed by path, not by virtual host.
                s3={"addressing_style": "path" if endpoint else "auto"},
                # Older MinIO/Ceph releases reject the CRC checksums newer botocore sends by default.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            self._client = session.client("s3", endpoint_url=endpoint, config=config)
            return self._client

    def _no_credentials_message(self, uri: str) -> str:
        return (
            f"no S3 credentials for {uri} (endpoint {self.endpoint_description}): set "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with a shared credentials file, "
            "or run with an IAM role / service-account token"
        )

    def _translate(self, exc: BaseException, uri: str, action: str) -> PreftuneError | None:
        """One actionable line for a boto3/botocore failure, or None if it is not one."""
        from botocore import exceptions as bx

        try:
            from boto3.exceptions import S3UploadFailedError
        except ImportError:  # pragma: no cover
            S3UploadFailedError = ()  # type: ignore[assignment,misc]  # noqa: N806

        for err in _exception_chain(exc):
            if isinstance(err, (bx.NoCredentialsError, bx.PartialCredentialsError)):
                return CredentialsError(self._no_credentials_message(uri))
            if isinstance(err, bx.CredentialRetrievalError):
                return CredentialsError(f"cannot load S3 credentials for {uri}: {_first_line(err)}")
            if isinstance(err, bx.ClientError):
                return self._translate_client_error(err, uri, action)
            if isinstance(err, (bx.ConnectionError, bx.HTTPClientError)):
                return UnreachableError(
                    f"cannot reach S3 endpoint {self.endpoint_description} to {action} {uri}: {_first_line(err)}; "
                    "check storage.s3_endpoint_url (or AWS_ENDPOINT_URL) and that the service is up"
                )
        for err in _exception_chain(exc):
            if isinstance(err, (bx.BotoCoreError, S3UploadFailedError)):
                return StorageError(f"cannot {action} {uri}: {_first_line(err)}")
        return None

    def _translate_client_error(self, err: Any, uri: str, action: str) -> PreftuneError:
        error = err.response.get("Error", {}) or {}
        code = str(error.get("Code", "") or "")
        message = str(error.get("Message", "") or "").strip()
        status = int((err.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode", 0) or 0)
        if code == "NoSuchBucket":
            bucket = parse_uri(uri).bucket
            return StorageError(f"bucket {bucket!r} does not exist ({uri}): create it or fix storage.root")
        if code in _NOT_FOUND_CODES:
            return StorageError(f"{uri} does not exist")
        if code in _AUTH_CODES or status == 403:
            return CredentialsError(
                f"S3 endpoint {self.endpoint_description} refused to {action} {uri} ({code or status}): "
                "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and the bucket's access policy"
            )
        if status >= 500 or code in _THROTTLE_CODES:
            return UnreachableError(
                f"S3 endpoint {self.endpoint_description} failed to {action} {uri}: "
                f"{status or ''} {code} after {self.max_attempts} attempt(s); check the storage service".replace(
                    "  ", " "
                )
            )
        detail = f"{code}: {message}" if message else (code or str(status))
        return StorageError(f"cannot {action} {uri}: {detail}")

    @contextlib.contextmanager
    def _s3_errors(self, uri: str, action: str) -> Iterator[None]:
        try:
            yield
        except PreftuneError:
            raise
        except Exception as exc:
            translated = self._translate(exc, uri, action)
            if translated is None and isinstance(exc, OSError):  # the local side: disk full, permissions
                where = f" ({exc.filename})" if exc.filename else ""
                translated = StorageError(f"cannot {action} {uri}: {exc.strerror or exc}{where}")
            if translated is None:
                raise
            raise translated from None

    def _retrying(self, uri: str, action: str, fn: Callable[[], T]) -> T:
        """Run a whole-folder operation, retrying a few rounds on connection errors.

        Each S3 call already retries ``max_attempts`` times inside botocore; this outer
        loop rides out a longer outage (an endpoint restarting) for operations that
        resume cheaply. ``max_attempts=1`` disables it too.
        """
        rounds = 1 if self.max_attempts <= 1 else FOLDER_RETRY_ROUNDS
        for attempt in range(rounds):
            try:
                with self._s3_errors(uri, action):
                    return fn()
            except UnreachableError:
                if attempt == rounds - 1:
                    raise
                delay = FOLDER_RETRY_BASE_DELAY * (2**attempt)
                time.sleep(delay * (0.5 + random.random() / 2))
        raise AssertionError("unreachable")  # pragma: no cover

    # ---- S3 primitives ---------------------------------------------------------------

    def _head(self, bucket: str, key: str, uri: str) -> dict[str, Any] | None:
        """Metadata of the object, or None if there is none (other errors propagate)."""
        from botocore.exceptions import ClientError

        try:
            return self.client(uri).head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND_CODES:
                return None
            raise

    def _iter_objects(self, bucket: str, prefix: str, uri: str) -> Iterator[tuple[str, int]]:
        paginator = self.client(uri).get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []) or []:
                yield item["Key"], int(item["Size"])

    def _delete_keys(self, bucket: str, keys: list[str], uri: str) -> None:
        client = self.client(uri)
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            answer = client.delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )
            errors = answer.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"cannot delete {s3_uri(bucket, first.get('Key', ''))}: "
                    f"{first.get('Code', '')} {first.get('Message', '')}".strip()
                )

    def _read_marker(self, bucket: str, prefix: str, uri: str) -> tuple[dict[str, Any], bytes] | None:
        """The folder's completion marker (parsed, raw), or None if it has none."""
        from botocore.exceptions import ClientError

        key = prefix + MARKER_NAME
        try:
            raw = self.client(uri).get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in _NOT_FOUND_CODES:
                return None
            raise
        try:
            marker = json.loads(raw)
            files = marker["files"]
            if marker.get("format") != MARKER_FORMAT or not isinstance(files, list):
                raise ValueError("not a preftune folder marker")
            for entry in files:
                if not isinstance(entry["path"], str) or not isinstance(entry["size"], int):
                    raise ValueError("bad file entry")
                if not _is_safe_relative(entry["path"]):
                    raise ValueError(f"unsafe path {entry['path']!r}")
                str(entry["sha256"])
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(
                f"incomplete folder {uri}: its marker {s3_uri(bucket, key)} is not valid ({exc}); re-publish the folder"
            ) from None
        return marker, raw

    def _verified_manifest(self, bucket: str, prefix: str, uri: str) -> tuple[list[dict[str, Any]], bytes] | None:
        """The marker's file list after checking every file is in the bucket with its size.

        None when the prefix has no marker (nothing published, or a publish in progress).
        """
        found = self._read_marker(bucket, prefix, uri)
        if found is None:
            return None
        marker, raw = found
        sizes = dict(self._iter_objects(bucket, prefix, uri))
        for entry in marker["files"]:
            key = prefix + entry["path"]
            if key not in sizes:
                raise StorageError(
                    f"incomplete folder {uri}: {entry['path']} is listed in its marker but missing; "
                    "re-publish the folder"
                )
            if sizes[key] != entry["size"]:
                raise StorageError(
                    f"incomplete folder {uri}: {entry['path']} has {sizes[key]} bytes, the marker says "
                    f"{entry['size']}; re-publish the folder"
                )
        return marker["files"], raw

    def _missing_folder_error(self, bucket: str, prefix: str, key: str, uri: str) -> StorageError:
        if next(iter(self._iter_objects(bucket, prefix, uri)), None) is not None:
            return StorageError(
                f"incomplete folder {uri}: no {MARKER_NAME} marker (an upload is in progress or was interrupted); "
                "re-publish the folder"
            )
        if key and self._head(bucket, key, uri) is not None:
            return StorageError(f"{uri} is a file, not a folder")
        return StorageError(f"{uri} does not exist")


class S3Backend(S3Connection):
    """Files and folders at ``s3://`` URIs: what :class:`~preftune.storage.store.Storage` does for them."""

    # ---- files -----------------------------------------------------------------------

    def exists(self, uri: str, parsed: ParsedURI) -> bool:
        with self._s3_errors(uri, "check"):
            if parsed.key and self._head(parsed.bucket, parsed.key, uri) is not None:
                return True
            prefix = parsed.key + "/" if parsed.key else ""
            return self._verified_manifest(parsed.bucket, prefix, uri) is not None

    def read_bytes(self, uri: str, parsed: ParsedURI) -> bytes:
        if not parsed.key:
            raise StorageError(f"{uri} names a bucket, not a file: write s3://bucket/path/to/file")
        with self._s3_errors(uri, "read"):
            answer = self.client(uri).get_object(Bucket=parsed.bucket, Key=parsed.key)
            data = answer["Body"].read()
            expected = answer.get("ContentLength")
            if expected is not None and len(data) != int(expected):
                raise StorageError(f"cannot read {uri}: got {len(data)} of {expected} bytes; retry")
            return data

    def write_bytes(self, uri: str, parsed: ParsedURI, data: bytes) -> None:
        if not parsed.key:
            raise StorageError(f"{uri} names a bucket, not a file: write s3://bucket/path/to/file")
        with self._s3_errors(uri, "write"):
            self.client(uri).put_object(Bucket=parsed.bucket, Key=parsed.key, Body=bytes(data))

    def list(self, uri: str, parsed: ParsedURI) -> list[str]:
        prefix = parsed.key + "/" if parsed.key else ""
        with self._s3_errors(uri, "list"):
            return sorted(
                key[len(prefix) :]
                for key, _ in self._iter_objects(parsed.bucket, prefix, uri)
                if key[len(prefix) :] != MARKER_NAME and not key.endswith("/")
            )

    def delete(self, uri: str, parsed: ParsedURI) -> bool:
        """The folder's marker goes first, so readers stop seeing the folder before any of its files disappear."""
        if not parsed.key:
            raise StorageError(f"refusing to delete the whole bucket {uri}: name a prefix")

        def run() -> bool:
            client = self.client(uri)
            prefix = parsed.key + "/"
            found = False
            if self._head(parsed.bucket, prefix + MARKER_NAME, uri) is not None:
                client.delete_object(Bucket=parsed.bucket, Key=prefix + MARKER_NAME)
                found = True
            if self._head(parsed.bucket, parsed.key, uri) is not None:
                client.delete_object(Bucket=parsed.bucket, Key=parsed.key)
                found = True
            keys = [key for key, _ in self._iter_objects(parsed.bucket, prefix, uri)]
            if keys:
                self._delete_keys(parsed.bucket, keys, uri)
                found = True
            return found

        return self._retrying(uri, "delete", run)

    # ---- folders ---------------------------------------------------------------------

    def put_dir(self, src: Path, uri: str, parsed: ParsedURI) -> None:
        """Publish ``src`` under the completion-marker protocol (module docstring)."""
        if not parsed.key:
            raise StorageError(f"cannot publish a folder at the bucket root {uri}: name a prefix")

        with self._s3_errors(uri, "publish folder to"):
            self.client(uri)  # no credentials: fail before hashing a large folder
        files = _local_files(src)
        manifest = [{"path": rel, "size": path.stat().st_size, "sha256": _sha256_file(path)} for rel, path in files]
        prefix = parsed.key + "/"
        wanted = {prefix + rel for rel, _ in files}
        done: set[str] = set()
        marker_deleted = False

        def run() -> None:
            nonlocal marker_deleted
            client = self.client(uri)
            if not marker_deleted:
                client.delete_object(Bucket=parsed.bucket, Key=prefix + MARKER_NAME)
                marker_deleted = True
            for rel, path in files:
                key = prefix + rel
                if key in done:
                    continue
                client.upload_file(str(path), parsed.bucket, key, Config=_transfer_config())
                done.add(key)
            stale = [k for k, _ in self._iter_objects(parsed.bucket, prefix, uri) if k not in wanted]
            stale = [k for k in stale if k != prefix + MARKER_NAME]
            if stale:
                self._delete_keys(parsed.bucket, stale, uri)
            marker = {
                "format": MARKER_FORMAT,
                "version": 1,
                "created_at": utc_now(),
                "files": manifest,
            }
            body = json.dumps(marker, indent=1, sort_keys=True).encode()
            client.put_object(Bucket=parsed.bucket, Key=prefix + MARKER_NAME, Body=body)

        self._retrying(uri, "publish folder to", run)

    def get_dir(self, uri: str, parsed: ParsedURI, dst: Path, stamp: str | None) -> Path:
        prefix = parsed.key + "/" if parsed.key else ""

        def run() -> Path:
            found = self._verified_manifest(parsed.bucket, prefix, uri)
            if found is None:
                raise self._missing_folder_error(parsed.bucket, prefix, parsed.key, uri)
            entries, raw = found
            client = self.client(uri)
            with _staging_dir(dst) as tmp:
                for entry in entries:
                    target = tmp / entry["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    client.download_file(parsed.bucket, prefix + entry["path"], str(target), Config=_transfer_config())
                    size = target.stat().st_size
                    if size != entry["size"] or _sha256_file(target) != entry["sha256"]:
                        raise StorageError(
                            f"incomplete folder {uri}: {entry['path']} does not match its marker "
                            "(changed while downloading?); re-publish the folder"
                        )
                    fd = os.open(target, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                if stamp is not None:
                    (tmp / CACHE_STAMP_NAME).write_text(
                        json.dumps({"uri": uri, "marker_sha256": hashlib.sha256(raw).hexdigest()})
                    )
            return dst

        return self._retrying(uri, "download folder", run)

    def local_path(self, uri: str, parsed: ParsedURI, cache_dir: str | os.PathLike[str] | None = None) -> Path:
        """A cached local copy of an S3 folder or file, reused while the published version is unchanged."""
        root = (
            Path(cache_dir).expanduser()
            if cache_dir is not None
            else (self.cache_dir or preftune_home() / "cache" / "s3")
        )
        if parsed.key and not _is_safe_relative(parsed.key):
            raise StorageError(f"cannot cache {uri} locally: its key has '.', '..' or empty path segments")
        dst = root / parsed.bucket / parsed.key if parsed.key else root / parsed.bucket
        prefix = parsed.key + "/" if parsed.key else ""

        with self._s3_errors(uri, "read"):
            head = self._head(parsed.bucket, parsed.key, uri) if parsed.key else None
            if head is not None:
                return self._cached_file(uri, parsed, dst, head)
            found = self._read_marker(parsed.bucket, prefix, uri)
        if found is None:
            with self._s3_errors(uri, "read"):
                raise self._missing_folder_error(parsed.bucket, prefix, parsed.key, uri)
        _, raw = found
        digest = hashlib.sha256(raw).hexdigest()
        stamp_file = dst / CACHE_STAMP_NAME
        if dst.is_dir() and stamp_file.is_file():
            try:
                if json.loads(stamp_file.read_text()).get("marker_sha256") == digest:
                    return dst
            except (OSError, ValueError):
                pass
        return self.get_dir(uri, parsed, dst, stamp=digest)

    def _cached_file(self, uri: str, parsed: ParsedURI, dst: Path, head: dict[str, Any]) -> Path:
        source = {"uri": uri, "etag": head.get("ETag"), "size": head.get("ContentLength")}
        stamp = dst.with_name(f".{dst.name}{CACHE_STAMP_NAME}")
        if dst.is_file() and stamp.is_file():
            try:
                if json.loads(stamp.read_text()) == source and dst.stat().st_size == source["size"]:
                    return dst
            except (OSError, ValueError):
                pass
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(6)}.tmp")
        try:
            with self._s3_errors(uri, "download"):
                self.client(uri).download_file(parsed.bucket, parsed.key, str(tmp), Config=_transfer_config())
            if tmp.stat().st_size != source["size"]:
                raise StorageError(f"cannot download {uri}: got {tmp.stat().st_size} of {source['size']} bytes; retry")
            os.replace(tmp, dst)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        atomic_write_text(stamp, json.dumps(source))
        return dst
