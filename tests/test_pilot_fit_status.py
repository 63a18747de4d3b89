"""The pilot on single-rated data: check-fit's 'not measured' is its own go / no-go, never a 'go'.

The report is built the way ``run_pilot`` builds it when check-fit stops the slice (no reward
model, no PPO, no evaluation): from the folder a real check-fit run published.
"""

from __future__ import annotations

import json

import pytest
from support.pairs import single_rated_pairs

from preftune.config import parse_config
from preftune.data.dataset import build_dataset, publish
from preftune.data.records import Pair
from preftune.errors import ExitCode
from preftune.fit import NOT_MEASURED, UNAUDITED, NotFitError, run_check_fit
from preftune.pilot import report as rep
from preftune.pilot.fit_status import NOT_MEASURED_VERDICT, apply_fit_status
from preftune.pilot.run import build_report
from preftune.storage import Storage


def _pairs(family: str, n: int) -> list[Pair]:
    return single_rated_pairs(
        family,
        n,
        prompt=lambda i: f"{family} question {i}: how do I handle case {i * 5 % 11}?",
        chosen=lambda i: f"A careful answer {i}.",
        rejected=lambda i: f"A careless reply {i}",
    )


@pytest.fixture(scope="module")
def single_rated(tmp_path_factory) -> str:
    built = build_dataset(
        pairs=_pairs("advice", 40) + _pairs("safety", 40),
        judgements=[],
        eval_fraction=0.2,
        seed=0,
        validation={},
        validation_md="",
        config_hash="x",
    )
    return publish(built, str(tmp_path_factory.mktemp("pilot-fit") / "single"), Storage())


def _cfg(**fit):
    return parse_config(
        {
            "fit": {"bootstrap_resamples": 200, "quality": {"enabled": False}, **fit},
            "tracking": {"experiment": "test-pilot-fit-status"},
        }
    )


def test_pilot_says_not_measured_audit_or_accept_on_single_rated_data(single_rated, tmp_path):
    cfg = _cfg()
    with pytest.raises(NotFitError):
        run_check_fit(single_rated, cfg, str(tmp_path / "fit"))
    report = build_report(
        cfg, str(tmp_path / "fit"), None, None, None, str(tmp_path / "pilot"), dataset_dir=single_rated
    )

    assert report["verdict"] == NOT_MEASURED_VERDICT and report["verdict"] != rep.GO
    assert report["exit_code"] == ExitCode.NOT_FIT and report["go_families"] == []
    assert report["fit_status"] == "not measured" and sorted(report["not_measured_families"]) == ["advice", "safety"]
    for row in report["families"].values():
        assert row["fit_verdict"] == NOT_MEASURED and row["verdict"] == NOT_MEASURED_VERDICT
        assert "preftune audit create" in row["reason"] and "--accept-unaudited" in row["reason"]
        assert "one rating per item" in row["reason"]
    written = json.loads((tmp_path / "pilot" / "pilot.json").read_text())
    assert written["verdict"] == NOT_MEASURED_VERDICT
    md = (tmp_path / "pilot" / "pilot.md").read_text()
    assert md.startswith(f"# Pilot: {NOT_MEASURED_VERDICT.upper()}") and "preftune audit create" in md

    import mlflow

    run = mlflow.get_run(report["mlflow_run_id"])
    assert run.data.tags["preftune.pilot.verdict"] == NOT_MEASURED_VERDICT
    assert run.data.metrics["pilot.go_families"] == 0.0


def test_pilot_marks_unaudited_families_in_the_reason(single_rated, tmp_path):
    cfg = _cfg(accept_unaudited=True, unaudited_reason="vendor labels, audited upstream")
    run_check_fit(single_rated, cfg, str(tmp_path / "fit"))
    report = build_report(
        cfg, str(tmp_path / "fit"), None, None, None, str(tmp_path / "pilot"), dataset_dir=single_rated
    )
    assert report["fit_status"] == "unaudited" and report["not_measured_families"] == []
    assert report["verdict"] != NOT_MEASURED_VERDICT  # the labels were accepted: the usual go / no-go applies
    for row in report["families"].values():
        assert row["fit_verdict"] == UNAUDITED
        assert "accepted unaudited" in row["reason"] and "vendor labels, audited upstream" in row["reason"]


def test_a_go_family_beside_a_not_measured_one_keeps_the_pilot_a_go():
    """Mixed data: the measured family's go stands; the single-rated one is reported as not measured."""
    report = {
        "verdict": rep.GO,
        "exit_code": ExitCode.OK,
        "go_families": ["measured", "single"],
        "families": {
            "measured": {"fit_verdict": "fit", "verdict": rep.GO, "reason": "moved"},
            "single": {"fit_verdict": NOT_MEASURED, "verdict": rep.GO, "reason": "moved", "fit_reason": "one rating"},
        },
    }
    out = apply_fit_status(report, {"fit_status": "measured"})
    assert out["verdict"] == rep.GO and out["go_families"] == ["measured"] and out["exit_code"] == ExitCode.OK
    assert out["families"]["single"]["verdict"] == NOT_MEASURED_VERDICT
