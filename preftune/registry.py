"""The MLflow Model Registry side of promotion: model references, the promotion lock, aliases.

The lock (why it is built this way)
-----------------------------------
Two scheduled retraining runs can finish together. Each evaluated its candidate against the
champion *of its start*; if both simply moved the ``champion`` alias, the last writer would win,
even when its model is the worse one. So moving the alias happens in a critical section: under
a lock, the promotion re-reads the champion, and when it changed since the evaluation it
re-checks the candidate against the new champion before registering anything.

The lock must work for every process that can reach the tracking server, on any machine,
whatever the server's backend store, with nothing but the MLflow API. The REST API has no
compare-and-set on tags, and write-then-read-back on a tag is not mutual exclusion (two writers
can both read back their own value before the other's write lands). But it has one atomic
test-and-set: ``create_registered_model(name)`` fails with ``RESOURCE_ALREADY_EXISTS`` when the
name exists, enforced by the store (a unique key in SQL stores, a directory create in the file
store). So the lock is a registered model named ``<model>.promotion-lock``:

- acquire = create it, with tags naming the owner (host, pid, random id) and a lease expiry;
  on ``RESOURCE_ALREADY_EXISTS`` wait (jittered back-off) and retry, up to ``lock_timeout_s``;
- release = delete it, after checking by a re-read that we still own it;
- a holder re-reads the lock right before each registry write and stops if it lost it;
- a lock past its lease (a promotion that crashed; the critical section takes seconds and the
  lease defaults to ten minutes) may be broken by a waiter, which re-reads it and deletes it
  only if the owner is still the expired one it saw.

Mutual exclusion therefore holds as long as a holder finishes its critical section within its
lease and clocks agree to well within the lease. While the lock exists it is visible in the
MLflow UI, with its owner and expiry, which is also how an operator clears a lock by hand.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import random
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from preftune.errors import ConfigError, InputError, PreftuneError, UnreachableError
from preftune.policy_model import folder_hash  # noqa: F401 (re-exported: the registry's content hash)

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".promotion-lock"
TAG_LOCK_OWNER = "preftune.lock.owner"
TAG_LOCK_EXPIRES = "preftune.lock.expires_at"
TAG_LOCK_PURPOSE = "preftune.lock.purpose"

# version tags (the audit trail of a registered version)
TAG_DATASET_HASH = "preftune.dataset_hash"
TAG_REWARD_MODEL_VERSION = "preftune.reward_model_version"
TAG_EVAL_RUN_ID = "preftune.eval_run_id"
TAG_PROMOTE_RUN_ID = "preftune.promote_run_id"
TAG_GATES = "preftune.gates"
TAG_GATE_RESULTS = "preftune.gate_results"
TAG_GATES_FAILED = "preftune.gates_failed"
TAG_SUITE = "preftune.suite"
TAG_SUITE_HASH = "preftune.suite_hash"
TAG_CONFIG_HASH = "preftune.config_hash"
TAG_GIT_SHA = "preftune.git_sha"
TAG_PIPELINE_RUN_ID = "preftune.pipeline_run_id"
TAG_MODEL_HASH = "preftune.model_hash"
TAG_CANDIDATE = "preftune.candidate"
TAG_REPLACED = "preftune.replaced_version"
TAG_FIRST_PROMOTION = "preftune.first_promotion"
TAG_RECHECKED = "preftune.rechecked_against"
TAG_PROMOTED_BY = "preftune.promoted_by"
TAG_ROLLBACK = "preftune.rollback"
GATE_TAG_PREFIX = "gate."

# run tags written by evaluate and promote
RUN_TAG_EVAL_PASSED = "preftune.eval.passed"
RUN_TAG_EVAL_CANDIDATE = "preftune.eval.candidate"  # the candidate's reference as evaluate received it
RUN_TAG_EVAL_REASONS = "preftune.eval.reasons"
RUN_TAG_PROMOTION = "preftune.promotion.status"
RUN_TAG_PROMOTION_REASONS = "preftune.promotion.reasons"
RUN_TAG_REGISTERED_VERSION = "preftune.promotion.version"


def current_user() -> str:
    """Who is acting: ``$PREFTUNE_USER``, else the OS user."""
    env = os.environ.get("PREFTUNE_USER")
    if env:
        return env
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _error_code(err: Exception) -> str | None:
    return getattr(err, "error_code", None)


def mlflow_client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def get_registered_model(client: Any, name: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if _error_code(err) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def alias_version(client: Any, name: str, alias: str) -> str | None:
    """The version an alias points to, or None (no model, or no such alias)."""
    rm = get_registered_model(client, name)
    if rm is None:
        return None
    version = (rm.aliases or {}).get(alias)
    return str(version) if version is not None else None


# --------------------------------------------------------------------------------------
# Model references


@dataclass
class ResolvedModel:
    """A model reference made local: the folder to load, and where it came from."""

    ref: str
    path: Path
    registered_name: str | None = None
    version: str | None = None

    @property
    def label(self) -> str:
        if self.version is not None:
            return f"{self.registered_name} v{self.version}"
        return self.ref


def parse_models_uri(ref: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, None, alias); ``models:/name/3`` -> (name, "3", None)."""
    body = ref.removeprefix("models:/")
    if "@" in body:
        name, alias = body.split("@", 1)
        if not name or not alias:
            raise ConfigError(f"{ref}: expected models:/<name>@<alias>")
        return name, None, alias
    name, _, version = body.rpartition("/")
    if not name or not version.isdigit():
        raise ConfigError(f"{ref}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return name, version, None


def resolve_model(
    ref: str, client: Any | None, workdir: Path, storage: Any | None = None, world: Any = None
) -> ResolvedModel:
    """Make a model reference local: folder, ``s3://``, ``demo:``, or a registry ``models:/`` URI."""
    if ref.startswith("models:/"):
        if client is None:
            raise ConfigError(f"{ref}: a registry reference needs the tracking server")
        from mlflow.exceptions import MlflowException

        name, version, alias = parse_models_uri(ref)
        try:
            if alias is not None:
                version = alias_version(client, name, alias)
                if version is None:
                    raise InputError(f"{ref}: registered model {name!r} has no alias {alias!r}")
            mv = client.get_model_version(name, version)
            dst = workdir / f"{name}-v{mv.version}"
            dst.mkdir(parents=True, exist_ok=True)
            import mlflow

            local = Path(
                mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(dst))
            )
        except MlflowException as err:
            raise InputError(f"{ref}: cannot fetch from the registry: {err.message}") from None
        from preftune.policy_model import policy_folder_of

        try:
            folder = policy_folder_of(local)
        except KeyError as err:
            raise InputError(f"{ref}: {err.args[0]}") from None
        return ResolvedModel(ref, folder, name, str(mv.version))
    if ref.startswith("demo:"):
        from preftune.world import resolve_model_ref

        return ResolvedModel(ref, Path(resolve_model_ref(ref, world)))
    if ref.startswith("s3://"):
        from preftune.storage import Storage

        return ResolvedModel(ref, (storage or Storage()).local_path(ref))
    p = Path(ref).expanduser()
    if not p.is_dir():
        raise InputError(f"{ref}: model folder not found")
    return ResolvedModel(ref, p)


