"""check-fit: verdicts on synthetic judgements, the dataset passed on, exit codes, the report."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from preftune.collect.pairs import expand_judgements
from preftune.config import parse_config
from preftune.data.dataset import build_dataset, publish
from preftune.data.records import Judgement
from preftune.errors import ExitCode
from preftune.fit import (
    CAPABILITY_GAP,
    CONTESTED,
    FIT,
    NEEDS_DATA,
    NOT_MEASURED,
    NotFitError,
    check_fit,
    coverage_by_family,
    run_check_fit,
)
from preftune.storage import Storage

DATA = Path(__file__).parent / "data"


def _judgements(family: str, n_items: int, n_raters: int, pick, seed: int = 0) -> list[Judgement]:
    """``pick(item, rater, rng)`` -> best index (0..2) or None (all unacceptable)."""
    rng = random.Random(seed)
    out = []
    for i in range(n_items):
        texts = [f"{family} prompt {i}: answer {k} " + "x" * k for k in range(3)]
        for r in range(n_raters):
            best = pick(i, r, rng)
            out.append(
                Judgement(
                    item_id=f"{family}-item-{i}",
                    prompt_id=f"{family}-p{i}",
                    family=family,
                    tags=[f"tag:{family}"],
                    prompt=f"{family} question number {i}?",
                    candidates=[{"id": f"c{k}", "text": t} for k, t in enumerate(texts)],
                    rater_id=f"r{r}",
                    best=best,
                    ranking=None,
                    all_unacceptable=best is None,
                    unsafe=[],
                    source="simulated",
                    created_at=None,
                )
            )
    return out


def agree(i, r, rng):  # the rubric's answer differs per item; one rater slips now and then
    return (i + 1) % 3 if (r == 4 and i % 5 == 0) else i % 3


def camps(i, r, rng):  # two camps with opposite tastes
    return 0 if r < 3 else 1


def gap(i, r, rng):  # the model rarely produces anything acceptable
    return i % 3 if i % 5 == 0 else None


def thin(i, r, rng):
    return i % 3


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory) -> str:
    judgements = (
        _judgements("agree", 12, 5, agree)
        + _judgements("camps", 12, 6, camps)
        + _judgements("gap", 15, 5, gap)
        + _judgements("thin", 12, 1, thin)
    )
    built = build_dataset(
        pairs=expand_judgements(judgements),
        judgements=judgements,
        eval_fraction=0.25,
        seed=0,
        validation={"records_read": len(judgements), "records_kept": len(judgements), "dropped": {}, "repaired": {}},
        validation_md="# Validation report\n",
    )
    out = tmp_path_factory.mktemp("fit") / "mixed"
    return publish(built, str(out), Storage())


def _cfg(quality: bool = False, **fit) -> object:
    """Quality figures off unless asked for (tests/test_quality.py covers them)."""
    fit = {"bootstrap_resamples": 200, "quality": {"enabled": quality}, **fit}
    return parse_config({"fit": fit, "tracking": {"experiment": "test-fit"}})


def test_verdicts_on_synthetic_judgements(mixed_dataset):
    report = check_fit(mixed_dataset, _cfg())
    verdicts = {f: r.verdict for f, r in report.families.items()}
    # thin: 12 items, each rated once: single-rated data, agreement not measured
    assert verdicts == {"agree": FIT, "camps": CONTESTED, "gap": CAPABILITY_GAP, "thin": NOT_MEASURED}
    fams = report.families
    assert fams["agree"].agreement["alpha"] > 0.8 and fams["agree"].agreement["n_items"] == 12
    lo, hi = fams["agree"].agreement["alpha_ci"]
    assert lo <= fams["agree"].agreement["alpha"] <= hi
    assert fams["camps"].agreement["alpha"] < 0.5 and fams["camps"].agreement["pairwise"] == pytest.approx(6 / 15)
    assert fams["gap"].coverage["share"] == pytest.approx(3 / 15)
    assert "teach it first (SFT)" in fams["gap"].reason
    assert fams["agree"].coverage["share"] == 1.0
    assert fams["thin"].agreement["n_items"] == 0
    assert report.fit_families == ["agree"] and report.proceed
    assert set(report.tags) == {"tag:agree", "tag:camps", "tag:gap", "tag:thin"}


def test_thresholds_come_from_the_config(mixed_dataset):
    report = check_fit(mixed_dataset, _cfg(min_alpha=-1.0, min_coverage=0.1, min_items=1))
    verdicts = {f: r.verdict for f, r in report.families.items()}
    # the camps now pass alpha, the gap passes coverage; thin has one rater per item: still no agreement
    assert verdicts == {"agree": FIT, "camps": FIT, "gap": FIT, "thin": NOT_MEASURED}
    report = check_fit(mixed_dataset, _cfg(min_items=13))  # thin has 12 items in all: too few to audit either
    assert report.families["thin"].verdict == NEEDS_DATA


def test_coverage_needs_a_majority_and_ignores_unsafe_picks():
    picks = {
        "a": [(0, []), (None, []), (None, [])],  # one noisy pick of three: not covered
        "b": [(1, []), (1, []), (None, [])],  # the majority picked: covered
        "c": [(2, [2]), (2, [2])],  # the pick was flagged unsafe by the same rater: not acceptable
        "d": [(0, []), (None, [])],  # half: covered
    }
    records = [
        {"family": "f", "prompt_id": prompt, "best": best, "all_unacceptable": best is None, "unsafe": unsafe}
        for prompt, judged in picks.items()
        for best, unsafe in judged
    ]
    cov = coverage_by_family(records)["f"]
    assert (cov.n_prompts, cov.n_covered, cov.share) == (4, 2, 0.5)


def test_run_check_fit_excludes_unfit_families_and_passes_the_rest_on(mixed_dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    from preftune.tracking import resolve_tracking_uri

    cfg = _cfg(quality=True)
    out = tmp_path / "passed-on"
    report = run_check_fit(mixed_dataset, cfg, str(out))
    meta = json.loads((out / "dataset.json").read_text())
    src = json.loads((Path(mixed_dataset) / "dataset.json").read_text())
    assert meta["excluded_families"] == ["camps", "gap", "thin"] and meta["parent_hash"] == src["hash"]
    assert meta["hash"] == report.output_hash != src["hash"]
    assert meta["fit"] == {"agree": FIT, "camps": CONTESTED, "gap": CAPABILITY_GAP, "thin": NOT_MEASURED}
    assert meta["fit_status"] == "measured"
    for name in ("train", "eval", "judgements"):
        fams = {json.loads(x)["family"] for x in (out / f"{name}.jsonl").read_text().splitlines()}
        assert fams == {"agree"}
    # the split is kept: the agree family's pairs are on the same sides as before
    before = {json.loads(x)["pair_id"] for x in (Path(mixed_dataset) / "eval.jsonl").read_text().splitlines()}
    after = {json.loads(x)["pair_id"] for x in (out / "eval.jsonl").read_text().splitlines()}
    assert after and after <= before
    md = (out / "fit_report.md").read_text()
    assert "**contested**" in md and "**capability gap**" in md and "excluded" in md
    summary = json.loads((out / "fit_report.json").read_text())
    assert summary["proceed"] is True and summary["output"]["hash"] == meta["hash"]
    assert summary["families"]["camps"]["action"] == "excluded"

    run = MlflowClient(resolve_tracking_uri(cfg.tracking)).get_run(report.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["preftune.step"] == "check-fit"
    assert run.data.tags["fit.camps.verdict"] == CONTESTED and run.data.tags["fit.agree.verdict"] == FIT
    assert run.data.metrics["fit.agree.alpha"] > 0.8 and run.data.metrics["fit.gap.coverage"] == pytest.approx(0.2)
    assert run.data.tags["preftune.fit"] == "measured" and "fit.quality.length.chosen_longer_share" in run.data.metrics
    assert {i.dataset.digest for i in run.inputs.dataset_inputs} == {src["hash"][:32], meta["hash"][:32]}


def test_warn_keeps_unfit_families_and_stop_stops(mixed_dataset, tmp_path):
    report = run_check_fit(mixed_dataset, _cfg(on_unfit="warn"), str(tmp_path / "warn"))
    meta = json.loads((tmp_path / "warn" / "dataset.json").read_text())
    assert meta["excluded_families"] == [] and len(report.warnings) == 3
    src = json.loads((Path(mixed_dataset) / "dataset.json").read_text())
    assert meta["hash"] == src["hash"]  # nothing removed: the same content version

    with pytest.raises(NotFitError) as err:
        run_check_fit(mixed_dataset, _cfg(on_unfit="stop"), str(tmp_path / "stop"))
    assert err.value.exit_code == ExitCode.NOT_FIT and "on_unfit is 'stop'" in str(err.value)
    assert sorted(p.name for p in (tmp_path / "stop").iterdir()) == ["fit_report.json", "fit_report.md"]


@pytest.fixture
def contested_only(tmp_path) -> str:
    judgements = _judgements("tone", 10, 6, camps)
    built = build_dataset(
        pairs=expand_judgements(judgements),
        judgements=judgements,
        eval_fraction=0.2,
        seed=0,
        validation={},
        validation_md="",
    )
    return publish(built, str(tmp_path / "contested"), Storage())


def test_no_fit_family_stops_with_exit_10_and_a_readable_report(contested_only, tmp_path, cli):
    out = tmp_path / "fit-out"
    code, stdout, err = cli("check-fit", "--dataset", contested_only, "--output", str(out))
    assert code == ExitCode.NOT_FIT == 10
    assert "no behaviour family is fit" in err and "contested" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["fit_report.json", "fit_report.md"]  # no dataset
    report = json.loads((out / "fit_report.json").read_text())
    assert report["proceed"] is False and report["families"]["tone"]["verdict"] == CONTESTED
    assert "The run stops here (exit code 10)" in (out / "fit_report.md").read_text()


def test_cli_check_fit_ok(mixed_dataset, tmp_path, cli):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text("fit:\n  bootstrap_resamples: 100\n  on_unfit: warn\n")
    code, stdout, _ = cli("check-fit", "--dataset", mixed_dataset, "--config", str(cfg_path))
    assert code == 0 and "Go on" in stdout and "agree" in stdout
    code, _, err = cli("check-fit", "--dataset", str(tmp_path / "nothing-here"))
    assert code == ExitCode.INPUT and "does not exist" in err


def test_pair_imports_measure_agreement_on_repeated_ratings(tmp_path):
    from preftune.collect import collect_from_file

    res = collect_from_file(str(DATA / "trl_plain.jsonl"), str(tmp_path / "trl"), cfg=_cfg())
    report = check_fit(res.uri, _cfg(min_items=2))
    benign, safety = report.families["benign"], report.families["safety"]
    # benign: two pairs each rated by ann and bob alike; safety: one repeated pair only
    assert benign.agreement["n_items"] == 2 and benign.agreement["pairwise"] == 1.0
    assert benign.coverage is None and benign.verdict == FIT
    assert safety.agreement["n_items"] == 1 and safety.verdict == NEEDS_DATA


@pytest.fixture
def cli(monkeypatch, capsys):
    import typer

    import preftune.cli as cli_mod
    from preftune.cli import collect_cmd

    if not any(c.name == "check-fit" for c in cli_mod.app.registered_commands):  # until the integrator wires it
        app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
        collect_cmd.register(app)
        monkeypatch.setattr(cli_mod, "app", app)

    def run(*argv: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exc:
            cli_mod.main(list(argv))
        captured = capsys.readouterr()
        return exc.value.code, captured.out, captured.err

    return run


def test_check_fit_reads_a_dataset_on_s3(mixed_dataset, s3_server, s3_bucket):
    cfg = parse_config({"storage": {"s3_endpoint_url": s3_server}, "fit": {"bootstrap_resamples": 100}})
    storage = Storage.from_config(cfg.storage)
    uri = f"s3://{s3_bucket}/datasets/mixed"
    storage.put_dir(mixed_dataset, uri)
    report = check_fit(uri, cfg)
    assert report.dataset_uri == uri and {f: r.verdict for f, r in report.families.items()}["camps"] == CONTESTED
