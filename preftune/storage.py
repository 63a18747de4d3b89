"""One small storage layer for every artifact: local paths and ``s3://bucket/prefix`` URIs.

Datasets, models, checkpoints and reports move between pipeline steps through
:class:`Storage`. The same calls accept a plain path, a ``file://`` URI or an
``s3://bucket/key`` URI, so a step does not care whether it runs on a laptop (local
folder) or in a cluster (MinIO, Ceph or AWS S3 behind ``storage.s3_endpoint_url``).

Atomicity: a reader never sees half a file or half a folder
-----------------------------------------------------------
*Files.* Locally a file is written to a temporary file in the same folder, flushed,
``fsync``-ed and moved over the target with ``os.replace`` (atomic on POSIX). On S3 a
single ``PUT`` (and a completed multipart upload) is atomic: readers see the old
object or the new one.

*Local folders.* The content is copied into a hidden temporary sibling
(``.<name>.tmp-<random>``) and then renamed into place. An existing folder is first
renamed aside and deleted only after the new one is in place, so at every moment the
path holds either the complete old folder, the complete new folder or (for the
instant between two renames) nothing.

*S3 folders.* S3 has no rename, so a folder is published with a completion marker:

1. the marker ``<prefix>/_PREFTUNE_COMPLETE.json`` is deleted first (re-publishing
   makes the folder invisible rather than half-old, half-new);
2. every file is uploaded (each object itself is atomic);
3. objects under the prefix that are not part of the new folder are deleted;
4. the marker is written last. It lists every file with its size and sha256.

:meth:`Storage.get_dir`, :meth:`Storage.exists` and :meth:`Storage.local_path` treat a
prefix without a marker as not there (``exists`` is false, ``get_dir`` raises
``StorageError: incomplete folder ...``) and check every listed file's size against
the bucket before using it; ``get_dir`` also checks each downloaded file's sha256 and
then renames the download into place like a local folder. Empty sub-folders are not
represented on S3. Two writers publishing the same prefix at the same time are not
serialised: give each run its own prefix (the pipeline does).

Retries and errors
------------------
Every S3 call uses botocore's ``standard`` retry mode with ``max_attempts`` (throttling,
5xx answers and connection errors, with exponential back-off and jitter). Whole-folder
operations are additionally retried a few times on connection errors with exponential
back-off, resuming where they stopped. Failures end in one line a user can act on:
:class:`~preftune.errors.CredentialsError` (no or rejected credentials),
:class:`~preftune.errors.UnreachableError` (endpoint down, naming it) or
:class:`~preftune.errors.StorageError` (missing key or bucket, unknown URI scheme,
incomplete folder) -- never a botocore traceback.

boto3 is imported only when an S3 URI is first used, so importing this module (for
:func:`atomic_write_text`, say) stays cheap for the CLI.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from preftune.common.timestamps import utc_now
from preftune.errors import CredentialsError, PreftuneError, StorageError, UnreachableError
from preftune.home import preftune_home

if TYPE_CHECKING:
    from preftune.config import StorageSection

__all__ = [
    "MARKER_NAME",
    "SUPPORTED_SCHEMES",
    "ParsedURI",
    "Storage",
    "atomic_write_bytes",
    "atomic_write_text",
    "is_s3_uri",
    "parse_uri",
]

MARKER_NAME = "_PREFTUNE_COMPLETE.json"
"""Written last when a folder is published to S3; lists every file with size and sha256."""

MARKER_FORMAT = "preftune.folder"
SUPPORTED_SCHEMES = ("file", "s3")
CACHE_STAMP_NAME = ".preftune-source.json"
"""Inside a folder materialised by :meth:`Storage.local_path`: which published version it holds."""

DEFAULT_REGION = "us-east-1"
FOLDER_RETRY_ROUNDS = 3
FOLDER_RETRY_BASE_DELAY = 0.5
_CHUNK = 1024 * 1024
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")

T = TypeVar("T")


# --------------------------------------------------------------------------------------
# URIs


class ParsedURI(NamedTuple):
    """A storage location. For ``file`` the bucket is empty and the key is the local path."""

    scheme: str
    bucket: str
    key: str


def parse_uri(uri: str | os.PathLike[str]) -> ParsedURI:
    """Split ``uri`` into scheme, bucket and key.

    Plain paths and ``file://`` URIs give ``("file", "", "<path>")`` (``~`` expanded);
    ``s3://bucket/a/b/`` gives ``("s3", "bucket", "a/b")``. Any other scheme raises
    :class:`StorageError` naming the URI and the supported schemes, so a typo such as
    ``gs://`` or ``s3a://`` fails at the edge instead of creating a local folder
    called ``gs:``.
    """
    text = os.fspath(uri)
    if not isinstance(text, str):
        raise StorageError(f"storage URI must be text, got {text!r}")
    match = _SCHEME_RE.match(text)
    if match is None:
        if not text:
            raise StorageError("empty storage URI: give a local path or s3://bucket/prefix")
        return ParsedURI("file", "", os.path.expanduser(text))
    scheme = match.group(1).lower()
    rest = text[match.end() :]
    if scheme == "file":
        host, sep, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise StorageError(f"file URI {text!r} names host {host!r}: only local files are supported (file:///path)")
        if not sep:
            raise StorageError(f"file URI {text!r} has no path: write file:///absolute/path")
        return ParsedURI("file", "", "/" + path)
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise StorageError(f"S3 URI {text!r} has no bucket: write s3://bucket/prefix")
        return ParsedURI("s3", bucket, key.strip("/"))
    raise StorageError(
        f"unsupported storage URI {text!r}: scheme {scheme + '://'!r} is not supported; "
        f"use a local path, file:///path or s3://bucket/prefix (supported schemes: {', '.join(SUPPORTED_SCHEMES)})"
    )


def is_s3_uri(uri: str | os.PathLike[str]) -> bool:
    """True for ``s3://`` URIs (raises :class:`StorageError` for unknown schemes)."""
    return parse_uri(uri).scheme == "s3"


