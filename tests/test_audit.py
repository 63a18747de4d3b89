"""Single-rated data: the 'not measured' verdict, the agreement audit through the feedback service, the override."""

from __future__ import annotations

import json

import pytest
from support.pairs import single_rated_pairs

from preftune.config import parse_config
from preftune.data.dataset import build_dataset, load_dataset, publish
from preftune.data.records import Pair
from preftune.errors import ExitCode, InputError
from preftune.fit import CONTESTED, FIT, NEEDS_DATA, NOT_MEASURED, UNAUDITED, NotFitError, check_fit, run_check_fit
from preftune.fit.audit import (
    audit_item_id,
    audit_status,
    export_from_database,
    import_tasks_to_database,
    plan_audit,
    simulate_audit,
)
from preftune.storage import Storage
from preftune.world.raters import AuditRaters

SIZES = {"clear": 40, "murky": 40, "tiny": 3}


def _pairs() -> list[Pair]:
    out: list[Pair] = []
    for family, n in SIZES.items():
        out += single_rated_pairs(
            family,
            n,
            prompt=lambda i, f=family: f"{f} question {i}: what should I do about case {i * 7 % 13}?",
            chosen=lambda i, f=family: f"A careful answer {i} for {f}.",
            rejected=lambda i, f=family: f"A careless reply {i} ({f})",
        )
    return out


@pytest.fixture(scope="module")
def single_rated(tmp_path_factory) -> str:
    built = build_dataset(
        pairs=_pairs(), judgements=[], eval_fraction=0.2, seed=0, validation={}, validation_md="", config_hash="x"
    )
    return publish(built, str(tmp_path_factory.mktemp("audit") / "single"), Storage())


def _cfg(**fit):
    return parse_config(
        {
            "fit": {"bootstrap_resamples": 200, "quality": {"enabled": False}, **fit},
            "tracking": {"experiment": "test-audit"},
        }
    )


def test_single_rated_data_gets_not_measured_and_a_way_on(single_rated, tmp_path):
    report = check_fit(single_rated, _cfg())
    verdicts = {f: r.verdict for f, r in report.families.items()}
    assert verdicts == {"clear": NOT_MEASURED, "murky": NOT_MEASURED, "tiny": NEEDS_DATA}
    assert "agreement not measured (one rating per item: 40 items" in report.families["clear"].reason
    assert not report.proceed and report.fit_status == "not measured"
    with pytest.raises(NotFitError) as err:
        run_check_fit(single_rated, _cfg(), str(tmp_path / "stop"))
    msg = str(err.value)
    assert err.value.exit_code == ExitCode.NOT_FIT == 10
    assert "one rating per item" in msg and "preftune audit create" in msg and "--accept-unaudited" in msg
    md = (tmp_path / "stop" / "fit_report.md").read_text()
    assert "1. Audit:" in md and "2. Override:" in md


def test_the_audit_plan_is_stratified_and_hides_the_original_choice(single_rated):
    loaded = load_dataset(single_rated, Storage())
    plan = plan_audit(loaded, per_family=15, raters=3, seed=0)
    assert plan.families == {"clear": 15, "murky": 15, "tiny": 3}
    chosen_of = {p["item_id"]: p["chosen"] for p in loaded.train + loaded.eval}
    first_is_chosen = 0
    for task, item in zip(plan.tasks, plan.items, strict=True):
        assert task["format"] == "preftune.candidates" and task["item_id"] == audit_item_id(item["item_id"])
        assert [c["id"] for c in task["candidates"]] == ["a", "b"] and "audit" in task["tags"]
        assert not {"chosen", "rejected", "best", "original"} & set(task)
        first_is_chosen += task["candidates"][0]["text"] == chosen_of[item["item_id"]]
    assert 8 <= first_is_chosen <= 25  # the order is randomised (33 tasks)
    assert plan_audit(loaded, per_family=15, raters=3, seed=0).tasks == plan.tasks  # seeded
    manifest = plan.manifest()
    assert manifest["raters"] == 3 and "chosen" not in json.dumps(manifest["items"])


