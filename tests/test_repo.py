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
    assert "requirements/cpu.lock" in install_and_demo and install_and_demo.endswith("preftune demo")
    assert "requirements/cpu-dev.lock" in tests and "pytest" in tests
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


# ---------------------------------------------------------------------------------------------
# Lock files (issue 16): generated from pyproject.toml by requirements/compile.sh (pip-tools, hashes)

LOCKS = {"cpu.lock": (), "cpu-dev.lock": ("dev",), "cuda.lock": ("gpu",)}


def _pins(lock: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a pip-compile lock file."""
    from packaging.utils import canonicalize_name

    pins: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s\\]+)", line)
        if m:
            current = canonicalize_name(m.group(1))
            pins[current] = (m.group(2), [])
        elif current and "--hash=sha256:" in line:
            pins[current][1].append(line.split("--hash=sha256:")[1].split()[0])
    return pins


@pytest.mark.parametrize("lock_name,extras", list(LOCKS.items()))
def test_lock_files_are_in_sync_with_pyproject(lock_name: str, extras: tuple[str, ...]):
    import importlib.util

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = REPO / "requirements" / lock_name
    assert lock.is_file(), f"{lock} is missing: bash requirements/compile.sh"
    spec = importlib.util.spec_from_file_location("deps_digest", REPO / "requirements" / "deps_digest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    header = lock.read_text().splitlines()[0]
    assert header == f"# pyproject-deps-sha256: {mod.digest()}", (
        f"{lock_name} was made from other dependencies than pyproject.toml lists now: bash requirements/compile.sh"
    )
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10
        import tomli as tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        wanted += [Requirement(r) for r in project["optional-dependencies"][extra]]
    pins = _pins(lock)
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock_name} does not pin {req.name}"
        version, hashes = pins[name]
        assert req.specifier.contains(version, prereleases=True), f"{lock_name}: {req.name}=={version} not in {req}"
    for name, (version, hashes) in pins.items():
        assert hashes, f"{lock_name}: {name}=={version} has no hash (pip --require-hashes would refuse it)"
    if "gpu" in extras:
        # PyPI's CUDA build of torch, with its CUDA runtime as nvidia-* wheels (uv, see compile.sh)
        assert not pins["torch"][0].endswith("+cpu") and "nvidia-cuda-runtime" in pins
    else:
        # the CPU build of torch, never the multi-GB CUDA one
        assert pins["torch"][0] == "2.13.0+cpu"


def test_the_digest_changes_when_a_dependency_changes(tmp_path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("deps_digest", REPO / "requirements" / "deps_digest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = (REPO / "pyproject.toml").read_text()
    changed = tmp_path / "pyproject.toml"
    changed.write_text(text.replace('"scipy>=1.11"', '"scipy>=1.12"'))
    assert mod.digest(changed) != mod.digest()


def test_readme_ci_and_dockerfile_install_from_the_lock():
    readme = (REPO / "README.md").read_text()
    install_and_demo, tests = _bash_blocks(readme.split("\n## ", 1)[0])
    assert "--require-hashes -r requirements/cpu.lock" in install_and_demo
    assert "--require-hashes -r requirements/cpu-dev.lock" in tests
    for cmd in (install_and_demo, tests):
        assert "--no-deps" in cmd, "the package itself must not pull unlocked dependencies"
    assert "requirements/cpu-dev.lock" in (REPO / ".ci" / "run").read_text()