# --------------------------------------------------------------------------------------
# The promotion lock


class LockLost(PreftuneError):
    """The lock expired and was taken over while we held it: stop before writing anything."""

    exit_code = UnreachableError.exit_code


class PromotionLock:
    """Mutual exclusion for registry writes of one registered model (see the module docstring)."""

    def __init__(self, client: Any, model_name: str, *, lease_s: float, timeout_s: float, purpose: str = "promote"):
        self.client = client
        self.name = model_name + LOCK_SUFFIX
        self.lease_s = lease_s
        self.timeout_s = timeout_s
        self.purpose = purpose
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.held = False

    def _tags(self) -> dict[str, str]:
        expires = utcnow().timestamp() + self.lease_s
        return {
            TAG_LOCK_OWNER: self.owner,
            TAG_LOCK_EXPIRES: f"{expires:.3f}",
            TAG_LOCK_PURPOSE: self.purpose,
        }

    def _read(self) -> dict[str, str] | None:
        rm = get_registered_model(self.client, self.name)
        return None if rm is None else dict(rm.tags or {})

    def acquire(self) -> None:
        from mlflow.exceptions import MlflowException

        deadline = time.monotonic() + self.timeout_s
        delay = 0.05
        while True:
            try:
                self.client.create_registered_model(
                    self.name,
                    tags=self._tags(),
                    description="preftune promotion lock: held while a promotion or rollback moves aliases. "
                    "It is deleted when done; an expired one belongs to a crashed process.",
                )
                self.held = True
                return
            except MlflowException as err:
                code = _error_code(err)
                if code == "RESOURCE_DOES_NOT_EXIST":
                    # MLflow's SQL store answers a duplicate name by reading the existing model back; when
                    # its holder released it in between, that read says "not found": the lock is free, retry
                    continue
                if code != "RESOURCE_ALREADY_EXISTS":
                    raise
            tags = self._read()
            if tags is not None:
                expires = float(tags.get(TAG_LOCK_EXPIRES, "0") or 0)
                if expires and utcnow().timestamp() > expires:
                    self._break(tags)
                    continue
            if time.monotonic() > deadline:
                owner = (tags or {}).get(TAG_LOCK_OWNER, "unknown")
                raise UnreachableError(
                    f"registered model lock {self.name!r} is held by {owner} (another promotion or rollback); "
                    f"waited {self.timeout_s:g}s. Retry later; if that process is gone, delete the registered "
                    f"model {self.name!r}"
                )
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)

    def _break(self, seen: dict[str, str]) -> None:
        """Delete an expired lock, but only if it is still the one we saw expire."""
        from mlflow.exceptions import MlflowException

        now = self._read()
        if now is None or now.get(TAG_LOCK_OWNER) != seen.get(TAG_LOCK_OWNER):
            return
        log.warning("breaking expired promotion lock %s held by %s", self.name, seen.get(TAG_LOCK_OWNER))
        try:
            self.client.delete_registered_model(self.name)
        except MlflowException as err:
            if _error_code(err) != "RESOURCE_DOES_NOT_EXIST":
                raise

    def verify(self) -> None:
        """Raise :class:`LockLost` unless we still own an unexpired lock (call before each write)."""
        tags = self._read()
        if tags is None or tags.get(TAG_LOCK_OWNER) != self.owner:
            raise LockLost(
                f"lost the promotion lock {self.name!r} (it expired and was taken over); nothing more was written"
            )
        if utcnow().timestamp() > float(tags.get(TAG_LOCK_EXPIRES, "0") or 0):
            raise LockLost(f"the promotion lock {self.name!r} expired while held; nothing more was written")

    def release(self) -> None:
        from mlflow.exceptions import MlflowException

        if not self.held:
            return
        self.held = False
        tags = self._read()
        if tags is None or tags.get(TAG_LOCK_OWNER) != self.owner:
            return
        try:
            self.client.delete_registered_model(self.name)
        except MlflowException as err:
            if _error_code(err) != "RESOURCE_DOES_NOT_EXIST":
                raise

    @contextlib.contextmanager
    def hold(self) -> Iterator[PromotionLock]:
        self.acquire()
        try:
            yield self
        finally:
            self.release()


