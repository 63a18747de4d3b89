"""The local side: atomic file writes and atomic folder publishing on a local disk, and the local backend.

A reader never sees half a file or half a folder. A file is written to a temporary file in the
same folder, ``fsync``-ed and moved over the target with ``os.replace``. A folder is copied
into a hidden temporary sibling (``.<name>.tmp-<random>``) and renamed into place; an existing
folder is renamed aside first and deleted only after the new one is in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from preftune.errors import StorageError
from preftune.storage.uri import MARKER_NAME

_CHUNK = 1024 * 1024


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
# The local backend: what Storage does for a plain path or a file:// URI


def exists(path: str) -> bool:
    return Path(path).exists()


def read_bytes(path: str, uri: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise StorageError(f"{uri} does not exist") from None
    except IsADirectoryError:
        raise StorageError(f"{uri} is a folder, not a file (use get_dir)") from None
    except OSError as exc:
        raise StorageError(f"cannot read {uri}: {exc.strerror or exc}") from None


def list_files(path: str) -> list[str]:
    root = Path(path)
    if not root.is_dir():
        return []
    return [rel for rel, _ in _local_files(root)]


def delete(path_text: str, uri: str) -> bool:
    path = Path(path_text)
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


def local_path(path_text: str, uri: str) -> Path:
    path = Path(path_text)
    if not path.exists():
        raise StorageError(f"{uri} does not exist")
    return path
