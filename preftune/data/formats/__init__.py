"""Importers: preference data in the formats people already have, normalised with provenance.

Formats (``--format``; ``auto`` detects from the first record that parses; the registry in
:mod:`.registry` lists each with its fields):

``preftune``
    The feedback service's export, one ``preftune.judgement`` v1 record per line.
``best-of-n``
    ``{"prompt", "responses": [...], "best": i | null, "ranking": [...]?, "rater_id"}``.
``trl``
    TRL preference records: ``prompt``/``chosen``/``rejected`` as text or chat messages
    (conversational responses that repeat the prompt's turns are accepted), or the implicit-prompt
    form (``chosen``/``rejected`` conversations whose shared leading turns are the prompt).
``ultrafeedback-binarized``
    TRL-shaped with ``score_chosen``/``score_rejected``: the difference is kept as the pair's margin.
``ultrafeedback``
    Raw UltraFeedback: ``instruction`` + ``completions`` with ratings -> pairs of different scores.
``helpsteer``
    One scored response a row (HelpSteer): rows grouped by prompt, ranked by
    ``data.import_options.score_field`` -> pairs of different scores.
``nectar``
    K-wise rankings (Nectar): ``answers`` with ``rank`` -> a judgement keeping the ranking.
``shp``
    Stanford SHP: ``history``, ``human_ref_A``/``human_ref_B``, ``labels``; log score ratio as margin.
``pku-saferlhf``
    PKU-SafeRLHF: two responses and two axes; ``data.import_options.pku_axis`` picks one.
``openai``
    OpenAI preference fine-tuning JSONL: ``input.messages``, ``preferred_output``,
    ``non_preferred_output``.
``hh``
    Anthropic HH-RLHF transcripts (``\\n\\nHuman:`` / ``\\n\\nAssistant:``).

Containers (:mod:`.containers`): JSONL, JSON array, Parquet, CSV, Arrow, gzip/zstd, a folder of
shards, a ``datasets.save_to_disk`` folder; local or s3://.

Optional fields on every format: ``family`` (default ``"default"``), ``tags``, ``prompt_id``,
``rater_id``, ``created_at`` (ISO 8601, or epoch seconds).

Multi-turn prompts (HH transcripts, chat lists) become one prompt text: the first user turn as
is, later turns on their own line as ``Assistant: ...`` / ``User: ...``;
:func:`preftune.text.prompt_messages` turns that text back into the conversation, which
:func:`preftune.text.render_prompt` renders with the model's chat template.
"""

from preftune.data.formats.containers import expand_inputs, read_raw_records
from preftune.data.formats.fields import (
    Ctx,
    FormatOptions,
    _created_at,
    _family,
    _opt_str,
    _prompt_text,
    _tags,
    flatten_turns,
)
from preftune.data.formats.importer import Importer, nothing_kept_message
from preftune.data.formats.registry import BY_NAME, FORMATS, REGISTRY, describe_formats, detect_format

__all__ = [
    "BY_NAME",
    "FORMATS",
    "REGISTRY",
    "Ctx",
    "FormatOptions",
    "Importer",
    "_created_at",
    "_family",
    "_opt_str",
    "_prompt_text",
    "_tags",
    "describe_formats",
    "detect_format",
    "expand_inputs",
    "flatten_turns",
    "nothing_kept_message",
    "read_raw_records",
]
