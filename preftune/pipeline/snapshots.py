"""The data snapshot: the identity of everything outside the config that the cacheable steps read.

:func:`data_snapshot` fingerprints the prompt set, judgement export, policy and reward base (a
content hash, a storage completion marker or, for local model folders, file names, sizes and
modification times), together with the effective config's hash and the code's version. The
snapshot is an input of collect, check-fit, train-reward and ppo, and the dataset hash of every
step after collect, so new judgements, a replaced model or a preftune upgrade always re-run the
steps that read them (Kubeflow keys its step cache by the inputs).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.errors import InputError
from preftune.pipeline.preflight import is_mlflow_ref

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import RunConfig


def _local_fingerprint(path: Path) -> str:
    """A file: its content hash. A folder: names, sizes and mtimes (hashing GBs of weights each run costs minutes)."""
    h = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return "sha256:" + h.hexdigest()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "files:" + h.hexdigest()


def _fingerprint(ref: str, cfg: RunConfig, storage: Any) -> str:
    from preftune.storage import MARKER_NAME, Storage, is_s3_uri, parse_uri

    if ref.startswith("demo:"):
        from preftune.world import world_key

        return f"world:{world_key(cfg.world)}"
    if is_mlflow_ref(ref):
        return f"mlflow:{ref}"
    if is_s3_uri(ref):
        if storage.list(ref):  # a folder: its completion marker lists every file's sha256
            return "marker:" + hashlib.sha256(storage.read_bytes(Storage.join(ref, MARKER_NAME))).hexdigest()
        return "sha256:" + hashlib.sha256(storage.read_bytes(ref)).hexdigest()
    path = Path(parse_uri(ref).key)
    if not path.exists():
        raise InputError(f"{ref} does not exist")
    return _local_fingerprint(path)


def snapshot_sources(cfg: RunConfig) -> dict[str, str]:
    """What outside the config the cacheable steps read, by config field."""
    out = {
        "data.prompts": cfg.data.prompts,
        "models.policy": cfg.models.policy,
        "models.reward_base": cfg.models.reward_base,
    }
    if cfg.ppo.prompts:
        out["ppo.prompts"] = cfg.ppo.prompts
    if cfg.data.judgements != "simulated" and cfg.data.judgements_path:
        out["data.judgements_path"] = cfg.data.judgements_path
    return out


def data_snapshot(cfg: RunConfig) -> tuple[str, dict[str, str]]:
    """The identity of what a run reads: ``snap-<16 hex>`` and its parts.

    The parts: the fingerprint of each data source, the effective config's hash (every field,
    defaults included: the ``config`` parameter only carries the fields that differ from the
    defaults, so a new preftune version with other defaults must not reuse old results) and the
    package version (on a cluster the pinned image is part of Kubeflow's cache key as well). Not
    the git sha: a commit that changes no behaviour must not throw the cache away.
    """
    from preftune import __version__
    from preftune.storage import Storage

    storage = Storage.from_config(cfg.storage)
    prints = {name: _fingerprint(ref, cfg, storage) for name, ref in snapshot_sources(cfg).items()}
    prints["config_hash"] = cfg.config_hash()
    prints["preftune"] = __version__
    digest = hashlib.sha256(json.dumps(prints, sort_keys=True).encode()).hexdigest()[:16]
    return f"snap-{digest}", prints
