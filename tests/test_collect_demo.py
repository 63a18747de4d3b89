"""End to end on the demo world: sample candidates, the simulated panel judges, check-fit flags ``tone``.

Slow: the demo world is built once per session (cached under the test home, shared with the other
world tests); this test then samples a small slice of the training prompts.
"""

from __future__ import annotations

import json

import pytest
from support.threads import one_thread  # noqa: F401 - autouse: torch on one thread

from preftune.config import parse_config

pytestmark = pytest.mark.slow


def test_demo_world_collect_then_check_fit(tmp_path):
    from preftune.collect import collect_from_config
    from preftune.fit import CONTESTED, FIT, run_check_fit
    from preftune.world import ensure_world

    cfg = parse_config(
        {
            "data": {"prompt_fraction": 0.15},
            "fit": {"bootstrap_resamples": 200},
            "tracking": {"experiment": "test-collect-demo"},
        }
    )
    ensure_world(cfg.world, progress=False)
    res = collect_from_config(cfg, str(tmp_path / "demo"), progress=False)
    assert res.format == "simulated" and res.validation["dropped"] == {}
    assert set(res.families) == {"safety", "tone", "high_risk", "benign"}
    assert res.sources == {"simulated": res.counts["judgements"]}
    assert res.counts["judgements"] == cfg.world.n_raters * res.counts["items"]
    g = res.generation
    assert g["candidates"] == g["prompts"] * cfg.data.generation.n_candidates and g["candidates_per_s"] > 0

    # the candidates file the feedback service imports names the same items the panel judged
    root = tmp_path / "demo"
    items = {json.loads(x)["item_id"] for x in (root / "candidates.jsonl").read_text().splitlines()}
    judged = {json.loads(x)["item_id"] for x in (root / "judgements.jsonl").read_text().splitlines()}
    assert items == judged and len(items) == g["prompts"]
    assert res.candidates_uri == f"{res.uri}/candidates.jsonl"

    report = run_check_fit(res.uri, cfg, str(tmp_path / "fit"))
    verdicts = {f: r.verdict for f, r in report.families.items()}
    assert verdicts == {"safety": FIT, "tone": CONTESTED, "high_risk": FIT, "benign": FIT}, report.to_markdown()
    meta = json.loads((tmp_path / "fit" / "dataset.json").read_text())
    assert meta["excluded_families"] == ["tone"]
    assert all(json.loads(x)["family"] != "tone" for x in (tmp_path / "fit" / "train.jsonl").read_text().splitlines())