def _s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"


# --------------------------------------------------------------------------------------
# Local atomic writes


def _fsync_dir(path: Path) -> None:
    """Persist a rename in ``path`` (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to the local file ``path`` so that readers see the old or the new content.

    The bytes go to a temporary file in the same folder (same filesystem, so the final
    ``os.replace`` is atomic), are ``fsync``-ed, then replace the target. Parent folders
    are created. On any failure the temporary file is removed and the old content is
    untouched. An existing file keeps its permission bits; a new one gets the umask's.
    """
    target = Path(path).expanduser()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create folder {target.parent}: {exc.strerror or exc}") from None
    if target.is_dir():
        raise StorageError(f"cannot write {target}: it is a folder")
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, target.stat().st_mode & 0o7777)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise StorageError(f"cannot write {target}: {exc.strerror or exc}") from None
        raise
    _fsync_dir(target.parent)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` for text (UTF-8 by default)."""
    return atomic_write_bytes(path, text.encode(encoding))


# --------------------------------------------------------------------------------------
# Local folders


def _copy_file_synced(src: str, dst: str) -> str:
    shutil.copy2(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return dst


def _temp_sibling(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{secrets.token_hex(6)}")


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move the complete folder ``tmp`` to ``target``, replacing an existing folder safely."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise StorageError(f"cannot replace {target} with a folder: it exists and is not a folder")
    if target.exists():
        old = _temp_sibling(target, "old")
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        _fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
        _fsync_dir(target.parent)


@contextlib.contextmanager
def _staging_dir(target: Path) -> Iterator[Path]:
    """A hidden temporary sibling of ``target``; renamed into place on success, removed on failure."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create folder {target.parent}: {exc.strerror or exc}") from None
    tmp = _temp_sibling(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _replace_dir(tmp, target)
    except BaseException:
        _remove_tree(tmp)
        raise


def _copy_local_dir(src: Path, dst: Path) -> Path:
    if not src.is_dir():
        what = "does not exist" if not src.exists() else "is not a folder"
        raise StorageError(f"{src} {what}: expected a folder")
    src_resolved, dst_resolved = src.resolve(), dst.resolve()
    if src_resolved == dst_resolved:
        return dst
    if src_resolved in dst_resolved.parents:
        raise StorageError(f"cannot copy folder {src} into its own sub-folder {dst}")
    try:
        with _staging_dir(dst) as tmp:
            # Not shutil.copytree: it carries on after a failed file and reports a list at the
            # end; here the first failure stops the copy (and the staging folder is removed).
            for dirpath, dirnames, filenames in os.walk(src):
                dirnames.sort()
                rel_dir = Path(dirpath).relative_to(src)
                (tmp / rel_dir).mkdir(parents=True, exist_ok=True)
                for name in sorted(filenames):
                    _copy_file_synced(os.path.join(dirpath, name), str(tmp / rel_dir / name))
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        raise StorageError(f"cannot copy folder {src} to {dst}: {exc.strerror or exc}{where}") from None
    return dst


def _local_files(root: Path, *, skip_marker: bool = True) -> list[tuple[str, Path]]:
    """(relative posix path, absolute path) of every file under ``root``, sorted."""
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if skip_marker and rel == MARKER_NAME:
                continue
            if full.is_file():
                out.append((rel, full))
    out.sort()
    return out


def _is_safe_relative(path: str) -> bool:
    """A ``/``-separated relative path that cannot step outside its folder."""
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------
# Errors


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


# --------------------------------------------------------------------------------------
# Storage


class Storage:
    """Read and write artifacts at local paths and ``s3://`` URIs alike.

    Build it from the run config with :meth:`from_config` (or with keyword arguments).
    Nothing touches the network until the first S3 URI is used; the boto3 client is
    then created once and reused (it is thread-safe).
    """

    def __init__(
        self,
        root: str | None = None,
        s3_endpoint_url: str | None = None,
        s3_region: str | None = None,
        max_attempts: int = 5,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        cache_dir: str | os.PathLike[str] | None = None,
    ):
        if max_attempts < 1:
            raise StorageError(f"storage.max_attempts must be at least 1, got {max_attempts}")
        if root:
            parse_uri(root)  # unknown schemes fail at construction, not at first write
        self.root = root or None
        self.s3_endpoint_url = s3_endpoint_url or None
        self.s3_region = s3_region or None
        self.max_attempts = int(max_attempts)
        self.connect_timeout = float(connect_timeout)
        self.read_timeout = float(read_timeout)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self._client: Any = None
        self._client_lock = threading.Lock()

    @classmethod
    def from_config(cls, section: StorageSection, **overrides: Any) -> Storage:
        """A Storage for the run config's ``storage`` section (``overrides`` win)."""
        kwargs: dict[str, Any] = {
            "root": section.root,
            "s3_endpoint_url": section.s3_endpoint_url,
            "s3_region": section.s3_region,
            "max_attempts": section.max_attempts,
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    def __repr__(self) -> str:
        return f"Storage(root={self.default_root()!r}, endpoint={self.endpoint_description!r})"

    # ---- configuration -------------------------------------------------------------

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

    def default_root(self) -> str:
        """Where artifacts go: the configured root, else ``<preftune home>/artifacts``."""
        return self.root or str(preftune_home() / "artifacts")

    @staticmethod
    def join(base: str | os.PathLike[str], *parts: str) -> str:
        """Join path parts onto a local path or an S3 URI (``/`` separated, no doubled slashes)."""
        parsed = parse_uri(base)
        if parsed.scheme == "s3":
            pieces = [parsed.key] if parsed.key else []
            pieces += [p.strip("/") for p in parts if p and p.strip("/")]
            return _s3_uri(parsed.bucket, "/".join(pieces))
        return os.path.join(parsed.key, *parts)

    # ---- the S3 client ---------------------------------------------------------------

    def _s3(self, uri: str) -> Any:
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
            return self._s3(uri).head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND_CODES:
                return None
            raise

    def _iter_objects(self, bucket: str, prefix: str, uri: str) -> Iterator[tuple[str, int]]:
        paginator = self._s3(uri).get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []) or []:
                yield item["Key"], int(item["Size"])

    def _delete_keys(self, bucket: str, keys: list[str], uri: str) -> None:
        client = self._s3(uri)
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            answer = client.delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )
            errors = answer.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"cannot delete {_s3_uri(bucket, first.get('Key', ''))}: "
                    f"{first.get('Code', '')} {first.get('Message', '')}".strip()
                )

    def _read_marker(self, bucket: str, prefix: str, uri: str) -> tuple[dict[str, Any], bytes] | None:
        """The folder's completion marker (parsed, raw), or None if it has none."""
        from botocore.exceptions import ClientError

        key = prefix + MARKER_NAME
        try:
            raw = self._s3(uri).get_object(Bucket=bucket, Key=key)["Body"].read()
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
                f"incomplete folder {uri}: its marker {_s3_uri(bucket, key)} is not valid ({exc}); "
                "re-publish the folder"
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

    # ---- files -----------------------------------------------------------------------

    def exists(self, uri: str | os.PathLike[str]) -> bool:
        """True for an existing file, or a folder (on S3: a *complete* published folder).

        An S3 prefix without a completion marker is not there (a publish in progress);
        one whose marker disagrees with the bucket raises ``StorageError: incomplete folder``.
        """
        uri = os.fspath(uri)
        parsed = parse_uri(uri)
        if parsed.scheme == "file":
            return Path(parsed.key).exists()
        with self._s3_errors(uri, "check"):
            if parsed.key and self._head(parsed.bucket, parsed.key, uri) is not None:
                return True
            prefix = parsed.key + "/" if parsed.key else ""
            return self._verified_manifest(parsed.bucket, prefix, uri) is not None

    def read_bytes(self, uri: str | os.PathLike[str]) -> bytes:
        """The whole content of a file."""
        uri = os.fspath(uri)
        parsed = parse_uri(uri)
        if parsed.scheme == "file":
            path = Path(parsed.key)
            try:
                return path.read_bytes()
            except FileNotFoundError:
                raise StorageError(f"{uri} does not exist") from None
            except IsADirectoryError:
                raise StorageError(f"{uri} is a folder, not a file (use get_dir)") from None
            except OSError as exc:
                raise StorageError(f"cannot read {uri}: {exc.strerror or exc}") from None
        if not parsed.key:
            raise StorageError(f"{uri} names a bucket, not a file: write s3://bucket/path/to/file")
        with self._s3_errors(uri, "read"):
            answer = self._s3(uri).get_object(Bucket=parsed.bucket, Key=parsed.key)
            data = answer["Body"].read()
            expected = answer.get("ContentLength")
            if expected is not None and len(data) != int(expected):
                raise StorageError(f"cannot read {uri}: got {len(data)} of {expected} bytes; retry")
            return data

    def read_text(self, uri: str | os.PathLike[str], encoding: str = "utf-8") -> str:
        uri = os.fspath(uri)
        data = self.read_bytes(uri)
        try:
            return data.decode(encoding)
        except UnicodeDecodeError as exc:
            raise StorageError(f"{uri} is not {encoding} text (byte {exc.start}: {exc.reason})") from None

    def write_bytes(self, uri: str | os.PathLike[str], data: bytes) -> str:
        """Write a file atomically (locally temp file + rename; on S3 one PUT). Returns the URI."""
        uri = os.fspath(uri)
        parsed = parse_uri(uri)
        if parsed.scheme == "file":
            atomic_write_bytes(parsed.key, data)
            return uri
        if not parsed.key:
            raise StorageError(f"{uri} names a bucket, not a file: write s3://bucket/path/to/file")
        with self._s3_errors(uri, "write"):
            self._s3(uri).put_object(Bucket=parsed.bucket, Key=parsed.key, Body=bytes(data))
        return uri

    def write_text(self, uri: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> str:
        return self.write_bytes(uri, text.encode(encoding))

    def list(self, uri: str | os.PathLike[str]) -> list[str]:
        """Relative ``/``-separated paths of every file under a folder, sorted.

        A raw listing (it does not require the completion marker and never shows it);
        an absent folder lists as empty.
        """
        uri = os.fspath(uri)
        parsed = parse_uri(uri)
        if parsed.scheme == "file":
            root = Path(parsed.key)
            if not root.is_dir():
                return []
            return [rel for rel, _ in _local_files(root)]
        prefix = parsed.key + "/" if parsed.key else ""
        with self._s3_errors(uri, "list"):
            return sorted(
                key[len(prefix) :]
                for key, _ in self._iter_objects(parsed.bucket, prefix, uri)
                if key[len(prefix) :] != MARKER_NAME and not key.endswith("/")
            )

    def delete(self, uri: str | os.PathLike[str]) -> bool:
        """Delete a file or a whole folder; True if something was there.

        On S3 the folder's marker goes first, so readers stop seeing the folder before
        any of its files disappear.
        """
        uri = os.fspath(uri)
        parsed = parse_uri(uri)
        if parsed.scheme == "file":
            path = Path(parsed.key)
            if path.is_dir() and not path.is_symlink():
                if path.resolve() == Path(path.resolve().anchor):
                    raise StorageError(f"refusing to delete the filesystem root {uri}")
                doomed = _temp_sibling(path, "del")
                os.rename(path, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
                return True
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise StorageError(f"cannot delete {uri}: {exc.strerror or exc}") from None
            return True
        if not parsed.key:
            raise StorageError(f"refusing to delete the whole bucket {uri}: name a prefix")

        def run() -> bool:
            client = self._s3(uri)
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

    def put_dir(self, local_dir: str | os.PathLike[str], uri: str | os.PathLike[str]) -> str:
        """Publish a whole local folder (a model, a dataset) at ``uri``, atomically for readers.

        Replaces a folder already there. See the module docstring for the S3 protocol.
        Returns the URI.
        """
        uri = os.fspath(uri)
        src = Path(os.fspath(local_dir)).expanduser()
        if not src.is_dir():
            what = "does not exist" if not src.exists() else "is not a folder"
            raise StorageError(f"cannot publish {src} to {uri}: {src} {what}")
        parsed = parse_uri(uri)
        if parsed.scheme == "file":
            _copy_local_dir(src, Path(parsed.key))
            return uri
        if not parsed.key:
            raise StorageError(f"cannot publish a folder at the bucket root {uri}: name a prefix")

        with self._s3_errors(uri, "publish folder to"):
            self._s3(uri)  # no credentials: fail before hashing a large folder
        files = _local_files(src)
        manifest = [{"path": rel, "size": path.stat().st_size, "sha256": _sha256_file(path)} for rel, path in files]
        prefix = parsed.key + "/"
        wanted = {prefix + rel for rel, _ in files}
        done: set[str] = set()
        marker_deleted = False

        def run() -> None:
            nonlocal marker_deleted
            client = self._s3(uri)
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
        return uri

    def get_dir(self, uri: str | os.PathLike[str], local_dir: str | os.PathLike[str]) -> Path:
        """Copy a whole published folder to ``local_dir`` (replaced atomically). Returns its path."""
        uri = os.fspath(uri)
        dst = Path(os.fspath(local_dir)).expanduser()
        parsed = parse_uri(uri)
        if parsed.scheme == "file":
            return _copy_local_dir(Path(parsed.key), dst)
        return self._get_s3_dir(uri, parsed, dst, stamp=None)

    def _get_s3_dir(self, uri: str, parsed: ParsedURI, dst: Path, stamp: str | None) -> Path:
        prefix = parsed.key + "/" if parsed.key else ""

        def run() -> Path:
            found = self._verified_manifest(parsed.bucket, prefix, uri)
            if found is None:
                raise self._missing_folder_error(parsed.bucket, prefix, parsed.key, uri)
            entries, raw = found
            client = self._s3(uri)
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

    def local_path(self, uri: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
        """A local path holding ``uri``'s content, e.g. for ``from_pretrained(path)``.

        Local paths come back as they are. An S3 folder or file is downloaded into
        ``<cache_dir>/<bucket>/<key>`` (default ``<preftune home>/cache/s3``) and reused
        while the published version is unchanged (a folder is compared by its marker,
        a file by its ETag and size).
        """
        uri = os.fspath(uri)
        parsed = parse_uri(uri)
        if parsed.scheme == "file":
            path = Path(parsed.key)
            if not path.exists():
                raise StorageError(f"{uri} does not exist")
            return path
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
        return self._get_s3_dir(uri, parsed, dst, stamp=digest)

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
                self._s3(uri).download_file(parsed.bucket, parsed.key, str(tmp), Config=_transfer_config())
            if tmp.stat().st_size != source["size"]:
                raise StorageError(f"cannot download {uri}: got {tmp.stat().st_size} of {source['size']} bytes; retry")
            os.replace(tmp, dst)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        atomic_write_text(stamp, json.dumps(source))
        return dst


def _transfer_config() -> Any:
    """Multipart above 64 MB, a few threads: model shards upload in parallel parts."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=64 * 1024 * 1024, max_concurrency=4, use_threads=True)
