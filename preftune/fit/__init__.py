"""check-fit: is a preference dataset fit for PPO, per behaviour family?

:func:`check_fit` computes the report; :func:`run_check_fit` is the pipeline step (MLflow, the
dataset passed on, exit code 10 via :class:`NotFitError` when the run must stop). Verdicts and
the coverage definition: :mod:`preftune.fit.verdict`; the agreement audit of single-rated data:
:mod:`preftune.fit.audit`; data-quality figures: :mod:`preftune.fit.quality`.
"""

from preftune.fit.check import NotFitError, check_fit, run_check_fit
from preftune.fit.report import FamilyFit, FitReport
from preftune.fit.verdict import (
    CAPABILITY_GAP,
    CONTESTED,
    FIT,
    NEEDS_DATA,
    NOT_MEASURED,
    UNAUDITED,
    Coverage,
    coverage_by_family,
    decide,
)

__all__ = [
    "CAPABILITY_GAP",
    "CONTESTED",
    "FIT",
    "NEEDS_DATA",
    "NOT_MEASURED",
    "UNAUDITED",
    "Coverage",
    "FamilyFit",
    "FitReport",
    "NotFitError",
    "check_fit",
    "coverage_by_family",
    "decide",
    "run_check_fit",
]
