"""Who judges the candidates: the simulated panel, the feedback service's export, or a file.

Every source ends as ``preftune.judgement`` v1 records fed through the same
:class:`~preftune.data.formats.Importer` (so the simulated panel's output gets the same
truncation, empty-text and duplicate checks as a file), with provenance: ``source``
(``simulated``, ``service``, ``judge`` or the import format), ``rater_id`` and ``created_at``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from preftune.data.formats import Importer
from preftune.data.records import utc_now
from preftune.errors import ConfigError
from preftune.generation.candidates import PromptRecord, item_id_for

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import RunConfig


def panel_records(
    prompts: Sequence[PromptRecord],
    candidates: Sequence[Sequence[str]],
    cfg: RunConfig,
    *,
    created_at: str | None = None,
) -> list[dict[str, Any]]:
    """Judgement records of the demo world's simulated rater panel for every prompt's candidates.

    The panel is the world's (``world.n_raters``, ``world.rater_noise``, ``world.contested_share``,
    seeded by ``world.seed``): the same world has the same raters and camps. ``world.rater_write_rate``:
    how often a rater who finds every candidate unacceptable writes an acceptable answer.
    """
    from preftune.world import RaterPanel

    panel = RaterPanel(
        n_raters=cfg.world.n_raters,
        noise=cfg.world.rater_noise,
        contested_share=cfg.world.contested_share,
        seed=cfg.world.seed,
        write_rate=cfg.world.rater_write_rate,
    )
    created_at = created_at or utc_now()
    out: list[dict[str, Any]] = []
    for p, texts in zip(prompts, candidates, strict=True):
        judged = panel.judge(
            p.prompt_id,
            p.family,
            list(texts),
            item_id=item_id_for(p, texts),  # the id candidates.jsonl carries for the same item
            prompt=p.prompt,
            tags=list(p.tags),
            created_at=created_at,
        )
        for j in judged:
            rec = dict(j)
            rec["source"] = "simulated"
            out.append(rec)
    return out


def add_panel_judgements(importer: Importer, records: Sequence[dict[str, Any]]) -> None:
    """Feed the panel's records through the importer's checks (``where`` = simulated:prompt:rater)."""
    importer.report.sources.append("simulated rater panel")
    for rec in records:
        importer.report.records_read += 1
        importer.add("preftune", rec, f"simulated:{rec['prompt_id']}:{rec['rater_id']}")


def judgement_file(cfg: RunConfig) -> tuple[str, str]:
    """(path, format) of the judgements to import for ``data.judgements`` = service | file."""
    if not cfg.data.judgements_path:
        raise ConfigError(
            f"data.judgements is {cfg.data.judgements!r}: set data.judgements_path to the file to read "
            "(the feedback service's export, or a TRL / HH / best-of-N file)"
        )
    fmt = cfg.data.format
    if cfg.data.judgements == "service" and fmt == "auto":
        fmt = "preftune"  # the service exports preftune.judgement v1
    return cfg.data.judgements_path, fmt
