"""Storage locations: local paths, ``file://`` and ``s3://bucket/prefix`` URIs, and the names the layout uses."""

from __future__ import annotations

import os
import re
from typing import NamedTuple

from preftune.errors import StorageError

MARKER_NAME = "_PREFTUNE_COMPLETE.json"
"""Written last when a folder is published to S3; lists every file with size and sha256."""

MARKER_FORMAT = "preftune.folder"
SUPPORTED_SCHEMES = ("file", "s3")
CACHE_STAMP_NAME = ".preftune-source.json"
"""Inside a folder materialised by :meth:`Storage.local_path`: which published version it holds."""

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


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


def s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI (``/`` separated, no doubled slashes)."""
    parsed = parse_uri(base)
    if parsed.scheme == "s3":
        pieces = [parsed.key] if parsed.key else []
        pieces += [p.strip("/") for p in parts if p and p.strip("/")]
        return s3_uri(parsed.bucket, "/".join(pieces))
    return os.path.join(parsed.key, *parts)
