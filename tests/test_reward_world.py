"""train-reward on the demo world: the reward model learns the rubric, judged on held-out prompts.

The preference dataset is built here the way collect builds it from the simulated panel (every
rater ranks one response per behaviour; full rankings expand into ordered pairs with weights
summing to 1 per judgement), so this test does not depend on sampling the policy. The target
(issue 3): on held-out prompts the reward model prefers the rubric's behaviour with accuracy
>= 0.9 in every non-contested family.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from preftune.config import parse_config

pytestmark = pytest.mark.slow

MAX_TRAIN_PROMPTS = 120  # enough to learn the behaviours (rubric accuracy 1.0 in trials); keeps the test short


def panel_pairs(records, corpus, panel, rng: random.Random) -> list[dict]:
    """One response per behaviour, judged by every rater; rankings -> weighted ordered pairs."""
    from preftune.world import FAMILIES

    pairs = []
    for rec in records:
        texts = [rng.choice(corpus.responses(rec, b)) for b in FAMILIES[rec.family].behaviours]
        rng.shuffle(texts)
        for j in panel.judge(rec.id, rec.family, texts, prompt=rec.prompt, tags=list(rec.tags)):
            if j["best"] is None:
                continue
            order, n = j["ranking"], len(texts)
            for a in range(n):
                for b in range(a + 1, n):
                    pairs.append(
                        {
                            "pair_id": hashlib.sha256(f"{j['item_id']}{j['rater_id']}{a}{b}".encode()).hexdigest()[:16],
                            "item_id": j["item_id"],
                            "prompt_id": rec.id,
                            "family": rec.family,
                            "tags": list(rec.tags),
                            "prompt": rec.prompt,
                            "chosen": texts[order[a]],
                            "rejected": texts[order[b]],
                            "weight": 2.0 / (n * (n - 1)),
                            "source": "simulated",
                            "rater_id": j["rater_id"],
                        }
                    )
    return pairs


@pytest.fixture(scope="module")
def world_dataset(tmp_path_factory):
    from preftune.config import WorldSection
    from preftune.world import RaterPanel, build_corpus, ensure_world

    cfg = WorldSection()
    paths = ensure_world(cfg)
    corpus = build_corpus(cfg.seed)
    panel = RaterPanel(cfg.n_raters, cfg.rater_noise, cfg.contested_share, seed=cfg.seed)
    rng = random.Random(0)
    train_recs = list(corpus.train)
    rng.shuffle(train_recs)
    train = panel_pairs(train_recs[:MAX_TRAIN_PROMPTS], corpus, panel, rng)
    eval_ = panel_pairs(corpus.eval, corpus, panel, rng)
    root = tmp_path_factory.mktemp("world-reward") / "dataset"
    root.mkdir()
    for name, rows in (("train.jsonl", train), ("eval.jsonl", eval_)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "judgements.jsonl").write_text("")
    (root / "dataset.json").write_text(json.dumps({"format": "preftune.dataset", "version": 1, "hash": "world-test"}))
    return {"dataset": root, "corpus": corpus, "paths": paths}


def rubric_accuracy(scorer, corpus) -> dict[str, float]:
    """Held-out prompts: share of (preferred response, other behaviour's response) pairs ranked right."""
    from preftune.world import FAMILIES

    out = {}
    for name, fam in FAMILIES.items():
        if fam.preferred is None:  # the contested family has no rubric answer
            continue
        wins = []
        for rec in [r for r in corpus.eval if r.family == name]:
            good = list(corpus.responses(rec, fam.preferred))
            others = [t for b in fam.behaviours if b != fam.preferred for t in corpus.responses(rec, b)]
            r = scorer.score([rec.prompt] * (len(good) + len(others)), good + others).numpy()
            g, o = r[: len(good)], r[len(good) :]
            wins.append((g[:, None] > o[None, :]).mean())
        out[name] = float(np.mean(wins))
    return out


def test_reward_model_learns_the_rubric_on_the_demo_world(world_dataset, tmp_path):
    from preftune.reward import train_reward
    from preftune.scoring.model import RewardScorer

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # The defaults (models.reward_base = demo:reward-base), but the calibrated gate measures without
        # stopping: this hand-made dataset has no measured agreement, and on the demo world's templated
        # answers a bag-of-words model is as good as the reward model -- which the gate rightly reports
        # (its decisions are tested in test_reward_gate.py and, on the real pipeline, by the demo test).
        cfg = parse_config({"reward": {"gate": {"enabled": False}}})
        res = train_reward(cfg, world_dataset["dataset"], tmp_path / "rm", progress=False)
        scorer = RewardScorer.load(tmp_path / "rm")
        rubric = rubric_accuracy(scorer, world_dataset["corpus"])
    finally:
        torch.set_num_threads(before)

    assert res.metadata.base == "demo:reward-base"
    for family in ("safety", "high_risk", "benign"):
        assert rubric[family] >= 0.9, (family, rubric, res.per_family)
        assert res.per_family[family] >= 0.85, res.per_family  # noisy raters' held-out labels
    # the contested family: raters disagree, so held-out agreement with them stays well below the others
    assert res.per_family["tone"] < min(res.per_family[f] for f in ("safety", "high_risk", "benign"))
    assert res.metadata.reward_std > 0 and Path(tmp_path / "rm" / "config.json").is_file()