# --------------------------------------------------------------------------------------
# Rollback and listing


def rollback(cfg: Any, to_version: str, reason: str, user: str | None = None) -> dict[str, Any]:
    """Move the champion alias back to ``to_version``; recorded on the version, the model and a run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from preftune import tracking

    if not reason.strip():
        raise ConfigError("rollback needs --reason: say why, it is recorded with the change")
    user = user or current_user()
    tracking.configure(cfg)
    uri = tracking.resolve_tracking_uri(cfg.tracking)
    client = mlflow_client(uri)
    name = cfg.models.registered_model
    alias, prev_alias = cfg.promotion.champion_alias, cfg.promotion.previous_alias
    if get_registered_model(client, name) is None:
        raise InputError(f"registered model {name!r} does not exist in {uri}: nothing to roll back")
    try:
        target = client.get_model_version(name, str(to_version))
    except MlflowException:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        raise InputError(f"{name!r} has no version {to_version} (versions: {versions})") from None
    if (target.tags or {}).get(TAG_GATES) != "passed":
        raise InputError(
            f"{name!r} v{to_version} has no passed gate results ({TAG_GATES} tag); refusing to make it champion"
        )
    now = iso(utcnow())
    with tracking.start_step_run(
        "rollback",
        cfg,
        tags={
            "preftune.rollback.to": str(to_version),
            "preftune.rollback.by": user,
            "preftune.rollback.reason": reason[:4000],
        },
    ) as run:
        lock = PromotionLock(
            client,
            name,
            lease_s=cfg.promotion.lock_lease_s,
            timeout_s=cfg.promotion.lock_timeout_s,
            purpose=f"rollback to v{to_version} by {user}",
        )
        with lock.hold():
            current = alias_version(client, name, alias)
            if current == str(to_version):
                raise InputError(f"{name!r} v{to_version} is already the {alias}")
            record = {
                "at": now,
                "by": user,
                "reason": reason,
                "from": current,
                "to": str(to_version),
                "run_id": run.info.run_id,
            }
            lock.verify()
            client.set_model_version_tag(name, str(to_version), TAG_ROLLBACK, json.dumps(record))
            if current is not None:
                client.set_registered_model_alias(name, prev_alias, current)
            client.set_registered_model_alias(name, alias, str(to_version))
            client.set_registered_model_tag(name, "preftune.last_rollback", json.dumps(record))
            after = alias_version(client, name, alias)
            if after != str(to_version):  # pragma: no cover - only a writer bypassing the lock gets here
                raise PreftuneError(f"{alias} of {name!r} is v{after} after the rollback, expected v{to_version}")
        mlflow.set_tag("preftune.rollback.from", str(current))
    return record


def list_versions(cfg: Any) -> dict[str, Any]:
    """Every version of the registered model with its gate results, audit tags and aliases."""
    from preftune import tracking

    uri = tracking.resolve_tracking_uri(cfg.tracking)
    tracking.check_reachable(uri, cfg.tracking.timeout_s)
    client = mlflow_client(uri)
    name = cfg.models.registered_model
    rm = get_registered_model(client, name)
    if rm is None:
        return {"name": name, "uri": uri, "exists": False, "versions": [], "aliases": {}}
    aliases = {k: str(v) for k, v in (rm.aliases or {}).items()}
    by_version: dict[str, list[str]] = {}
    for a, v in aliases.items():
        by_version.setdefault(v, []).append(a)
    versions = []
    for mv in sorted(client.search_model_versions(f"name='{name}'"), key=lambda m: int(m.version), reverse=True):
        tags = dict(mv.tags or {})
        gates = {k.removeprefix(GATE_TAG_PREFIX): v for k, v in tags.items() if k.startswith(GATE_TAG_PREFIX)}
        versions.append(
            {
                "version": str(mv.version),
                "created": iso(datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=timezone.utc)),
                "aliases": sorted(by_version.get(str(mv.version), [])),
                "gates": tags.get(TAG_GATES, "unknown"),
                "gates_passed": sum(1 for v in gates.values() if v == "pass"),
                "gates_failed": sum(1 for v in gates.values() if v == "fail"),
                "gate_results": gates,
                "suite": tags.get(TAG_SUITE),
                "eval_run_id": tags.get(TAG_EVAL_RUN_ID),
                "dataset_hash": tags.get(TAG_DATASET_HASH),
                "reward_model_version": tags.get(TAG_REWARD_MODEL_VERSION),
                "first_promotion": tags.get(TAG_FIRST_PROMOTION) == "true",
                "promoted_by": tags.get(TAG_PROMOTED_BY),
                "rollback": json.loads(tags[TAG_ROLLBACK]) if TAG_ROLLBACK in tags else None,
            }
        )
    lock = get_registered_model(client, name + LOCK_SUFFIX)
    return {
        "name": name,
        "uri": uri,
        "exists": True,
        "aliases": aliases,
        "champion": aliases.get(cfg.promotion.champion_alias),
        "versions": versions,
        "lock": dict(lock.tags or {}) if lock is not None else None,
    }


def temp_workdir(prefix: str) -> tempfile.TemporaryDirectory:
    from preftune.home import preftune_home

    root = preftune_home() / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=prefix, dir=root)
