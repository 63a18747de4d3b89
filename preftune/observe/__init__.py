"""Continuous observation of the champion's behaviour in production (``preftune observe``).

Modules: :mod:`.sources` (logs under a watermark, MLflow traces), :mod:`.novelty` (families of
unlabelled prompts, new prompt types), :mod:`.stats` (shares, drift tests, forbidden-share
gates), :mod:`.baselines` (the champion's own evaluation, the recent windows), :mod:`.actions`
(hard cases, the feedback service, rollback), :mod:`.outputs` (MLflow, Prometheus, version tags),
:mod:`.run` (one window, end to end).
"""

from typing import Any

__all__ = ["ObserveResult", "observe_window"]


def __getattr__(name: str) -> Any:  # lazy: the run config imports preftune.observe.config
    if name in __all__:
        from preftune.observe import run

        return getattr(run, name)
    raise AttributeError(name)
