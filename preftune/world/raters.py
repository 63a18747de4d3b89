"""A simulated rater panel for the demo world.

Why simulated raters: the retraining loop (collect -> check-fit -> train-reward -> ppo) needs human
judgements to run end to end on a laptop. The panel follows the business rubric per family, with a
per-rater noise rate, and one family (``tone``) is deliberately contested between two camps so that
the fit check has a real disagreement to find.

Each rater classifies the candidates with :func:`preftune.world.classifier.classify` (``unknown``
ranks last), ranks them by its preference order, and with probability ``noise`` answers at random
instead. Every random draw comes from an RNG derived from (seed, item, rater) with SHA-256, so a
judgement does not depend on the order in which items are judged. Answers of the same behaviour
are ordered by a quality score shared by all raters (a hash of the text).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Literal, NotRequired, TypedDict

from preftune.common.timestamps import utc_now
from preftune.errors import InputError
from preftune.world.classifier import UNKNOWN, classify
from preftune.world.corpus import FAMILIES, responses_for

JUDGEMENT_FORMAT = "preftune.judgement"
JUDGEMENT_VERSION = 1

RUBRIC: dict[str, tuple[str, ...]] = {
    "safety": ("explain_decline", "curt_refusal", "unsafe_comply"),
    "tone": ("clarifying_question", "cautious_suggestion", "firm_conclusion"),
    "high_risk": ("hedged_referral", "flat_refusal", "overconfident"),
    "benign": ("helpful", "needless_refusal"),
}
"""The business rubric (and the majority camp's view of ``tone``), best first."""

MINORITY_ORDERS: dict[str, tuple[str, ...]] = {
    "tone": ("firm_conclusion", "cautious_suggestion", "clarifying_question"),
}
"""The minority camp's orders: only the contested family differs from the rubric."""

CONTESTED_FAMILIES = tuple(MINORITY_ORDERS)

assert all(set(RUBRIC[f]) == set(FAMILIES[f].behaviours) for f in FAMILIES)


class Candidate(TypedDict):
    id: str
    text: str


class Judgement(TypedDict):
    """One rater's judgement of one candidate set, in the ``preftune.judgement`` exchange format."""

    format: str
    version: int
    item_id: str
    prompt_id: str
    family: str
    tags: list[str]
    prompt: str
    candidates: list[Candidate]
    rater_id: str
    best: int | None
    ranking: list[int] | None
    all_unacceptable: bool
    unsafe: list[int]
    source: Literal["simulated"]
    created_at: str
    written: NotRequired[str]  # the rater's own acceptable answer, when every candidate was unacceptable


def item_id_for(prompt_id: str, candidate_texts: Sequence[str]) -> str:
    """A stable id of a prompt and its candidate set (the same texts always give the same id)."""
    h = hashlib.sha256(prompt_id.encode())
    for text in candidate_texts:
        h.update(b"\x00")
        h.update(text.encode())
    return h.hexdigest()[:20]


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class RaterPanel:
    """``n_raters`` simulated raters; ``round(contested_share * n_raters)`` of them (at least one) form
    the minority camp of the contested family."""

    def __init__(
        self,
        n_raters: int = 5,
        noise: float = 0.1,
        contested_share: float = 0.4,
        seed: int = 0,
        write_rate: float = 0.0,
    ):
        if n_raters < 1:
            raise InputError(f"RaterPanel: n_raters must be at least 1, got {n_raters}")
        if not 0.0 <= noise <= 1.0:
            raise InputError(f"RaterPanel: noise must be within [0, 1], got {noise}")
        if not 0.0 <= contested_share < 1.0:
            raise InputError(f"RaterPanel: contested_share must be within [0, 1), got {contested_share}")
        if not 0.0 <= write_rate <= 1.0:
            raise InputError(f"RaterPanel: write_rate must be within [0, 1], got {write_rate}")
        self.n_raters = n_raters
        self.noise = noise
        self.write_rate = write_rate
        self.contested_share = contested_share
        self.seed = seed
        self.rater_ids: tuple[str, ...] = tuple(f"r{i + 1}" for i in range(n_raters))
        n_minority = 0
        if contested_share > 0 and n_raters > 1:
            n_minority = min(n_raters - 1, max(1, round(contested_share * n_raters)))
        self.minority: frozenset[str] = frozenset(_rng("camps", seed).sample(self.rater_ids, n_minority))

    def order(self, rater_id: str, family: str) -> tuple[str, ...]:
        """The rater's preference order for ``family``, best first."""
        if family not in RUBRIC:
            raise InputError(f"unknown behaviour family {family!r}; expected one of {sorted(FAMILIES)}")
        if rater_id in self.minority and family in MINORITY_ORDERS:
            return MINORITY_ORDERS[family]
        return RUBRIC[family]

    def judge(
        self,
        prompt_id: str,
        family: str,
        candidate_texts: Sequence[str],
        *,
        item_id: str | None = None,
        prompt: str = "",
        tags: Sequence[str] = (),
        candidate_ids: Sequence[str] | None = None,
        created_at: str | None = None,
    ) -> list[Judgement]:
        """Every rater's judgement of one candidate set (one record per rater, in rater order).

        ``best`` is the index of the chosen candidate; when no candidate is acceptable for the family
        (for example every one is an unsafe compliance) a careful rater answers ``best=None`` with
        ``all_unacceptable=True`` and still gives a full ``ranking``; with probability ``write_rate`` it
        also writes an answer of the best acceptable behaviour in its own order (``written``: one of the
        world's templates for that behaviour, in the prompt's ``domain:`` tag). A noisy rater picks
        uniformly at random and ranks the others at random.
        """
        if family not in FAMILIES:
            raise InputError(f"unknown behaviour family {family!r}; expected one of {sorted(FAMILIES)}")
        if not candidate_texts:
            raise InputError(f"item for prompt {prompt_id!r}: no candidates to judge")
        texts = [str(t) for t in candidate_texts]
        ids = list(candidate_ids) if candidate_ids is not None else [f"c{i}" for i in range(len(texts))]
        if len(ids) != len(texts):
            raise InputError(f"item for prompt {prompt_id!r}: {len(ids)} candidate ids for {len(texts)} texts")
        item = item_id or item_id_for(prompt_id, texts)
        stamp = created_at or utc_now()
        fam = FAMILIES[family]
        behaviours = [classify(family, t) for t in texts]
        unsafe = [i for i, b in enumerate(behaviours) if b in fam.forbidden]
        any_acceptable = any(b in fam.acceptable for b in behaviours)
        # Ties between answers of the same behaviour are broken by a quality score that every rater
        # shares (a hash of the text): people mostly agree on which of two similar answers reads
        # better, so raters disagree through noise and camps, not through coin flips on ties.
        quality = [hashlib.sha256(f"{self.seed}\x1f{t}".encode()).hexdigest() for t in texts]
        out: list[Judgement] = []
        for rater in self.rater_ids:
            rng = _rng("judge", self.seed, item, rater)
            if rng.random() < self.noise:
                ranking = list(range(len(texts)))
                rng.shuffle(ranking)
                best: int | None = ranking[0]
                all_bad = False
            else:
                order = self.order(rater, family)
                rank_of = {b: k for k, b in enumerate(order)}
                ranking = sorted(
                    range(len(texts)), key=lambda i: (rank_of.get(behaviours[i], len(order)), quality[i], i)
                )
                all_bad = not any_acceptable
                best = None if all_bad else ranking[0]
            written = None
            # a rater who found nothing acceptable writes one (no draw at all when write_rate is 0)
            if all_bad and self.write_rate > 0 and rng.random() < self.write_rate:
                written = self._write(rng, rater, family, tags)
            judgement = Judgement(
                format=JUDGEMENT_FORMAT,
                version=JUDGEMENT_VERSION,
                item_id=item,
                prompt_id=prompt_id,
                family=family,
                tags=list(tags),
                prompt=prompt,
                candidates=[Candidate(id=i, text=t) for i, t in zip(ids, texts, strict=True)],
                rater_id=rater,
                best=best,
                ranking=ranking,
                all_unacceptable=all_bad,
                unsafe=list(unsafe),
                source="simulated",
                created_at=stamp,
            )
            if written is not None:
                judgement["written"] = written
            out.append(judgement)
        return out

    def _write(self, rng: random.Random, rater: str, family: str, tags: Sequence[str]) -> str:
        """The rater's own answer: the first acceptable behaviour of its order, one of the world's templates."""
        fam = FAMILIES[family]
        behaviour = next(b for b in self.order(rater, family) if b in fam.acceptable)
        domain = next((t.split(":", 1)[1] for t in tags if t.startswith("domain:")), "")
        return rng.choice(responses_for(family, behaviour, domain))


class AuditRaters:
    """Simulated re-raters of an agreement audit (``preftune audit``), so the audit path runs in tests.

    An audit task is one imported pair shown as two candidates, with the original choice hidden
    from the task (the simulation is told ``original``, the index of the original choice, as the
    stand-in for what a careful person would see). Items of the demo world's families are judged
    by the rubric panel (:class:`RaterPanel`, noise ``1 - accuracy``). Items of any other family
    (real data the world knows nothing about) are judged by raters who pick the original's answer
    with probability ``accuracy`` (``family_accuracy`` per family overrides it) and the other one
    otherwise: agreement then follows from the accuracy (two raters agree with probability
    ``a**2 + (1-a)**2``), so a test chooses a fit family (0.9) and a contested one (0.6). Every draw
    comes from an RNG derived from (seed, item, rater).
    """

    def __init__(
        self,
        n_raters: int = 3,
        accuracy: float = 0.9,
        family_accuracy: dict[str, float] | None = None,
        seed: int = 0,
    ):
        if n_raters < 2:
            raise InputError(f"AuditRaters: an audit needs at least 2 raters, got {n_raters}")
        for name, acc in {"accuracy": accuracy, **(family_accuracy or {})}.items():
            if not 0.0 <= acc <= 1.0:
                raise InputError(f"AuditRaters: accuracy of {name!r} must be within [0, 1], got {acc}")
        self.n_raters = n_raters
        self.accuracy = accuracy
        self.family_accuracy = dict(family_accuracy or {})
        self.seed = seed
        self.rater_ids = tuple(f"audit-r{i + 1}" for i in range(n_raters))

    def judge(self, task: dict, original: int | None) -> list[Judgement]:
        """Every rater's judgement of one audit task (a ``preftune.candidates`` record)."""
        family = str(task["family"])
        texts = [str(c["text"]) for c in task["candidates"]]
        ids = [str(c["id"]) for c in task["candidates"]]
        stamp = utc_now()
        acc = self.family_accuracy.get(family, self.accuracy)
        if family in FAMILIES:
            panel = RaterPanel(n_raters=self.n_raters, noise=1.0 - acc, seed=self.seed)
            out = panel.judge(
                str(task["prompt_id"]),
                family,
                texts,
                item_id=str(task["item_id"]),
                prompt=str(task["prompt"]),
                tags=list(task.get("tags") or []),
                candidate_ids=ids,
                created_at=stamp,
            )
            for rec, rater in zip(out, self.rater_ids, strict=True):
                rec["rater_id"] = rater
            return out
        if original is None or not 0 <= original < len(texts):
            raise InputError(f"audit task {task['item_id']}: the original choice is not one of its candidates")
        out = []
        for rater in self.rater_ids:
            rng = _rng("audit", self.seed, task["item_id"], rater)
            others = [i for i in range(len(texts)) if i != original]
            best = original if rng.random() < acc else rng.choice(others)
            ranking = [best] + [i for i in range(len(texts)) if i != best]
            out.append(
                Judgement(
                    format=JUDGEMENT_FORMAT,
                    version=JUDGEMENT_VERSION,
                    item_id=str(task["item_id"]),
                    prompt_id=str(task["prompt_id"]),
                    family=family,
                    tags=list(task.get("tags") or []),
                    prompt=str(task["prompt"]),
                    candidates=[Candidate(id=i, text=t) for i, t in zip(ids, texts, strict=True)],
                    rater_id=rater,
                    best=best,
                    ranking=ranking,
                    all_unacceptable=False,
                    unsafe=[],
                    source="simulated",
                    created_at=stamp,
                )
            )
        return out


__all__ = [
    "CONTESTED_FAMILIES",
    "JUDGEMENT_FORMAT",
    "JUDGEMENT_VERSION",
    "MINORITY_ORDERS",
    "RUBRIC",
    "UNKNOWN",
    "AuditRaters",
    "Candidate",
    "Judgement",
    "RaterPanel",
    "item_id_for",
]
