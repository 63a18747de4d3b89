"""collect: candidates, judgements and the preference dataset (the first step of a retraining run).

Entry points (typed, used by the CLI and the kfp component): :func:`collect_from_file`,
:func:`collect_from_config` and :func:`generate_candidates`. Importing this package is cheap
(torch, transformers and mlflow are imported inside the functions that need them).
"""

from preftune.collect.step import (
    CandidatesResult,
    CollectResult,
    collect_from_config,
    collect_from_file,
    generate_candidates,
)

__all__ = ["CandidatesResult", "CollectResult", "collect_from_config", "collect_from_file", "generate_candidates"]
