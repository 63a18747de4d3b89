"""Behaviour-regression evaluation and gated promotion (keep this module free of heavy imports).

Public API (imported lazily, so ``import preftune.evaluate`` costs nothing):

- :func:`evaluate` (``preftune.evaluate.step``): a candidate and the champion on a behaviour suite,
  gates with bootstrap confidence bounds, a Markdown/HTML report and an MLflow run.
- :func:`promote` (``preftune.evaluate.promote``): register a passing candidate and move the
  ``champion`` alias under the promotion lock.

The behaviour suite and its judges are in :mod:`preftune.behaviour`, the registry in
:mod:`preftune.registry`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from preftune.evaluate.promote import PromoteResult, promote
    from preftune.evaluate.step import EvalResult, evaluate

__all__ = ["EvalResult", "PromoteResult", "evaluate", "promote"]

_WHERE = {
    "EvalResult": "preftune.evaluate.step",
    "evaluate": "preftune.evaluate.step",
    "PromoteResult": "preftune.evaluate.promote",
    "promote": "preftune.evaluate.promote",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'preftune.evaluate' has no attribute {name!r}")