@pytest.fixture
def feedback_db(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_DATABASE_URL", f"sqlite:///{tmp_path / 'feedback.db'}")
    monkeypatch.setenv("PREFTUNE_AUTO_MIGRATE", "true")
    monkeypatch.setenv("PREFTUNE_RATINGS_PER_TASK", "3")
    return tmp_path / "feedback.db"


def _rate_in_the_service(tasks: list[dict], loaded, raters: AuditRaters) -> int:
    """Simulated raters work through the service's own task hand-out and submission."""
    from preftune.serve import db, service
    from preftune.serve.schemas import JudgementIn
    from preftune.serve.settings import load_settings

    chosen_of = {audit_item_id(p["item_id"]): p["chosen"] for p in loaded.train + loaded.eval}
    by_item = {t["item_id"]: t for t in tasks}
    engine = db.make_engine(load_settings().resolved_database_url(), pool_size=2)
    sessions = db.make_sessionmaker(engine)
    n = 0
    try:
        with sessions() as s:
            accounts = [service.create_rater(s, name)[0] for name in raters.rater_ids]
        for k, account in enumerate(accounts):
            while True:
                with sessions() as s:
                    rater = s.get(type(account), account.id)
                    a = service.next_task(s, rater, ratings_per_task=3, ttl_seconds=600)
                    if a is None:
                        break
                    task = by_item[a.task.item_id]
                    original = [c["text"] for c in task["candidates"]].index(chosen_of[task["item_id"]])
                    best = raters.judge(task, original)[k]["best"]
                    service.submit_judgement(s, rater, JudgementIn(task_id=a.task_id, best=best))
                    n += 1
    finally:
        engine.dispose()
    return n


def test_audit_through_the_feedback_service_gives_per_family_verdicts(single_rated, feedback_db, tmp_path):
    loaded = load_dataset(single_rated, Storage())
    plan = plan_audit(loaded, per_family=15, raters=3, seed=0)
    result = import_tasks_to_database(plan.tasks_jsonl())
    assert result["imported"] == 33 and result["ratings_per_task"] == 3
    assert import_tasks_to_database(plan.tasks_jsonl())["unchanged"] == 33  # re-import is harmless
    raters = AuditRaters(n_raters=3, accuracy=0.95, family_accuracy={"murky": 0.55}, seed=1)
    assert _rate_in_the_service(plan.tasks, loaded, raters) == 99
    export = export_from_database()
    st = audit_status(plan.manifest(), export)
    assert st["done"] and st["families"]["clear"] == {"items": 15, "started": 15, "complete": 15, "judgements": 45}

    report = check_fit(loaded, _cfg(), audit_records=export, audit_source="service")
    fams = report.families
    assert {f: r.verdict for f, r in fams.items()} == {"clear": FIT, "murky": CONTESTED, "tiny": NEEDS_DATA}
    assert fams["clear"].agreement["n_items"] == 15 and fams["clear"].agreement["alpha"] > 0.6
    assert fams["murky"].agreement["alpha"] < 0.5 and fams["clear"].audit["match_share"] > 0.85
    lo, hi = fams["clear"].audit["match_share_ci"]
    assert lo <= fams["clear"].audit["match_share"] <= hi
    assert report.proceed and report.fit_status == "audited" and report.fit_families == ["clear"]
    assert report.audit == {"source": "service", "records": 99, "ignored": 0}
    assert "## Agreement audit" in report.to_markdown()


def test_labels_the_re_raters_reject_make_a_family_contested(single_rated):
    loaded = load_dataset(single_rated, Storage())
    plan = plan_audit(loaded, per_family=15, raters=3, seed=0)
    # the re-raters agree with each other on every item, and always against the original label
    records = simulate_audit(loaded, plan.manifest(), plan.tasks, accuracy=0.0, seed=0)
    report = check_fit(loaded, _cfg(), audit_records=records, audit_source="sim")
    clear = report.families["clear"]
    assert clear.agreement["pairwise"] == 1.0 and clear.verdict == CONTESTED
    assert "not with the dataset's labels" in clear.reason and clear.audit["match_share"] == 0.0


def test_an_export_of_another_dataset_is_refused(single_rated):
    loaded = load_dataset(single_rated, Storage())
    foreign = [{"format": "preftune.judgement", "item_id": "audit-elsewhere", "candidates": [], "best": 0}]
    with pytest.raises(InputError, match="no judgement of an audit of this dataset"):
        check_fit(loaded, _cfg(), audit_records=foreign)


def test_accept_unaudited_goes_on_and_tags_the_runs(single_rated, tmp_path, monkeypatch):
    import mlflow

    from preftune import tracking

    with pytest.raises(Exception, match="unaudited_reason"):
        _cfg(accept_unaudited=True)
    cfg = _cfg(accept_unaudited=True, unaudited_reason="published HH labels, audited upstream")
    with tracking.start_pipeline_run(cfg) as parent:
        report = run_check_fit(single_rated, cfg, str(tmp_path / "out"))
        with tracking.start_step_run("train-reward", cfg) as later:
            later_id = later.info.run_id
    fams = {f: r.verdict for f, r in report.families.items()}
    assert fams == {"clear": UNAUDITED, "murky": UNAUDITED, "tiny": NEEDS_DATA}
    assert report.fit_status == "unaudited" and report.excluded_families == ["tiny"]
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["fit_status"] == "unaudited" and meta["fit_unaudited_reason"].startswith("published HH")
    client = mlflow.MlflowClient()
    for run_id in (report.mlflow_run_id, parent.info.run_id, later_id):
        tags = client.get_run(run_id).data.tags
        assert tags["preftune.fit"] == "unaudited" and tags["preftune.fit.reason"].startswith("published HH")
    assert "**Unaudited**" in (tmp_path / "out" / "fit_report.md").read_text()
    # evaluate's report line reads the same tags from its run
    from preftune.evaluate.report import fit_status

    assert fit_status({"run_id": later_id}) == (
        "unaudited: rater agreement on the training data was not measured; accepted because: "
        "published HH labels, audited upstream"
    )
    assert fit_status({"fit": {"preftune.fit": "audited"}}) == "audited" and fit_status({"fit": {}}) is None


@pytest.fixture
def cli(monkeypatch, capsys):
    import preftune.cli as cli_mod

    def run(*argv: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exc:
            cli_mod.main(list(argv))
        captured = capsys.readouterr()
        return exc.value.code, captured.out, captured.err

    return run


def test_cli_audit_create_status_simulate_and_check_fit(single_rated, feedback_db, tmp_path, cli):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("fit:\n  bootstrap_resamples: 100\n  quality:\n    enabled: false\n")
    audit = tmp_path / "audit"
    code, out, _ = cli(
        "audit", "create", "-d", single_rated, "-o", str(audit), "-c", str(cfg), "--per-family", "10", "--import"
    )
    assert code == 0 and "imported 23 task(s)" in out and (audit / "tasks.jsonl").exists()
    code, out, _ = cli("audit", "status", "--audit", str(audit))
    assert code == 0 and "0 of 23 pairs have 3 judgements" in out
    export = tmp_path / "export.jsonl"
    code, out, _ = cli(
        "audit",
        "simulate",
        "-d",
        single_rated,
        "-a",
        str(audit),
        "-o",
        str(export),
        "--accuracy",
        "0.97",
        "--family-accuracy",
        "murky=0.5",
    )
    assert code == 0 and "wrote 69 simulated judgement(s)" in out
    code, out, _ = cli("audit", "status", "--audit", str(audit), "--export", str(export))
    assert code == 0 and "complete" in out
    code, out, _ = cli("check-fit", "--dataset", single_rated, "--config", str(cfg), "--audit", str(export))
    assert code == 0 and "## Agreement audit" in out and "| clear | **fit** |" in out
    code, _, err = cli("check-fit", "--dataset", single_rated, "--config", str(cfg))
    assert code == 10 and "one rating per item" in err
    code, out, _ = cli("check-fit", "--dataset", single_rated, "--config", str(cfg), "--accept-unaudited", "known set")
    assert code == 0 and "**unaudited**" in out and "known set" in out
    code, _, err = cli("check-fit", "--dataset", single_rated, "--accept-unaudited", " ")
    assert code == 2 and "give the reason" in err
    code, _, err = cli(
        "audit", "simulate", "-d", single_rated, "-a", str(audit), "-o", str(export), "--family-accuracy", "x"
    )
    assert code == 2 and "FAMILY=ACCURACY" in err


def test_audit_over_the_service_http_api(single_rated, tmp_path, monkeypatch):
    """create (POST /api/admin/tasks/import) and status (GET /api/admin/export) through the admin API."""
    from fastapi.testclient import TestClient
    from support.serve import ADMIN_TOKEN, make_settings

    from preftune.errors import CredentialsError
    from preftune.fit import audit as audit_mod
    from preftune.serve.app import create_app

    app = create_app(make_settings(f"sqlite:///{tmp_path / 'http.db'}", ratings_per_task=2))
    with TestClient(app) as client:

        def fake_http(url, token):  # the service in-process instead of a socket; same requests
            if not token:
                raise CredentialsError("no token")
            client.headers["authorization"] = f"Bearer {token}"
            return client

        monkeypatch.setattr(audit_mod, "_http", fake_http)
        loaded = load_dataset(single_rated, Storage())
        plan = plan_audit(loaded, per_family=5, raters=3, seed=0)
        result = audit_mod.import_tasks_over_http(plan.tasks_jsonl(), "http://svc", ADMIN_TOKEN)
        assert result == {"received": 13, "imported": 13, "unchanged": 0, "ratings_per_task": 2}
        assert audit_mod.export_over_http("http://svc", ADMIN_TOKEN) == []
        with pytest.raises(CredentialsError):
            audit_mod.import_tasks_over_http(plan.tasks_jsonl(), "http://svc", "wrong-token")


def test_a_cached_check_fit_still_tags_the_later_runs():
    """Kubeflow served check-fit from its cache: the later steps take the fit tags from the check-fit run
    that computed it (same data snapshot and pipeline config hash)."""
    import mlflow

    from preftune import tracking

    cfg = _cfg()
    tracking.configure(cfg)
    earlier = {"preftune.snapshot": "snap-cafe", "preftune.pipeline_config_hash": cfg.config_hash()}
    with tracking.start_step_run("check-fit", cfg, tags={**earlier, "preftune.fit": "unaudited"}):
        pass
    with tracking.start_step_run("check-fit", cfg, tags={**earlier, "preftune.snapshot": "snap-other"}):
        pass
    with tracking.start_pipeline_run(cfg) as parent:
        mlflow.MlflowClient().set_tag(parent.info.run_id, "preftune.snapshot", "snap-cafe")
        with tracking.start_step_run("evaluate", cfg) as later:
            later_id = later.info.run_id
    assert mlflow.MlflowClient().get_run(later_id).data.tags["preftune.fit"] == "unaudited"
    with tracking.start_pipeline_run(cfg) as parent:  # another snapshot: nothing to inherit
        mlflow.MlflowClient().set_tag(parent.info.run_id, "preftune.snapshot", "snap-new")
        with tracking.start_step_run("evaluate", cfg) as later:
            later_id = later.info.run_id
    assert "preftune.fit" not in mlflow.MlflowClient().get_run(later_id).data.tags
