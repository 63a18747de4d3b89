"""A short run of the load benchmark: concurrent raters lose no judgement and double none.

The full runs are ``benchmarks/serve_load.py`` (docs/benchmarks.md); these use 20 raters for
3 seconds, closed loop and open loop (think time, two arrival-rate steps, one request per
task), against a PostgreSQL-backed server process and assert only correctness: the
database holds exactly the acknowledged judgements, no (task, rater) pair twice, no task
over its quota, resubmissions idempotent, and the server stopped cleanly on SIGTERM.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.postgres import fresh_postgres_db

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.mark.parametrize(
    "mode",
    [
        ["--mode", "closed", "--cycle", "separate"],
        ["--mode", "open", "--think", "0.3", "--cycle", "combined"],
        ["--mode", "open", "--rates", "20,40", "--cycle", "combined"],
    ],
    ids=["closed-separate", "open-think-combined", "open-rates-combined"],
)
def test_concurrent_raters_lose_and_double_nothing(mode):
    url, drop = fresh_postgres_db("preftune_serve_load")
    try:
        proc = subprocess.run(
            [sys.executable, str(BENCH), "--raters", "20", "--seconds", "3", "--tasks", "400", "--database-url", url]
            + mode,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        drop()
    assert proc.stdout.strip(), proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["judgements_acknowledged"] > 0, result
    assert result["lost"] == 0 and result["unexpected"] == 0 and result["mismatched"] == 0, result
    assert result["duplicate_task_rater_pairs"] == 0 and result["tasks_over_quota"] == 0, result
    assert result["task_counter_mismatches"] == 0, result
    assert result["judgements_in_db"] == result["judgements_acknowledged"] == result["export_records"], result
    assert result["idempotent_resubmits_bad"] == 0, result
    assert result["server_exit_code"] == 0, result
    assert proc.returncode == 0 and result["ok"] is True, result
    assert result["mode"] == mode[1]
    assert result["latency"]["cycle"]["count"] == result["judgements_acknowledged"], result
    if "--rates" in mode:
        steps = result["rate_steps"]["steps"]
        assert [s["rate"] for s in steps] == [20.0, 40.0] and all(s["p95_ms"] is not None for s in steps), result
