"""Coverage and the per-family verdict of the test of fit.

The two questions a practitioner asks before spending GPU time on PPO:

1. *Can people reliably pick the better answer?* -- rater agreement (Krippendorff's alpha,
   :mod:`preftune.agreement`). Low agreement: the family is **contested**; a reward model would
   learn one camp's taste, or noise.
2. *Does the model already produce the wanted behaviour?* -- coverage. PPO re-weights what the
   policy samples; it cannot select an answer the policy never writes. Low coverage: a
   **capability gap** -- teach it first (SFT).

Coverage, precisely: over the prompts of a family that have at least one judgement, the share
of prompts that are *covered*. A prompt is covered when at least half of its judgements picked
a best candidate (``best`` is an index, ``all_unacceptable`` is false, and the pick is not in
that judgement's ``unsafe`` list). A majority rather than "any judgement" because rater noise
(a rater who clicks at random) would otherwise cover prompts where the model never produced an
acceptable answer. Pair imports (TRL, HH) carry no acceptability judgement: their coverage is
not measured and does not enter the verdict.

Verdict rules, applied in this order on the point estimates (the confidence intervals are
reported beside them, they do not decide):

1. **capability gap**: coverage is measured on at least ``fit.min_items`` prompts and is below
   ``fit.min_coverage``;
2. **not measured** (one rating per item): fewer than ``fit.min_items`` items were judged by two
   or more raters, but at least ``fit.min_items`` items were judged just once -- single-rated data
   (public preference sets, most logs). The way on is an agreement audit (``preftune audit``,
   :mod:`preftune.fit.audit`; check-fit then judges the family on the re-raters' agreement) or
   the override ``fit.accept_unaudited`` with a reason, which turns the verdict into
   **unaudited**: kept, and tagged ``preftune.fit=unaudited`` downstream;
   **needs data**: fewer than ``fit.min_items`` items at all (agreement cannot be measured);
3. **contested**: alpha below ``fit.min_alpha`` (an undefined alpha -- every judgement made
   the same pick -- counts as agreement when pairwise agreement is 1, else as needs data);
4. **fit** otherwise.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from preftune.agreement import FamilyAgreement
    from preftune.config import FitSection

FIT = "fit"
CONTESTED = "contested"
CAPABILITY_GAP = "capability gap"
NEEDS_DATA = "needs data"
NOT_MEASURED = "not measured"
UNAUDITED = "unaudited"
VERDICTS = (FIT, CONTESTED, CAPABILITY_GAP, NEEDS_DATA, NOT_MEASURED, UNAUDITED)
PROCEED_VERDICTS = (FIT, UNAUDITED)
"""Verdicts whose family goes on to train-reward."""

COVERAGE_DEFINITION = (
    "share of a family's judged prompts where at least half of the judgements picked a best candidate "
    "(not 'all unacceptable', not flagged unsafe by that rater); not measured for pair imports (TRL, HH)"
)
RULE = (
    "verdicts use the point estimates (CIs are reported, not used), in order: capability gap (coverage < "
    "fit.min_coverage on >= fit.min_items prompts), not measured (< fit.min_items items judged by >= 2 raters but "
    ">= fit.min_items judged just once; unaudited when fit.accept_unaudited), needs data (< fit.min_items items "
    "judged by >= 2 raters), contested (alpha < fit.min_alpha), else fit"
)


@dataclass
class Coverage:
    family: str
    n_prompts: int
    n_covered: int
    n_judgements: int
    n_without_acceptable_pick: int

    @property
    def share(self) -> float | None:
        return self.n_covered / self.n_prompts if self.n_prompts else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "share": self.share}


def picked_acceptable(rec: Mapping[str, Any]) -> bool:
    """Did this judgement name an acceptable best candidate?"""
    best = rec.get("best")
    if best is None or rec.get("all_unacceptable"):
        return False
    return best not in (rec.get("unsafe") or [])


def coverage_by_family(judgements: Iterable[Mapping[str, Any]]) -> dict[str, Coverage]:
    """Coverage per family (see the module docstring for the definition)."""
    votes: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for rec in judgements:
        family = str(rec.get("family") or "default")
        prompt = str(rec.get("prompt_id") or rec.get("item_id"))
        votes[family][prompt].append(picked_acceptable(rec))
    out = {}
    for family, prompts in sorted(votes.items()):
        n_judgements = sum(len(v) for v in prompts.values())
        out[family] = Coverage(
            family=family,
            n_prompts=len(prompts),
            n_covered=sum(1 for v in prompts.values() if 2 * sum(v) >= len(v)),
            n_judgements=n_judgements,
            n_without_acceptable_pick=sum(1 for v in prompts.values() for ok in v if not ok),
        )
    return out


def _fmt_ci(ci: Any) -> str:
    lo, hi = (ci or (None, None))[:2] if ci else (None, None)
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "CI n/a"
    return f"{lo:.2f}-{hi:.2f}"


def decide(
    agreement: FamilyAgreement | None,
    coverage: Coverage | None,
    fit: FitSection,
    *,
    rated_items: int | None = None,
    audit_hint: str = "",
) -> tuple[str, str]:
    """The verdict of one family and the reason in plain words.

    ``rated_items``: the family's items with at least one judgement (to tell single-rated data,
    ``not measured``, from too little data, ``needs data``); ``None`` when unknown.
    ``audit_hint``: how to run the audit, appended to a ``not measured`` reason.
    """
    if coverage is not None and coverage.share is not None and coverage.n_prompts >= fit.min_items:
        if coverage.share < fit.min_coverage:
            return CAPABILITY_GAP, (
                f"only {coverage.n_covered} of {coverage.n_prompts} prompts ({coverage.share:.0%}) got an acceptable "
                f"candidate (threshold {fit.min_coverage:.0%}): teach it first (SFT), PPO cannot select what the "
                "model does not produce"
            )
    n_items = agreement.n_items if agreement is not None else 0
    if n_items < fit.min_items and rated_items is not None and rated_items - n_items >= fit.min_items:
        counted = f"{rated_items} items, {n_items} rated by two or more raters (need {fit.min_items})"
        if fit.accept_unaudited:
            return UNAUDITED, (
                f"agreement not measured (one rating per item: {counted}); accepted without an audit "
                f"(fit.accept_unaudited): {fit.unaudited_reason}"
            )
        return NOT_MEASURED, (
            f"agreement not measured (one rating per item: {counted}): measure it with an audit "
            f"(`preftune audit create{audit_hint}`, then `check-fit --audit EXPORT`) or go on without one "
            "(`--accept-unaudited REASON`)"
        )
    if n_items < fit.min_items:
        return NEEDS_DATA, (
            f"{n_items} item(s) judged by two or more raters (need {fit.min_items}): agreement cannot be measured; "
            "have each item rated by several raters (e.g. PREFTUNE_RATINGS_PER_TASK >= 2) or import repeated ratings"
        )
    assert agreement is not None
    cov = f"; coverage {coverage.share:.0%}" if coverage is not None and coverage.share is not None else ""
    alpha, pairwise = agreement.alpha, agreement.pairwise
    if alpha is None or not math.isfinite(alpha):
        if pairwise is not None and math.isfinite(pairwise) and pairwise >= 1.0:
            return FIT, f"every rater made the same pick on every item (alpha undefined without variation){cov}"
        return NEEDS_DATA, "alpha cannot be computed from these judgements; collect more items rated by several raters"
    if alpha < fit.min_alpha:
        return CONTESTED, (
            f"raters do not agree on which answer is better: alpha {alpha:.2f} ({_fmt_ci(agreement.alpha_ci)}) is "
            f"below {fit.min_alpha:.2f}, pairwise agreement {pairwise:.0%}; a reward model would learn one camp's "
            "taste or noise: settle the rubric (or split the family) before PPO"
        )
    return FIT, (
        f"raters agree: alpha {alpha:.2f} ({_fmt_ci(agreement.alpha_ci)}) >= {fit.min_alpha:.2f}, pairwise "
        f"agreement {pairwise:.0%}{cov}"
    )
