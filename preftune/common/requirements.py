"""The pip requirements logged with an MLflow model: pinned to what made it, listed so MLflow need not infer them."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

BASE = ("preftune", "torch", "transformers", "tokenizers", "safetensors")
DATA = ("pandas", "numpy")


def pip_requirements(*extra: str) -> list[str]:
    """``name==version`` (local version labels dropped) of preftune, torch, transformers, tokenizers,
    safetensors, ``extra`` (e.g. ``peft``), pandas and numpy; packages that are not installed are left out."""
    out = []
    for name in (*BASE, *extra, *DATA):
        try:
            v = version(name)
        except PackageNotFoundError:
            continue
        out.append(f"{name}=={v.split('+')[0]}")
    return out
