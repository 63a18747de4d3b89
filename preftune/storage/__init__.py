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

boto3 is imported only when an S3 URI is first used, so importing this package (for
:func:`atomic_write_text`, say) stays cheap for the CLI.

Modules: :mod:`~preftune.storage.uri` (locations), :mod:`~preftune.storage.local` (atomic files
and folders on a local disk), :mod:`~preftune.storage.s3` (client, errors, retries, the marker
protocol), :mod:`~preftune.storage.store` (``Storage``, which hands each call to one of them).
"""

from __future__ import annotations

from preftune.storage.local import atomic_write_bytes, atomic_write_text
from preftune.storage.s3 import DEFAULT_REGION, FOLDER_RETRY_BASE_DELAY, FOLDER_RETRY_ROUNDS
from preftune.storage.store import Storage
from preftune.storage.uri import (
    CACHE_STAMP_NAME,
    MARKER_FORMAT,
    MARKER_NAME,
    SUPPORTED_SCHEMES,
    ParsedURI,
    is_s3_uri,
    parse_uri,
)

__all__ = [
    "CACHE_STAMP_NAME",
    "DEFAULT_REGION",
    "FOLDER_RETRY_BASE_DELAY",
    "FOLDER_RETRY_ROUNDS",
    "MARKER_FORMAT",
    "MARKER_NAME",
    "SUPPORTED_SCHEMES",
    "ParsedURI",
    "Storage",
    "atomic_write_bytes",
    "atomic_write_text",
    "is_s3_uri",
    "parse_uri",
]
