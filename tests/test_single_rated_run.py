"""A single-rated dataset through ``preftune run``: collect -> check-fit (override) -> train-reward -> ppo ->
evaluate -> promote, with the fit status on every downstream MLflow run and on the registered version.

The judgements are the demo world's: its training prompts, one candidate of each behaviour of the
family, judged by the world's simulated panel, but only one rater's judgement is kept per item
(raters rotate): the shape of an imported public set or of production logs. No policy sampling is
needed (``data.judgements: file``), so the run costs what the shortened pipeline of
``test_pipeline_local`` costs minus the generation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REASON = "vendor labels, audited upstream (ticket 42)"
FAMILIES = ("safety", "benign", "high_risk")
ITEMS_PER_FAMILY = 30


def single_rated_judgements(path: Path) -> Path:
    """One ``preftune.judgement`` record per item: the demo world's panel, one rater per item (rotating)."""
    from preftune.config import RunConfig
    from preftune.world import RaterPanel
    from preftune.world.corpus import FAMILIES as WORLD_FAMILIES
    from preftune.world.corpus import build_corpus

    world = RunConfig().world
    corpus = build_corpus(world.seed)
    panel = RaterPanel(
        n_raters=world.n_raters, noise=world.rater_noise, contested_share=world.contested_share, seed=world.seed
    )
    taken = dict.fromkeys(FAMILIES, 0)
    lines = []
    for k, rec in enumerate(corpus.train):
        if rec.family not in taken or taken[rec.family] >= ITEMS_PER_FAMILY:
            continue
        taken[rec.family] += 1
        texts = [
            corpus.responses(rec, b)[k % len(corpus.responses(rec, b))] for b in WORLD_FAMILIES[rec.family].behaviours
        ]
        judged = panel.judge(rec.id, rec.family, texts, prompt=rec.prompt, tags=list(rec.tags))
        lines.append(json.dumps(judged[k % len(judged)]))  # one rater's judgement of this item
    assert all(n == ITEMS_PER_FAMILY for n in taken.values()), taken
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_single_rated_data_runs_to_promotion_tagged_unaudited(tmp_path, capsys):
    from mlflow import MlflowClient
    from test_pipeline_local import _runs_of, cli, small_config

    judgements = single_rated_judgements(tmp_path / "single_rated.jsonl")
    path = small_config(
        tmp_path,
        data={"judgements": "file", "judgements_path": str(judgements), "format": "preftune"},
        fit={"bootstrap_resamples": 200, "accept_unaudited": True, "unaudited_reason": REASON},
    )
    cfg_data = yaml.safe_load(path.read_text())
    code = cli("run", "--config", str(path), "--json")
    out = capsys.readouterr().out
    outcome = json.loads(out[out.index("{") :])
    assert (code, outcome["outcome"]) == (0, "promoted"), out[-3000:]

    steps = outcome["steps"]
    fit = steps["check-fit"]["outputs"]
    assert fit["fit"] is True and fit["fit_status"] == "unaudited" and fit["unaudited_reason"] == REASON
    assert {v["verdict"] for v in fit["verdicts"].values()} == {"unaudited"}
    assert sorted(fit["verdicts"]) == sorted(FAMILIES)
    assert steps["ppo"]["status"] == "ok" and str(steps["promote"]["outputs"]["version"]) == "1"

    uri = cfg_data["tracking"]["uri"]
    by_step = {r.data.tags["preftune.step"]: r for r in _runs_of(uri, outcome["pipeline_run_id"])}
    downstream = ["pipeline", "check-fit", "train-reward", "ppo", "evaluate", "promote"]
    assert set(downstream) <= set(by_step), sorted(by_step)
    for step in downstream:
        tags = by_step[step].data.tags
        assert tags.get("preftune.fit") == "unaudited", (step, tags.get("preftune.fit"))
        assert tags.get("preftune.fit.reason") == REASON, step
    assert "preftune.fit" not in by_step["collect"].data.tags  # collect runs before anyone measured anything

    client = MlflowClient(uri)
    champion = client.get_model_version_by_alias("preftune-policy", "champion")
    assert str(champion.version) == "1"
    assert champion.tags.get("preftune.fit") == "unaudited" and champion.tags.get("preftune.fit.reason") == REASON
