"""Shared test set-up: an isolated preftune home, and real servers started once per session.

Servers (S3-compatible, MLflow on PostgreSQL, ...) are real processes on 127.0.0.1, started by
session-scoped fixtures in ``tests/support``; the code under test only knows their URLs.
Set ``PREFTUNE_TEST_HOME`` to keep the test home (and its built demo world) between runs.
"""

from __future__ import annotations

import os
import tempfile

# Isolate every test run from the user's ~/.preftune and MLflow settings, before anything imports preftune.
os.environ["PREFTUNE_HOME"] = os.environ.get("PREFTUNE_TEST_HOME") or tempfile.mkdtemp(prefix="preftune-test-home-")
# Under pytest-xdist each worker has its own home (its own MLflow stores), but the expensive, build-once
# caches -- the demo world and the toy models -- are shared by the workers of one run: both are built
# under a lock or in a temporary folder renamed into place, so concurrent builders are safe.
if os.environ.get("PYTEST_XDIST_TESTRUNUID") and not os.environ.get("PREFTUNE_TEST_HOME"):
    _shared = os.path.join(tempfile.gettempdir(), "preftune-test-shared-" + os.environ["PYTEST_XDIST_TESTRUNUID"])
    for _name in ("world", "test-cache"):
        os.makedirs(os.path.join(_shared, _name), exist_ok=True)
        _link = os.path.join(os.environ["PREFTUNE_HOME"], _name)
        if not os.path.lexists(_link):
            os.symlink(os.path.join(_shared, _name), _link)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFTUNE_PARENT_RUN_ID", None)
os.environ.pop("PREFTUNE_PIPELINE_RUN_ID", None)
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that busy-wait make torch 10-20x slower on a busy 2-core machine
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
from support.browser import *  # noqa: E402,F401,F403
from support.mlflow_server import *  # noqa: E402,F401,F403
from support.postgres import *  # noqa: E402,F401,F403
from support.pushgateway import *  # noqa: E402,F401,F403
from support.s3 import *  # noqa: E402,F401,F403

# The files holding the longest tests, longest first (``--durations`` of a clean-clone .ci/run: the
# demo with its observed week ~6 min, the local pipeline ~4, the real-data reward model ~2, ...).
# xdist's --dist loadfile hands files out in collection order (``--no-loadscope-reorder`` in addopts;
# its default order, most tests first, left the six-minute demo for last on one worker while the other
# sat idle): handed out first, they run beside the many short files instead of after them.
LONGEST_FIRST = (
    "test_demo.py",
    "test_pipeline_local.py",
    "test_demo_fit_gate.py",
    "test_reward_real.py",
    "test_pilot_demo.py",
    "test_single_rated_run.py",
    "test_world.py",
    "test_evaluate_demo.py",
)


def pytest_collection_modifyitems(config, items):  # noqa: ARG001 - pytest's hook signature
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """``mlflow.set_tracking_uri`` writes ``$MLFLOW_TRACKING_URI``: undo it after every test."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
