"""The steps of a retraining run, in order, and which of them Kubeflow may serve from its cache.

The kfp graph (:mod:`preftune.pipelines.graph`) and the in-process pilot
(:mod:`preftune.pilot.run`) both follow this order; :mod:`preftune.pipeline.outcome` reports
the steps in it.
"""

from __future__ import annotations

STEPS = ("collect", "check-fit", "train-reward", "ppo", "evaluate", "promote")
SHARED_STEPS = STEPS[:-1]
"""What the retraining pipeline and the pilot share (the retraining run adds promote, the pilot its report)."""
CACHEABLE_STEPS = ("collect", "check-fit", "train-reward", "ppo")
"""evaluate reads the registry's champion and promote writes the registry: never served from a cache."""
