"""Kubeflow components of preftune (installed as ``preftune.components``).

Load them in your own pipelines from Python::

    from preftune.components import collect, check_fit, train_reward, ppo, evaluate, promote

or, without preftune installed, from the compiled specs published next to this file
(``components/specs/<step>.yaml``) with ``kfp.components.load_component_from_file``. Each
spec runs the pinned preftune image; ``task.set_container_image`` points it at your registry.

``runtime`` (kfp-free) is what the component bodies import at run time.
"""

from __future__ import annotations

from pathlib import Path

SPECS_DIR = Path(__file__).resolve().parent / "specs"

__all__ = [
    "ALL_COMPONENTS",
    "SPECS_DIR",
    "STEP_COMPONENTS",
    "check_fit",
    "close_run",
    "collect",
    "compile_specs",
    "evaluate",
    "open_run",
    "ppo",
    "promote",
    "train_reward",
]


def __getattr__(name: str):
    """The component objects import kfp: load them only when asked (``runtime`` stays kfp-free)."""
    if name in {
        "ALL_COMPONENTS",
        "STEP_COMPONENTS",
        "check_fit",
        "close_run",
        "collect",
        "evaluate",
        "open_run",
        "ppo",
        "promote",
        "train_reward",
    }:
        from preftune.components import retraining

        return getattr(retraining, name)
    raise AttributeError(f"module 'preftune.components' has no attribute {name!r}")


def spec_name(step: str) -> str:
    """File name of a component's published spec."""
    return f"{step}.yaml"


def compile_specs(directory: str | Path = SPECS_DIR) -> list[Path]:
    """Compile every component's spec into ``directory`` (what is committed in ``components/specs``)."""
    from kfp import compiler
    from preftune.components.retraining import ALL_COMPONENTS

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, component in ALL_COMPONENTS.items():
        path = directory / spec_name(name)
        compiler.Compiler().compile(component, str(path))
        written.append(path)
    return written
