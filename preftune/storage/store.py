"""``Storage``: one object for every artifact, local paths and ``s3://`` URIs alike.

Each call parses the URI and hands it to the local side (:mod:`preftune.storage.local`) or the
S3 side (:mod:`preftune.storage.s3`); what a reader may rely on (atomic files and folders) is in
the package docstring.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.errors import StorageError
from preftune.home import preftune_home
from preftune.storage import local
from preftune.storage.s3 import S3Backend
from preftune.storage.uri import join, parse_uri

if TYPE_CHECKING:
    from preftune.config import StorageSection


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
        self.s3_backend = S3Backend(
            self.s3_endpoint_url,
            self.s3_region,
            self.max_attempts,
            self.connect_timeout,
            self.read_timeout,
            self.cache_dir,
        )

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
        return self.s3_backend.endpoint_url

    @property
    def region(self) -> str:
        return self.s3_backend.region

    @property
    def endpoint_description(self) -> str:
        return self.s3_backend.endpoint_description

    def default_root(self) -> str:
        """Where artifacts go: the configured root, else ``<preftune home>/artifacts``."""
        return self.root or str(preftune_home() / "artifacts")

    join = staticmethod(join)

    # ---- files -----------------------------------------------------------------------

    def exists(self, uri: str | os.PathLike[str]) -> bool:
        """True for an existing file, or a folder (on S3: a *complete* published folder).

        An S3 prefix without a completion marker is not there (a publish in progress);
        one whose marker disagrees with the bucket raises ``StorageError: incomplete folder``.
        """
        uri = os.fspath(uri)
        parsed = parse_uri(uri)
        if parsed.scheme == "file":
            return local.exists(parsed.key)
        return self.s3_backend.exists(uri, parsed)

    def read_bytes(self, uri: str | os.PathLike[str]) -> bytes:
        """The whole content of a file."""
        uri = os.fspath(uri)
        parsed = parse_uri(uri)
        if parsed.scheme == "file":
            return local.read_bytes(parsed.key, uri)
        return self.s3_backend.read_bytes(uri, parsed)

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
            local.atomic_write_bytes(parsed.key, data)
        else:
            self.s3_backend.write_bytes(uri, parsed, data)
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
            return local.list_files(parsed.key)
        return self.s3_backend.list(uri, parsed)

    def delete(self, uri: str | os.PathLike[str]) -> bool:
        """Delete a file or a whole folder; True if something was there.

        On S3 the folder's marker goes first, so readers stop seeing the folder before
        any of its files disappear.
        """
        uri = os.fspath(uri)
        parsed = parse_uri(uri)
        if parsed.scheme == "file":
            return local.delete(parsed.key, uri)
        return self.s3_backend.delete(uri, parsed)

    # ---- folders ---------------------------------------------------------------------

    def put_dir(self, local_dir: str | os.PathLike[str], uri: str | os.PathLike[str]) -> str:
        """Publish a whole local folder (a model, a dataset) at ``uri``, atomically for readers.

        Replaces a folder already there. See the package docstring for the S3 protocol.
        Returns the URI.
        """
        uri = os.fspath(uri)
        src = Path(os.fspath(local_dir)).expanduser()
        if not src.is_dir():
            what = "does not exist" if not src.exists() else "is not a folder"
            raise StorageError(f"cannot publish {src} to {uri}: {src} {what}")
        parsed = parse_uri(uri)
        if parsed.scheme == "file":
            local._copy_local_dir(src, Path(parsed.key))
        else:
            self.s3_backend.put_dir(src, uri, parsed)
        return uri

    def get_dir(self, uri: str | os.PathLike[str], local_dir: str | os.PathLike[str]) -> Path:
        """Copy a whole published folder to ``local_dir`` (replaced atomically). Returns its path."""
        uri = os.fspath(uri)
        dst = Path(os.fspath(local_dir)).expanduser()
        parsed = parse_uri(uri)
        if parsed.scheme == "file":
            return local._copy_local_dir(Path(parsed.key), dst)
        return self.s3_backend.get_dir(uri, parsed, dst, stamp=None)

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
            return local.local_path(parsed.key, uri)
        return self.s3_backend.local_path(uri, parsed, cache_dir)
