"""The demo world: a generated corpus in four behaviour families, a rule-based behaviour
classifier, a simulated rater panel, and a tiny base policy and reward base trained locally.

Importing this package is cheap (no torch): models are built and loaded only by
:func:`ensure_world` and :func:`sample_behaviour_shares`.
"""

from preftune.world.build import (
    WORLD_VERSION,
    WorldPaths,
    ensure_world,
    load_prompts,
    resolve_model_ref,
    resolve_prompts_ref,
    world_key,
)
from preftune.world.classifier import UNKNOWN, classify
from preftune.world.corpus import FAMILIES, Corpus, Family, PromptRecord, build_corpus, format_prompt
from preftune.world.raters import RUBRIC, Judgement, RaterPanel, item_id_for
from preftune.world.sampling import behaviour_shares, sample_behaviour_shares, sample_responses

__all__ = [
    "FAMILIES",
    "RUBRIC",
    "UNKNOWN",
    "WORLD_VERSION",
    "Corpus",
    "Family",
    "Judgement",
    "PromptRecord",
    "RaterPanel",
    "WorldPaths",
    "behaviour_shares",
    "build_corpus",
    "classify",
    "ensure_world",
    "format_prompt",
    "item_id_for",
    "load_prompts",
    "resolve_model_ref",
    "resolve_prompts_ref",
    "sample_behaviour_shares",
    "sample_responses",
    "world_key",
]
