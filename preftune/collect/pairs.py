"""Best-of-N judgements -> chosen/rejected pairs, with weights.

Weighting: every judgement carries a total weight of 1, however many candidates it compared,
so that an item with 8 candidates does not count four times as much as one with 2.

- A judgement with a full ``ranking`` (best first) gives every ordered pair of the ranking:
  ``ranking[i]`` preferred to ``ranking[j]`` for ``i < j``, i.e. N(N-1)/2 pairs of weight
  ``2 / (N (N-1))`` each. A ranking also says which of two *weaker* answers is better, and the
  reward model learns the whole order.
- A judgement with only a ``best`` pick gives ``best`` vs each other candidate: N-1 pairs of
  weight ``1 / (N-1)`` each.
- An "all unacceptable" judgement (``best: null``) gives no pair: it says none of the answers is
  wanted, not which is better. It is counted, and check-fit uses it for coverage.
- Unless the rater also *wrote* an acceptable answer (``written``, annotation tools' "rewrite"): then
  the written answer is preferred to each of the N candidates, N pairs of weight ``1 / N``. Without
  it the reward model never learns that an answer *all* candidates share (a polished unsafe answer,
  a blended non-answer) is worse than the wanted one, and PPO finds exactly those.
- Ties: a pair whose two texts are the same answer (equal after whitespace normalisation; small
  policies often sample the same text twice) is not emitted and is counted as ``ties``; its
  weight is not redistributed (a tie carries no preference).
- A pair with an empty chosen or rejected text is not emitted (counted as ``empty``): the
  reward model cannot score an empty answer against its prompt meaningfully.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from preftune.data.records import Judgement, Pair, short_hash

WEIGHTING = (
    "each judgement has total weight 1: a full ranking gives all N(N-1)/2 ordered pairs with weight "
    "2/(N(N-1)) each; a best pick alone gives best vs each other candidate with weight 1/(N-1) each; "
    "all-unacceptable judgements give no pair, unless the rater wrote an acceptable answer: then it is preferred "
    "to each of the N candidates, weight 1/N each; pairs of identical texts (ties) or with an empty side are skipped"
)


@dataclass
class ExpansionStats:
    """What the expansion did, for ``dataset.json`` and the MLflow run."""

    judgements: int = 0
    with_ranking: int = 0
    best_only: int = 0
    all_unacceptable: int = 0
    written: int = 0  # all-unacceptable judgements with a rater-written answer (they do give pairs)
    pairs: int = 0
    ties: int = 0
    empty: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _norm(text: str) -> str:
    return " ".join(text.split())


def expand_judgement(j: Judgement, stats: ExpansionStats) -> list[Pair]:
    """The pairs of one judgement (see the module docstring for the weights)."""
    stats.judgements += 1
    n = len(j.candidates)
    if j.all_unacceptable or j.best is None:
        stats.all_unacceptable += 1
        if not j.written:
            return []
        stats.written += 1
        texts = [j.written, *(c["text"] for c in j.candidates)]  # index 0: the written answer
        keys: list[object] = ["written", *range(n)]
        return _emit(j, texts, keys, [(0, k + 1) for k in range(n)], 1.0 / n, stats)
    texts = [c["text"] for c in j.candidates]
    if j.ranking is not None:
        stats.with_ranking += 1
        order = j.ranking
        comparisons = [(order[a], order[b]) for a in range(n) for b in range(a + 1, n)]
        weight = 2.0 / (n * (n - 1))
    else:
        stats.best_only += 1
        comparisons = [(j.best, k) for k in range(n) if k != j.best]
        weight = 1.0 / (n - 1)
    return _emit(j, texts, list(range(n)), comparisons, weight, stats)


def _emit(
    j: Judgement,
    texts: list[str],
    keys: list[object],
    comparisons: list[tuple[int, int]],
    weight: float,
    stats: ExpansionStats,
) -> list[Pair]:
    """The pairs ``texts[win]`` over ``texts[lose]`` (ids from ``keys``), ties and empty sides skipped (counted)."""
    out = []
    for win, lose in comparisons:
        chosen, rejected = texts[win], texts[lose]
        if _norm(chosen) == _norm(rejected):
            stats.ties += 1
            continue
        if not chosen.strip() or not rejected.strip():
            stats.empty += 1
            continue
        out.append(
            Pair(
                pair_id=short_hash("pair", j.item_id, j.rater_id, keys[win], keys[lose]),
                item_id=j.item_id,
                prompt_id=j.prompt_id,
                family=j.family,
                tags=list(j.tags),
                prompt=j.prompt,
                chosen=chosen,
                rejected=rejected,
                weight=weight,
                source=j.source,
                rater_id=j.rater_id,
                created_at=j.created_at,
                where=j.where,
            )
        )
    stats.pairs += len(out)
    return out


def expand_judgements(judgements: Iterable[Judgement], stats: ExpansionStats | None = None) -> list[Pair]:
    """Pairs of every judgement, in order."""
    stats = stats if stats is not None else ExpansionStats()
    out: list[Pair] = []
    for j in judgements:
        out.extend(expand_judgement(j, stats))
    return out
