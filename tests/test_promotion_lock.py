"""The promotion lock's answers to the registry's race windows, on an in-memory registry.

The real cross-process race runs in ``test_promote_concurrency`` against an ``mlflow server`` on
PostgreSQL; this pins the interleaving that once made it fail: MLflow's SQL store answers a
duplicate ``create_registered_model`` by reading the existing model back, and when its holder
deletes it in between, the create fails with RESOURCE_DOES_NOT_EXIST instead of
RESOURCE_ALREADY_EXISTS.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    PERMISSION_DENIED,
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
)

from preftune import registry
from preftune.errors import UnreachableError
from preftune.registry import PromotionLock


class Registry:
    """Registered models with tags, and the store's error codes; ``script`` injects answers to create."""

    def __init__(self, script: list[str] | None = None):
        self.models: dict[str, dict[str, str]] = {}
        self.script = list(script or [])
        self.creates = 0

    def create_registered_model(self, name, tags=None, description=None):
        self.creates += 1
        if self.script:
            step = self.script.pop(0)
            if step == "holder-released-during-readback":
                # the insert hit the holder's row; the holder deleted it before the store read it back
                self.models.pop(name, None)
                raise MlflowException(f"Registered Model with name={name} not found", RESOURCE_DOES_NOT_EXIST)
        if name in self.models:
            raise MlflowException(f"Registered Model (name={name}) already exists.", RESOURCE_ALREADY_EXISTS)
        self.models[name] = dict(tags or {})
        return SimpleNamespace(name=name, tags=self.models[name])

    def get_registered_model(self, name):
        if name not in self.models:
            raise MlflowException(f"Registered Model with name={name} not found", RESOURCE_DOES_NOT_EXIST)
        return SimpleNamespace(name=name, tags=dict(self.models[name]))

    def delete_registered_model(self, name):
        if self.models.pop(name, None) is None:
            raise MlflowException(f"Registered Model with name={name} not found", RESOURCE_DOES_NOT_EXIST)


def test_a_lock_released_while_the_store_reads_it_back_is_retried_and_taken():
    reg = Registry(script=["ok", "holder-released-during-readback"])
    holder = PromotionLock(reg, "m", lease_s=60, timeout_s=1)
    holder.acquire()
    waiter = PromotionLock(reg, "m", lease_s=60, timeout_s=1)
    with waiter.hold():
        assert reg.models["m" + registry.LOCK_SUFFIX][registry.TAG_LOCK_OWNER] == waiter.owner
        waiter.verify()
    assert reg.creates == 3  # holder, the failed read-back, the retry
    assert "m" + registry.LOCK_SUFFIX not in reg.models


def test_a_held_lock_times_out_naming_its_owner_and_other_registry_errors_propagate():
    reg = Registry()
    holder = PromotionLock(reg, "m", lease_s=60, timeout_s=1)
    holder.acquire()
    with pytest.raises(UnreachableError, match=f"held by {holder.owner}"):
        PromotionLock(reg, "m", lease_s=60, timeout_s=0.2).acquire()

    class Broken(Registry):
        def create_registered_model(self, name, tags=None, description=None):
            raise MlflowException("permission denied", PERMISSION_DENIED)

    with pytest.raises(MlflowException, match="permission denied"):
        PromotionLock(Broken(), "m", lease_s=60, timeout_s=1).acquire()
