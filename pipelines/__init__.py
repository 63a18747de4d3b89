"""Kubeflow pipelines of preftune (installed as ``preftune.pipelines``).

- :mod:`preftune.pipelines.retraining`: the ``preference-retraining`` pipeline (build, compile);
  its compiled form for the default run config is committed as ``preference-retraining.yaml``
  next to this file (a test fails when it is out of date).
- :mod:`preftune.pipelines.pilot`: the ``preference-pilot`` variant (same components on a slice, short
  PPO, then the ``pilot-report`` task); compiled by ``preftune pilot --compile FILE``.
- :mod:`preftune.pipelines.local`: run it with kfp's local runner (``preftune run``, ``preftune demo``).
- :mod:`preftune.pipelines.client`: submit it and manage recurring runs with the kfp client
  (``preftune run --host``, ``preftune schedule``).
"""

from __future__ import annotations

from pathlib import Path

COMPILED_PIPELINE = Path(__file__).resolve().parent / "preference-retraining.yaml"
