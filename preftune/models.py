"""Model references of the run config (``models.policy``, ``models.reward_base``) made into local folders.

A reference is one of:

- ``demo:policy`` / ``demo:reward-base``: the demo world's models (built on first use);
- ``models:/<name>@<alias>`` or ``models:/<name>/<version>``: a version of an MLflow registered
  model (a preftune policy or reward model), downloaded once into ``<home>/cache/models/``;
- ``s3://...``: a folder published through storage (fetched into its cache);
- a local folder (``save_pretrained`` layout);
- a Hugging Face model id (``org/name``, ``org/name@revision``, or ``hf:name``), resolved from the
  local Hugging Face cache ONLY (``$HF_HUB_CACHE`` / ``$HF_HOME``; as with ``HF_HUB_OFFLINE=1``):
  preftune never downloads weights at run time. An id that is not cached is an input error that
  says how to put it there.

A path that exists locally always wins over the Hugging Face reading of the same string.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from preftune.errors import ConfigError, InputError

HF_PREFIX = "hf:"
_HF_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}(?:@[\w./-]+)?$")
_COMPLETE = ".preftune-complete"


def is_hf_id(ref: str) -> bool:
    """Does ``ref`` read as a Hugging Face model id (``org/name``, ``org/name@rev``, ``hf:name``)?"""
    if ref.startswith(HF_PREFIX):
        return bool(_HF_ID.match(ref[len(HF_PREFIX) :]))
    return "/" in ref and not ref.startswith(("/", ".", "~")) and "://" not in ref and bool(_HF_ID.match(ref))


def hf_cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment at call time (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def resolve_hf_cached(ref: str, *, setting: str = "model") -> Path:
    """The snapshot folder of a Hugging Face model id in the local cache; never downloads.

    Raises :class:`InputError` naming the id, the cache folder and how to fill it when the model
    (or the requested revision) is not cached.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    body = ref[len(HF_PREFIX) :] if ref.startswith(HF_PREFIX) else ref
    repo_id, _, revision = body.partition("@")
    cache = hf_cache_dir()
    try:
        path = snapshot_download(repo_id=repo_id, revision=revision or None, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError) as err:
        what = f"{repo_id} (revision {revision})" if revision else repo_id
        raise InputError(
            f"{setting} = {ref!r}: Hugging Face model {what} is not in the local cache {cache} "
            "(preftune never downloads models at run time). Put it there on a machine with network access "
            f"(`huggingface-cli download {repo_id}` with the same HF_HOME / HF_HUB_CACHE), or give a local folder "
            f"saved with save_pretrained ({type(err).__name__})"
        ) from None
    return Path(path)


def _model_folder_of(downloaded: Path, ref: str) -> Path:
    """The from_pretrained folder inside a downloaded registry model (a preftune policy or reward model)."""
    import yaml

    mlmodel = downloaded / "MLmodel"
    if not mlmodel.is_file():
        if (downloaded / "config.json").is_file():
            return downloaded
        raise InputError(f"{ref}: the registered model has no MLmodel file and no config.json")
    meta = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
    arts = ((meta.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}
    if "policy" in arts:
        from preftune.policy_model import policy_folder_of

        return policy_folder_of(downloaded)
    from preftune.scoring.metadata import ARTIFACT_KEY as REWARD_KEY

    if REWARD_KEY in arts:
        return downloaded / arts[REWARD_KEY]["path"]
    raise InputError(
        f"{ref}: not a preftune policy or reward model (its MLmodel has none of the artifacts 'policy', "
        f"'{REWARD_KEY}'; found {sorted(arts) or 'none'})"
    )


def resolve_registry(ref: str, *, tracking_uri: str | None = None, cache: Path | None = None) -> Path:
    """``models:/name@alias`` or ``models:/name/version`` -> the local model folder (downloaded once, then cached).

    The alias is read at call time (an alias moved since the last call resolves to its new version);
    the download of a version is kept under ``cache`` (default ``<home>/cache/models``).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from preftune.home import preftune_home
    from preftune.registry import alias_version, parse_models_uri

    name, version, alias = parse_models_uri(ref)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if alias is not None:
            version = alias_version(client, name, alias)
            if version is None:
                raise InputError(f"{ref}: registered model {name!r} has no alias {alias!r} (or does not exist)")
        mv = client.get_model_version(name, version)
    except MlflowException as err:
        raise InputError(f"{ref}: cannot read the registry: {err.message}") from None
    root = (cache or preftune_home() / "cache" / "models") / f"{_safe(name)}-v{mv.version}"
    if not (root / _COMPLETE).is_file():
        tmp = root.with_name(root.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(tmp), tracking_uri=tracking_uri
            )
        except MlflowException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise InputError(f"{ref}: cannot download version {mv.version}: {err.message}") from None
        (tmp / _COMPLETE).write_text(f"{name}/{mv.version}\n", encoding="utf-8")
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    return _model_folder_of(root, ref)


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def resolve_model_ref(ref: str, cfg: Any = None, storage: Any = None, *, setting: str = "model") -> Path:
    """A local folder for any model reference of the run config (see the module docstring).

    ``cfg``: the :class:`~preftune.config.RunConfig` (demo world settings, tracking URI);
    ``storage``: a :class:`~preftune.storage.Storage` for ``s3://`` references; ``setting``: the
    config field, for messages.
    """
    ref = str(ref).strip()
    if not ref:
        raise ConfigError(f"{setting} is empty: give a folder, an s3:// URI, models:/name@alias or a HF model id")
    if ref.startswith("demo:"):
        from preftune.world import resolve_model_ref as demo_ref

        return Path(demo_ref(ref, getattr(cfg, "world", None)))
    if ref.startswith("models:/"):
        uri = None
        if cfg is not None:
            from preftune.tracking import resolve_tracking_uri

            uri = resolve_tracking_uri(cfg.tracking)
        return resolve_registry(ref, tracking_uri=uri)
    if "://" in ref:
        if storage is None:
            from preftune.storage import Storage

            storage = Storage.from_config(cfg.storage) if cfg is not None else Storage()
        return Path(storage.local_path(ref))
    local = Path(ref).expanduser()
    if local.exists() and not ref.startswith(HF_PREFIX):
        return local
    if is_hf_id(ref):
        return resolve_hf_cached(ref, setting=setting)
    raise InputError(
        f"{setting} = {ref!r}: no such folder; expected a model folder, an s3:// URI, models:/<name>@<alias>, "
        "demo:policy / demo:reward-base, or a Hugging Face id in the local cache (org/name)"
    )
