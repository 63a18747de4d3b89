"""Real single-rated data end to end through check-fit: 1,000 HH-RLHF harmless-base records.

Import with data.families rules, the 'not measured' verdict (exit 10), the data-quality figures
on real text, the audit path with simulated re-raters and the override path. No training here
(the MiniLM reward model on the same data is train-reward's test). Skips when the data folder
(``../shared/data/hh-rlhf`` beside the repository) is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.config import parse_config
from preftune.errors import ExitCode

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test-0-999.jsonl.gz"

pytestmark = [
    pytest.mark.skipif(not HH.exists(), reason=f"real HH-RLHF data not found at {HH}"),
    pytest.mark.slow,
]

FAMILIES = {
    "field": None,
    "rules": [
        {"family": "violence", "keywords": ["kill", "hurt", "gun", "weapon", "bomb", "murder", "punch", "attack"]},
        {"family": "crime", "keywords": ["steal", "rob", "drugs", "cheat", "hack", "illegal", "shoplift", "scam"]},
    ],
}


def _cfg(**fit):
    return parse_config(
        {
            "data": {"families": FAMILIES},
            "fit": {"bootstrap_resamples": 200, **fit},
            "tracking": {"experiment": "test-real-hh"},
        }
    )


@pytest.fixture(scope="module")
def hh_dataset(tmp_path_factory) -> str:
    from preftune.collect import collect_from_file

    res = collect_from_file(str(HH), str(tmp_path_factory.mktemp("hh") / "dataset"), cfg=_cfg())
    assert res.format == "hh" and res.validation["records_read"] == 1000
    return res.uri


def test_hh_import_maps_families_and_check_fit_says_not_measured(hh_dataset, tmp_path):
    from preftune.fit import NOT_MEASURED, NotFitError, run_check_fit

    meta = json.loads((Path(hh_dataset) / "dataset.json").read_text())
    assert set(meta["families"]) == {"violence", "crime", "default"}
    assert meta["families_mapping"]["by_method"]["rule"]["violence"] > 50
    with pytest.raises(NotFitError) as err:
        run_check_fit(hh_dataset, _cfg(), str(tmp_path / "fit"))
    assert err.value.exit_code == ExitCode.NOT_FIT
    report = err.value.report
    assert {r.verdict for r in report.families.values()} == {NOT_MEASURED}
    q = report.quality
    # real HH harmless: the chosen answer is the longer one in well under half the pairs (refusals are
    # short), neither trivial baseline is anywhere near a good reward model, few leaked prompts
    assert 0.3 < q["length"]["chosen_longer_share"] < 0.6
    assert 0.4 < q["baselines"]["length_rule_accuracy"] < 0.7
    assert 0.45 < q["baselines"]["bag_of_words_accuracy"] < 0.75
    assert q["leakage"]["share"] < 0.05 and q["identical"]["share"] < 0.01 and q["margin"] is None
    assert 0.0 <= q["label_noise"]["share"] < 0.3
    assert "## Data quality" in (tmp_path / "fit" / "fit_report.md").read_text()


def test_hh_audit_with_simulated_re_raters(hh_dataset):
    from preftune.data.dataset import load_dataset
    from preftune.fit import CONTESTED, FIT, check_fit
    from preftune.fit.audit import plan_audit, simulate_audit
    from preftune.storage import Storage

    loaded = load_dataset(hh_dataset, Storage())
    plan = plan_audit(loaded, per_family=25, raters=3, seed=0)
    assert plan.families == {"crime": 25, "default": 25, "violence": 25}
    records = simulate_audit(
        loaded, plan.manifest(), plan.tasks, accuracy=0.95, family_accuracy={"crime": 0.55}, seed=0
    )
    cfg = _cfg(quality={"enabled": False})
    report = check_fit(loaded, cfg, audit_records=records, audit_source="simulated")
    verdicts = {f: r.verdict for f, r in report.families.items()}
    assert verdicts == {"crime": CONTESTED, "default": FIT, "violence": FIT}
    assert report.proceed and report.fit_status == "audited"


def test_hh_override_passes_the_data_on_tagged_unaudited(hh_dataset, tmp_path):
    from preftune.fit import UNAUDITED, run_check_fit

    cfg = _cfg(accept_unaudited=True, unaudited_reason="public HH-RLHF labels", quality={"enabled": False})
    report = run_check_fit(hh_dataset, cfg, str(tmp_path / "passed-on"))
    assert {r.verdict for r in report.families.values()} == {UNAUDITED} and report.proceed
    meta = json.loads((tmp_path / "passed-on" / "dataset.json").read_text())
    assert meta["fit_status"] == "unaudited" and meta["counts"]["train_pairs"] + meta["counts"]["eval_pairs"] > 990
