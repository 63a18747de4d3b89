"""The CLI as a user meets it: help, version, config commands, one-line errors and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from preftune import __version__
from preftune.errors import ExitCode


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "preftune.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_version_and_help_are_fast_and_do_not_import_heavy_libraries():
    t0 = time.perf_counter()
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"preftune {__version__}"
    code = (
        "import sys; from preftune.cli import app; "
        "heavy=[m for m in ('torch','mlflow','transformers','kfp') if m in sys.modules]; print(heavy)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ("demo", "config"):
        assert cmd in out.stdout
    assert time.perf_counter() - t0 < 60  # generous: guards against importing mlflow, not a speed test


def test_config_init_validate_schema(tmp_path):
    p = tmp_path / "run.yaml"
    out = run_cli("config", "init", str(p))
    assert out.returncode == 0, out.stderr
    assert p.exists()
    again = run_cli("config", "init", str(p))
    assert again.returncode == ExitCode.CONFIG and "already exists" in again.stderr
    out = run_cli("config", "validate", str(p))
    assert out.returncode == 0 and "valid" in out.stdout
    out = run_cli("config", "schema")
    assert json.loads(out.stdout)["title"] == "preftune run config"


def test_invalid_config_is_one_line_without_traceback(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("ppo_typo: 1\n")
    out = run_cli("config", "validate", str(p))
    assert out.returncode == ExitCode.CONFIG
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: invalid run config:") and "ppo_typo" in lines[0]


def test_unknown_command_is_a_usage_error():
    out = run_cli("no-such-command")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args", [["demo", "--help"], ["config", "--help"]])
def test_subcommand_help(args):
    out = run_cli(*args)
    assert out.returncode == 0 and "Usage" in out.stdout


def test_the_train_reward_line_says_which_gate_rule_passed():
    """A model below the best baseline passes only by the ceiling-share rule: the summary line must say so."""
    from preftune.cli.pipeline_cmd import step_line

    ceiling = {
        "status": "done",
        "outputs": {
            "accuracy": 0.881,
            "gate_passed": True,
            "baselines": {"length": 0.6, "bag_of_words": 0.931},
            "gate_reason": "reward gate passed: ...; baseline ok: the best baseline (bag-of-words 0.931) is within "
            "0.050 of the ceiling 0.950, so there is nothing left to beat it by; accuracy 0.881 must instead reach "
            "90% of that ceiling (0.855)",
        },
    }
    line = step_line("train-reward", ceiling)
    assert "best trivial baseline 0.931" in line and "agreement ceiling" in line
    superiority = {
        "status": "done",
        "outputs": {
            "accuracy": 0.70,
            "gate_passed": True,
            "baselines": {"length": 0.55},
            "gate_reason": "reward gate passed: ...; baseline ok: lift over the best baseline (length rule 0.550) "
            "+0.150",
        },
    }
    line = step_line("train-reward", superiority)
    assert line == "held-out accuracy 0.700, best trivial baseline 0.550 (calibrated gate: passed)"
