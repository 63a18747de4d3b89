"""Can the champion produce the preferred answer to its observed hard cases?

PPO changes which behaviour a policy *chooses*; it cannot reinforce an answer the policy never
samples. Before a retraining run continues from the champion on the hard cases observe found,
:func:`hard_case_coverage` samples ``n`` answers per hard case from a policy, judges them with the
suite's judges, and reports the share of hard cases where at least one answer is of the family's
preferred behaviour -- check-fit's coverage, restricted to the hard cases. Where the champion's
coverage is below a floor, the retraining should start from a policy that does produce the answer
(the base policy) -- or, when none does, the behaviour must be taught first (SFT).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Coverage:
    """Hard cases where at least one of ``samples`` answers was judged preferred (of ``cases`` judged)."""

    policy: str
    cases: int
    covered: int
    samples: int
    preferred_share: float  # preferred answers among all sampled answers

    @property
    def share(self) -> float:
        return self.covered / self.cases if self.cases else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "share": self.share}


def hard_case_coverage(cfg: Any, policy_path: str, cases: list[dict[str, Any]], samples: int, seed: int) -> Coverage:
    """Sample ``samples`` answers per hard case from ``policy_path`` (``data.generation`` settings) and judge
    them with the suite's judges; cases of a family the suite does not know are not counted."""
    from preftune.behaviour.judges import load_judges
    from preftune.behaviour.suite import load_suite
    from preftune.generation.candidates import PromptRecord, sample_candidates
    from preftune.storage import Storage

    storage = Storage.from_config(cfg.storage)
    suite = load_suite(cfg.evaluation.suite, storage=storage)
    known = [c for c in cases if c["family"] in suite.families]
    if not known:
        return Coverage(policy_path, 0, 0, samples, 0.0)
    judges = load_judges(suite, storage=storage)
    gen = cfg.data.generation.model_copy(update={"n_candidates": samples})
    prompts = [PromptRecord(c["id"], c["family"], tuple(c.get("tags", ())), c["prompt"]) for c in known]
    texts, _ = sample_candidates(policy_path, prompts, gen, seed=seed, progress=False)
    covered, preferred = 0, 0
    for fam in sorted({c["family"] for c in known}):
        idx = [i for i, c in enumerate(known) if c["family"] == fam]
        family = suite.families[fam]
        judge = judges[family.judge]
        flat = [(i, t) for i in idx for t in texts[i]]
        got = judge.judge(fam, [known[i]["prompt"] for i, _ in flat], [t for _, t in flat])
        hit = {i for (i, _), b in zip(flat, got, strict=True) if b in family.preferred}
        covered += len(hit)
        preferred += sum(b in family.preferred for b in got)
    total = sum(len(t) for t in texts)
    return Coverage(policy_path, len(known), covered, samples, preferred / total if total else 0.0)
