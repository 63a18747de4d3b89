"""The import graph of docs/architecture.md's package map, checked on the source (``ast``, nothing imported).

Step packages (one per pipeline step) never import each other: what two steps share lives in a
shared package below them (``data``, ``generation``, ``scoring``, ``behaviour``, ``registry``, ...).
Shared packages never import a step package, except the stated exceptions of the package map.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "preftune"

# the pipeline steps' own packages (docs/architecture.md, "Package map")
STEP_PACKAGES = frozenset({"collect", "fit", "reward", "ppo", "evaluate", "observe"})
# above the step packages: they wire the steps together and may import any of them
ORCHESTRATION = frozenset({"cli", "demo", "pilot", "pipeline", "components", "pipelines"})
# the stated exceptions of the package map: (importing package, imported step package) -> why
EXCEPTIONS = {
    ("config", "collect"): "the run config assembles the steps' own config sections",
    ("config", "evaluate"): "the run config assembles the steps' own config sections",
    ("config", "fit"): "the run config assembles the steps' own config sections",
    ("config", "observe"): "the run config assembles the steps' own config sections",
    ("config", "ppo"): "the run config assembles the steps' own config sections",
    ("config", "reward"): "the run config assembles the steps' own config sections",
    ("kube", "ppo"): "kube builds the ppo TrainJob and hands its artifacts back",
}


def _top(module: str) -> str | None:
    """``preftune.collect.records`` -> ``collect``; None outside preftune."""
    parts = module.split(".")
    if parts[0] != "preftune" or len(parts) < 2:
        return None
    return parts[1]


def _imported_modules(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, lazy imports inside functions included."""
    rel = path.relative_to(root.parent).with_suffix("").parts
    here = list(rel if path.name == "__init__.py" else rel[:-1])
    if path.name == "__init__.py":
        here = here[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # `from preftune import collect` names the package in the alias
            if module == "preftune":
                found += [(node.lineno, f"preftune.{alias.name}") for alias in node.names]
    return found


def _package_of(path: Path, root: Path = PACKAGE) -> str:
    """The first-level package (or module) of ``path`` under preftune/: ``collect``, ``config``, ..."""
    rel = path.relative_to(root).parts
    return rel[0].removesuffix(".py")


def import_violations(root: Path = PACKAGE) -> list[str]:
    """Every import that goes sideways between step packages or up from a shared package."""
    bad: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts or path.parent == root and path.name == "__init__.py":
            continue
        source = _package_of(path, root)
        if source in ORCHESTRATION:
            continue
        for line, module in _imported_modules(path, root):
            target = _top(module)
            if target is None or target == source or target not in STEP_PACKAGES:
                continue
            if (source, target) in EXCEPTIONS:
                continue
            kind = "step package" if source in STEP_PACKAGES else "shared package"
            where = path.relative_to(root.parent)
            bad.append(f"{where}:{line}: {kind} {source!r} imports step package {target!r} ({module})")
    return bad


def test_no_step_package_imports_another_and_no_shared_package_imports_a_step():
    bad = import_violations()
    assert not bad, "imports against docs/architecture.md's package map:\n" + "\n".join(bad)


def test_the_checker_sees_sideways_upward_and_relative_imports(tmp_path: Path):
    root = tmp_path / "preftune"
    for pkg in ("fit", "collect", "data"):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
    (root / "fit" / "check.py").write_text("def f():\n    from preftune.collect.records import Pair\n")
    (root / "data" / "records.py").write_text("from ..collect import step\n")
    (root / "collect" / "step.py").write_text("from preftune.data.records import Pair\nfrom preftune import fit\n")
    (root / "config.py").write_text("from preftune.fit.config import FitSection\n")
    (root / "text.py").write_text("import preftune.reward.model\n")
    bad = import_violations(root)
    assert [b.split(": ", 1)[1] for b in bad] == [
        "step package 'collect' imports step package 'fit' (preftune.fit)",
        "shared package 'data' imports step package 'collect' (preftune.collect)",
        "step package 'fit' imports step package 'collect' (preftune.collect.records)",
        "shared package 'text' imports step package 'reward' (preftune.reward.model)",
    ]
    assert bad[0].startswith("preftune/collect/step.py:2:")


@pytest.mark.parametrize("pair", sorted(EXCEPTIONS))
def test_every_stated_exception_is_still_needed(pair: tuple[str, str]):
    """An exception nobody uses any more is dropped from the list (and from the package map)."""
    source, target = pair
    paths = [PACKAGE / f"{source}.py"] if (PACKAGE / f"{source}.py").is_file() else (PACKAGE / source).rglob("*.py")
    used = any(_top(module) == target for path in paths for _, module in _imported_modules(path))
    assert used, f"{source} no longer imports {target}: remove the exception here and in docs/architecture.md"
