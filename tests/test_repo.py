"""Promises about the repository itself: the README's commands, CI, and what the wheel installs."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_opens_with_exactly_two_setup_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    head = readme.split("\n## ", 1)[0]  # everything before the first section
    blocks = _bash_blocks(head)
    assert len(blocks) == 2, "the README's opening must give exactly two set-up commands"
    install_and_demo, tests = blocks
    assert "\n" not in install_and_demo and "\n" not in tests
    assert "torch==2.13.0" in install_and_demo and install_and_demo.endswith("preftune demo")
    assert "torch==2.13.0" in tests and "pytest" in tests
    ci = (REPO / ".ci" / "run").read_text()
    m = re.search(r"^TEST_CMD='(.*)'$", ci, flags=re.M)
    assert m, ".ci/run must define TEST_CMD"
    assert m.group(1) == tests, ".ci/run must run the README's test command verbatim"


def test_top_level_layout():
    for name in ("pipelines", "components", "charts", "tests", "benchmarks", "docs", ".ci", "preftune"):
        assert (REPO / name).is_dir(), name
    for name in ("pyproject.toml", "README.md", "docs/architecture.md"):
        assert (REPO / name).is_file(), name


@pytest.mark.slow
def test_wheel_installs_everything_under_the_preftune_namespace(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("preftune-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top <= {"preftune", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, top
    # every Python module of the source tree is in the wheel (no subpackage forgotten in pyproject)
    expected = {str(p.relative_to(REPO)) for p in (REPO / "preftune").rglob("*.py") if "__pycache__" not in p.parts}
    expected |= {
        "preftune/" + str(p.relative_to(REPO)) for d in ("components", "pipelines") for p in (REPO / d).rglob("*.py")
    }
    missing = sorted(expected - set(names))
    assert not missing, f"missing from the wheel (add the package to pyproject): {missing}"
    # package data: every non-Python file inside the library ships too
    data = {
        str(p.relative_to(REPO))
        for p in (REPO / "preftune").rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    }
    missing_data = sorted(data - set(names))
    assert not missing_data, f"package data missing from the wheel: {missing_data}"
