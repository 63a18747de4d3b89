"""Concurrent promotions against a real ``mlflow server`` on PostgreSQL, from separate processes.

The promotion lock is a registered model created with create-if-absent (see
``preftune.registry``). These tests start real processes that race for it: a
read-modify-write counter that loses updates without the lock and none with it, and two
promotions finishing together, which must leave the better model as champion and lose no version.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from test_evaluate_support import toy_config, toy_world  # noqa: F401 (fixture)
from test_promote import LOOSE

from preftune import registry
from preftune.errors import UnreachableError
from preftune.registry import LockLost, PromotionLock

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

BARRIER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path

    def barrier(folder, me, phase):
        # say we are ready (imports done), then wait for the parent's go
        (Path(folder) / f"ready-{phase}-{me}").write_text("")
        while not (Path(folder) / f"go-{phase}").exists():
            time.sleep(0.01)
    """
)

COUNTER_WORKER = BARRIER + textwrap.dedent(
    """
    import json
    from mlflow import MlflowClient
    from preftune.registry import PromotionLock

    uri, name, folder, me, rounds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def bump(key):
        value = int(client.get_registered_model(name).tags.get(key, "0"))
        time.sleep(0.15)  # widen the read-modify-write window
        client.set_registered_model_tag(name, key, str(value + 1))
        return value

    barrier(folder, me, "unlocked")
    seen_unlocked = [bump("unlocked") for _ in range(rounds)]
    barrier(folder, me, "locked")
    seen_locked = []
    for _ in range(rounds):
        lock = PromotionLock(client, name, lease_s=60, timeout_s=120)
        with lock.hold():
            seen_locked.append(bump("locked"))
    print(json.dumps({"unlocked": seen_unlocked, "locked": seen_locked}))
    """
)

PROMOTE_WORKER = BARRIER + textwrap.dedent(
    """
    import json
    from preftune.config import parse_config
    from preftune.evaluate.promote import promote

    cfg = parse_config(json.loads(sys.argv[1]))
    candidate, eval_run, folder, me = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    import mlflow, torch, transformers  # the heavy imports happen before the barrier
    barrier(folder, me, "promote")
    res = promote(cfg, candidate, eval_run_id=eval_run, user=me)
    print(json.dumps({"promoted": res.promoted, "version": res.version, "previous": res.previous,
                      "rechecked": res.rechecked_against, "reasons": res.reasons}))
    """
)


def _spawn(code: str, args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false", PYTHONWARNINGS="ignore")
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _release(folder: Path, phase: str, n: int, procs: list[subprocess.Popen], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while len(list(folder.glob(f"ready-{phase}-*"))) < n:
        for p in procs:
            if p.poll() is not None and p.returncode != 0:
                raise AssertionError(f"worker died: {p.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"workers not ready for {phase}"
        time.sleep(0.05)
    (folder / f"go-{phase}").write_text("")


def _results(procs: list[subprocess.Popen]) -> list[dict]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def test_lock_gives_mutual_exclusion_across_processes(mlflow_server, tmp_path):
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    name = "race-counter"
    # the tags exist before the race: MLflow's server inserts a new tag key without an upsert, so two
    # processes creating the same key at once get a unique-key error (updates of an existing key are fine)
    client.create_registered_model(name, tags={"unlocked": "0", "locked": "0"})
    workers, rounds = 3, 3
    procs = [_spawn(COUNTER_WORKER, [mlflow_server, name, str(tmp_path), f"w{i}", str(rounds)]) for i in range(workers)]
    _release(tmp_path, "unlocked", workers, procs)
    # the unlocked phase finishes within a few seconds; give it time, then start the locked phase
    _release(tmp_path, "locked", workers, procs)
    results = _results(procs)
    tags = client.get_registered_model(name).tags
    # without the lock the workers overwrite each other (this is what the lock is for) ...
    assert int(tags["unlocked"]) < workers * rounds
    # ... with it, every read-modify-write saw the previous one's result: no lost update, no value seen twice
    assert int(tags["locked"]) == workers * rounds
    seen = sorted(v for r in results for v in r["locked"])
    assert seen == list(range(workers * rounds))
    assert registry.get_registered_model(client, name + registry.LOCK_SUFFIX) is None  # released


def test_expired_lock_is_broken_and_a_live_one_times_out(mlflow_server):
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    name = "lock-lease"
    client.create_registered_model(
        name + registry.LOCK_SUFFIX,
        tags={registry.TAG_LOCK_OWNER: "crashed-host:1:abc", registry.TAG_LOCK_EXPIRES: f"{time.time() - 5:.3f}"},
    )
    lock = PromotionLock(client, name, lease_s=30, timeout_s=10)
    lock.acquire()
    tags = client.get_registered_model(name + registry.LOCK_SUFFIX).tags
    assert tags[registry.TAG_LOCK_OWNER] == lock.owner
    other = PromotionLock(client, name, lease_s=30, timeout_s=0.5)
    with pytest.raises(UnreachableError, match=f"held by {lock.owner}"):
        other.acquire()
    # a holder whose lock was taken over must not write
    client.set_registered_model_tag(name + registry.LOCK_SUFFIX, registry.TAG_LOCK_OWNER, "someone-else")
    with pytest.raises(LockLost):
        lock.verify()
    lock.release()  # not ours any more: left alone
    assert registry.get_registered_model(client, name + registry.LOCK_SUFFIX) is not None
    client.delete_registered_model(name + registry.LOCK_SUFFIX)


def test_two_promotions_finishing_together_leave_the_better_champion(mlflow_server, toy_world, tmp_path):  # noqa: F811
    from preftune.evaluate.promote import promote
    from preftune.evaluate.step import evaluate

    name = "race-policy"
    cfg = toy_config(mlflow_server, toy_world, model=name, **LOOSE)
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    assert promote(cfg, str(toy_world["base"])).version == "1"
    ev = {k: evaluate(cfg, str(toy_world[k]), progress=False) for k in ("good", "medium")}
    assert all(e.passed and e.champion_version == "1" for e in ev.values()), {k: e.reasons for k, e in ev.items()}

    cfg_json = json.dumps(cfg.model_dump(mode="json"))
    procs = [
        _spawn(PROMOTE_WORKER, [cfg_json, str(toy_world[k]), ev[k].run_id, str(tmp_path), k])
        for k in ("good", "medium")
    ]
    _release(tmp_path, "promote", 2, procs)
    good, medium = _results(procs)

    assert good["promoted"], good["reasons"]
    champion = registry.alias_version(client, name, "champion")
    assert champion == good["version"]
    mv = client.get_model_version(name, champion)
    assert mv.tags["preftune.model_hash"] == ev["good"].results["candidate"]["model_hash"]
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    promoted = [r for r in (good, medium) if r["promoted"]]
    # no version lost: one new version per successful promotion, all distinct, every one with passed gates
    assert versions == list(range(1, 2 + len(promoted)))
    assert all(client.get_model_version(name, str(v)).tags["preftune.gates"] == "passed" for v in versions)
    if medium["promoted"]:  # medium got in first; good then re-checked against it and replaced it
        assert good["rechecked"] == medium["version"] and good["previous"] == medium["version"]
        assert registry.alias_version(client, name, "previous-champion") == medium["version"]
    else:  # good got in first; medium was re-checked against it and rejected
        assert medium["rechecked"] == good["version"]
        assert any("the champion changed" in r for r in medium["reasons"])
        assert registry.alias_version(client, name, "previous-champion") == "1"
    assert registry.get_registered_model(client, name + registry.LOCK_SUFFIX) is None
