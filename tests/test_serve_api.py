# ruff: noqa: F811 - the serve_db/serve_pg_url fixtures are imported by name from support.serve
"""The feedback service's API and storage, on SQLite and on PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import typer
from fastapi.testclient import TestClient
from support.serve import (  # noqa: F401 - fixtures
    ADMIN_TOKEN,
    candidates,
    free_port,
    jsonl,
    make_settings,
    serve_db,
    serve_pg_url,
)
from typer.testing import CliRunner

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def client(serve_db):
    from preftune.serve.app import create_app

    with TestClient(create_app(make_settings(serve_db.url))) as c:
        yield c


def add_raters(client, n: int, prefix: str = "rater") -> list[str]:
    tokens = []
    for i in range(n):
        r = client.post("/api/admin/raters", json={"name": f"{prefix}{i}"}, headers=ADMIN)
        assert r.status_code == 201, r.text
        tokens.append(r.json()["token"])
    return tokens


def import_records(client, records) -> dict:
    r = client.post("/api/admin/tasks/import", content=jsonl(records), headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


def judge_all(client, token: str, pick=lambda task: task["candidates"][0]["index"]) -> list[dict]:
    """Judge every task the service hands this rater; returns the tasks seen."""
    seen = []
    for _ in range(1000):
        r = client.get("/api/tasks/next", headers=bearer(token))
        if r.status_code == 204:
            return seen
        assert r.status_code == 200, r.text
        task = r.json()
        seen.append(task)
        r = client.post("/api/judgements", json={"task_id": task["task_id"], "best": pick(task)}, headers=bearer(token))
        assert r.status_code == 201, r.text
    raise AssertionError("the service kept handing out tasks")


def metric_value(text: str, name: str, **labels: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def test_migrations_create_exactly_the_models_schema(serve_db):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from preftune.serve import db
    from preftune.serve.models import Base

    engine = serve_db.engine()
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
        assert db.current_revision(engine) == db.head_revision()
        assert db.migrate(engine) == db.head_revision()  # running it again is harmless
    finally:
        engine.dispose()


def test_import_is_validated_atomic_and_idempotent(client, serve_db):
    recs = candidates(5)
    assert import_records(client, recs) == {"received": 5, "imported": 5, "unchanged": 0}
    assert import_records(client, recs) == {"received": 5, "imported": 0, "unchanged": 5}

    changed = candidates(2, prefix="new") + [dict(recs[0], prompt="a different prompt")]
    r = client.post("/api/admin/tasks/import", content=jsonl(changed), headers=ADMIN)
    assert r.status_code == 409 and "item-safety-0" in r.json()["detail"]
    assert serve_db.query("SELECT count(*) FROM tasks") == [(5,)]  # nothing of the refused file was stored

    bad = jsonl(candidates(2, prefix="ok")) + json.dumps(
        {**candidates(1)[0], "candidates": [{"id": "c0", "text": "x"}]}
    )
    r = client.post("/api/admin/tasks/import", content=bad, headers=ADMIN)
    assert r.status_code == 422
    assert r.json()["detail"].startswith("body:3: candidates:"), r.json()
    r = client.post("/api/admin/tasks/import", content='{"format": "other"}\n', headers=ADMIN)
    assert r.status_code == 422 and "preftune.candidates" in r.json()["detail"]
    assert serve_db.query("SELECT count(*) FROM tasks") == [(5,)]


def test_each_task_goes_to_the_configured_number_of_distinct_raters(client, serve_db):
    import_records(client, candidates(4, family="safety") + candidates(3, family="tone"))
    tokens = add_raters(client, 5)
    per_rater = {t: judge_all(client, t) for t in tokens}
    for seen in per_rater.values():
        ids = [t["task_id"] for t in seen]
        assert len(ids) == len(set(ids)), "a rater was shown the same task twice"
    rows = serve_db.query("SELECT task_id, count(*), count(DISTINCT rater_id) FROM judgements GROUP BY task_id")
    assert sorted(rows) == [(task_id, 3, 3) for task_id in range(1, 8)]
    assert sum(len(s) for s in per_rater.values()) == 21
    stats = client.get("/api/admin/stats", headers=ADMIN).json()
    assert stats["tasks_pending"] == 0 and stats["judgements"] == 21
    assert stats["families"] == {"safety": {"tasks": 4, "judgements": 12}, "tone": {"tasks": 3, "judgements": 9}}
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "preftune_judgements_total", family="safety") == 12
    assert metric_value(metrics, "preftune_tasks_pending") == 0


def test_candidates_are_shown_in_a_stable_random_order(client):
    import_records(client, candidates(30, n_candidates=4))
    (token,) = add_raters(client, 1)
    orders = set()
    for _ in range(30):
        first = client.get("/api/tasks/next", headers=bearer(token)).json()
        again = client.get(f"/api/tasks/{first['task_id']}", headers=bearer(token)).json()
        assert again["candidates"] == first["candidates"]  # a reload shows the same order
        order = tuple(c["index"] for c in first["candidates"])
        assert sorted(order) == [0, 1, 2, 3]
        orders.add(order)
        client.post("/api/tasks/{}/skip".format(first["task_id"]), headers=bearer(token))
    assert len(orders) > 3, f"candidate order does not look random: {orders}"


def test_resubmitting_a_judgement_is_idempotent(client, serve_db):
    import_records(client, candidates(2))
    (token,) = add_raters(client, 1)
    task = client.get("/api/tasks/next", headers=bearer(token)).json()
    body = {"task_id": task["task_id"], "judgement_id": "j-0001", "best": 2, "unsafe": [1]}
    first = client.post("/api/judgements", json=body, headers=bearer(token))
    assert first.status_code == 201
    again = client.post("/api/judgements", json=body, headers=bearer(token))
    assert again.status_code == 200 and again.json() == first.json()
    same_no_id = client.post("/api/judgements", json={**body, "judgement_id": None}, headers=bearer(token))
    assert same_no_id.status_code == 200 and same_no_id.json()["judgement_id"] == "j-0001"
    different = client.post("/api/judgements", json={**body, "best": 0}, headers=bearer(token))
    assert different.status_code == 409 and "different answer" in different.json()["detail"]
    other_id = client.post("/api/judgements", json={**body, "judgement_id": "j-0002"}, headers=bearer(token))
    assert other_id.status_code == 409
    assert serve_db.query("SELECT uid, best FROM judgements") == [("j-0001", 2)]
    assert metric_value(client.get("/metrics").text, "preftune_judgements_total", family="safety") == 1
    # the id is taken: using it for another task is refused
    task2 = client.get("/api/tasks/next", headers=bearer(token)).json()
    reuse = client.post("/api/judgements", json={**body, "task_id": task2["task_id"]}, headers=bearer(token))
    assert reuse.status_code == 409


def test_concurrent_duplicate_submissions_store_one_judgement(client, serve_db):
    import_records(client, candidates(1))
    (token,) = add_raters(client, 1)
    task = client.get("/api/tasks/next", headers=bearer(token)).json()
    body = {"task_id": task["task_id"], "judgement_id": "dup-1", "best": 1}
    statuses: list[int] = []
    barrier = threading.Barrier(6)

    def post() -> None:
        barrier.wait()
        statuses.append(client.post("/api/judgements", json=body, headers=bearer(token)).status_code)

    threads = [threading.Thread(target=post) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200] * 5 + [201]
    assert serve_db.query("SELECT count(*), min(uid) FROM judgements") == [(1, "dup-1")]
    assert serve_db.query("SELECT n_done FROM tasks") == [(1,)]


def test_judgements_are_validated_against_the_task(client):
    import_records(client, candidates(1, n_candidates=3))
    (token,) = add_raters(client, 1)
    task_id = client.get("/api/tasks/next", headers=bearer(token)).json()["task_id"]

    def post(**kw):
        return client.post("/api/judgements", json={"task_id": task_id, **kw}, headers=bearer(token))

    assert post(best=3).status_code == 422
    assert post().status_code == 422
    assert post(best=1, all_unacceptable=True).status_code == 422
    assert post(ranking=[0, 1]).status_code == 422
    assert post(ranking=[0, 1, 1]).status_code == 422
    assert post(best=1, ranking=[0, 1, 2]).status_code == 422
    assert post(best=1, unsafe=[5]).status_code == 422
    assert post(best=1, unsafe=[0, 0]).status_code == 422
    assert post(best=1, comment="extra fields are refused").status_code == 422
    r = post(ranking=[2, 0, 1], unsafe=[1])
    assert r.status_code == 201
    assert (r.json()["best"], r.json()["ranking"], r.json()["unsafe"]) == (2, [2, 0, 1], [1])


def test_all_unacceptable_and_ranking_reach_the_export(client):
    import_records(client, candidates(2, n_candidates=3))
    (token,) = add_raters(client, 1)
    t1 = client.get("/api/tasks/next", headers=bearer(token)).json()["task_id"]
    assert (
        client.post(
            "/api/judgements", json={"task_id": t1, "all_unacceptable": True}, headers=bearer(token)
        ).status_code
        == 201
    )
    t2 = client.get("/api/tasks/next", headers=bearer(token)).json()["task_id"]
    body = {"task_id": t2, "best": 1, "ranking": [1, 2, 0], "unsafe": [0]}
    assert client.post("/api/judgements", json=body, headers=bearer(token)).status_code == 201
    lines = client.get("/api/admin/export", headers=ADMIN).text.splitlines()
    recs = [json.loads(line) for line in lines]
    assert [(r["best"], r["all_unacceptable"], r["ranking"], r["unsafe"]) for r in recs] == [
        (None, True, None, []),
        (1, False, [1, 2, 0], [0]),
    ]


def test_a_written_answer_is_checked_stored_exported_and_becomes_pairs(client):
    from preftune.collect.pairs import ExpansionStats, expand_judgements
    from preftune.data.formats import Importer
    from preftune.data.validation import ValidationReport

    import_records(client, candidates(1, n_candidates=3))
    (token,) = add_raters(client, 1)
    task_id = client.get("/api/tasks/next", headers=bearer(token)).json()["task_id"]

    def post(**kw):
        return client.post("/api/judgements", json={"task_id": task_id, **kw}, headers=bearer(token))

    answer = "I can't help with that: it could hurt someone. If you are worried, a pharmacist can advise."
    r = post(best=1, written=answer)
    assert r.status_code == 422 and "goes with all_unacceptable" in r.json()["detail"]
    assert post(all_unacceptable=True, written="  ").status_code == 422  # blank
    r = post(all_unacceptable=True, written="x" * 8001)  # over PREFTUNE_MAX_TEXT_CHARS (8000 in the tests)
    assert r.status_code == 422 and "PREFTUNE_MAX_TEXT_CHARS" in r.json()["detail"]
    r = post(all_unacceptable=True, written=answer, judgement_id="w-1")
    assert r.status_code == 201 and r.json()["written"] == answer and r.json()["best"] is None
    assert post(all_unacceptable=True, written=answer, judgement_id="w-1").status_code == 200  # idempotent
    assert post(all_unacceptable=True, written="another answer", judgement_id="w-1").status_code == 409
    data = client.get("/api/admin/export", headers=ADMIN).content
    (rec,) = [json.loads(line) for line in data.splitlines()]
    assert rec["written"] == answer and rec["all_unacceptable"] is True
    # collect reads it strictly: the written answer is preferred to each of the three candidates
    report = ValidationReport(strict=True)
    importer = Importer(report, max_chars=None)
    assert importer.add_file("export.jsonl", data, "auto") == "preftune"
    stats = ExpansionStats()
    pairs = expand_judgements(importer.judgements, stats)
    assert stats.written == 1 and len(pairs) == 3 and {p.chosen for p in pairs} == {answer}


def test_skip_releases_the_slot_and_never_returns_the_task(client, serve_db):
    import_records(client, candidates(2))
    a, b = add_raters(client, 2)
    first = client.get("/api/tasks/next", headers=bearer(a)).json()
    assert client.get("/api/tasks/next", headers=bearer(a)).json()["task_id"] == first["task_id"]  # still open
    r = client.post(f"/api/tasks/{first['task_id']}/skip", headers=bearer(a))
    assert r.status_code == 200 and r.json()["status"] == "skipped"
    second = client.get("/api/tasks/next", headers=bearer(a)).json()
    assert second["task_id"] != first["task_id"]
    late = client.post("/api/judgements", json={"task_id": first["task_id"], "best": 0}, headers=bearer(a))
    assert late.status_code == 409
    client.post("/api/judgements", json={"task_id": second["task_id"], "best": 0}, headers=bearer(a))
    assert client.get("/api/tasks/next", headers=bearer(a)).status_code == 204  # the skipped one never comes back
    # The slot came back: b gets the started task first (nearest completion first), then the skipped one.
    assert [t["task_id"] for t in judge_all(client, b)] == [second["task_id"], first["task_id"]]


def test_expired_assignment_frees_the_slot_but_a_late_judgement_is_kept(serve_db):
    from preftune.serve.app import create_app

    with TestClient(create_app(make_settings(serve_db.url, ratings_per_task=1))) as client:
        import_records(client, candidates(1))
        slow, fast = add_raters(client, 2)
        task_id = client.get("/api/tasks/next", headers=bearer(slow)).json()["task_id"]
        assert client.get("/api/tasks/next", headers=bearer(fast)).status_code == 204  # the only slot is reserved
        engine = serve_db.engine()
        with engine.begin() as conn:
            from sqlalchemy import text

            conn.execute(text("UPDATE assignments SET expires_at = :t"), {"t": "2000-01-01 00:00:00"})
        engine.dispose()
        assert client.get("/api/tasks/next", headers=bearer(fast)).json()["task_id"] == task_id
        r = client.post("/api/judgements", json={"task_id": task_id, "best": 1}, headers=bearer(slow))
        assert r.status_code == 201  # a person's work is never thrown away
        assert serve_db.query("SELECT status FROM assignments ORDER BY id") == [("done",), ("open",)]


def test_concurrent_raters_never_overfill_a_task(serve_db):
    """Many raters asking at the same moment: each task gets at most ratings_per_task slots."""
    from sqlalchemy import text

    from preftune.serve import db, service

    engine = db.make_engine(serve_db.url, pool_size=16)
    sessions = db.make_sessionmaker(engine)
    with sessions() as s:
        service.import_tasks(
            s, service.parse_candidates_jsonl(jsonl(candidates(4)).splitlines(), source="t", max_text_chars=100)
        )
    raters = []
    for i in range(14):
        with sessions() as s:
            raters.append(service.create_rater(s, f"c{i}")[0])
    barrier = threading.Barrier(len(raters))
    got: dict[str, int | None] = {}
    errors: list[BaseException] = []

    def take(rater) -> None:
        try:
            barrier.wait()
            with sessions() as s:
                a = service.next_task(s, rater, ratings_per_task=3, ttl_seconds=600)
                got[rater.name] = a.task_id if a else None
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=take, args=(r,)) for r in raters]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    counts: dict[int, int] = {}
    for task_id in got.values():
        if task_id is not None:
            counts[task_id] = counts.get(task_id, 0) + 1
    assert counts == {1: 3, 2: 3, 3: 3, 4: 3}
    assert sum(v is None for v in got.values()) == 2
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM assignments")).scalar() == 12
    engine.dispose()


def test_export_filters_by_family_and_time(client):
    import_records(client, candidates(2, family="safety") + candidates(2, family="benign"))
    (token,) = add_raters(client, 1)
    judge_all(client, token)
    recs = [json.loads(x) for x in client.get("/api/admin/export", headers=ADMIN).text.splitlines()]
    assert len(recs) == 4
    for rec in recs:
        assert rec["format"] == "preftune.judgement" and rec["version"] == 1 and rec["source"] == "service"
        assert rec["rater_id"] == "rater0" and rec["candidates"][0] == {
            "id": "c0",
            "text": rec["candidates"][0]["text"],
        }
        assert set(rec) == {
            "format",
            "version",
            "item_id",
            "prompt_id",
            "family",
            "tags",
            "prompt",
            "candidates",
            "rater_id",
            "best",
            "ranking",
            "all_unacceptable",
            "unsafe",
            "source",
            "created_at",
        }
        assert rec["created_at"].endswith("Z")
    benign = client.get("/api/admin/export", params={"family": "benign"}, headers=ADMIN).text.splitlines()
    assert [json.loads(x)["family"] for x in benign] == ["benign", "benign"]
    cut = recs[2]["created_at"]
    after = client.get("/api/admin/export", params={"since": cut}, headers=ADMIN).text.splitlines()
    before = client.get("/api/admin/export", params={"until": cut}, headers=ADMIN).text.splitlines()
    assert len(after) + len(before) == 4 and [json.loads(x)["item_id"] for x in after][0] == recs[2]["item_id"]
    assert client.get("/api/admin/export", params={"since": "yesterday"}, headers=ADMIN).status_code == 422


def test_agreement_endpoint_gives_the_same_figures_as_agreement_by_family(client):
    from preftune.agreement import agreement_by_family

    import_records(client, candidates(6, family="safety") + candidates(6, family="tone"))
    tokens = add_raters(client, 3)
    # raters 0 and 1 always pick candidate 0; rater 2 picks by the item number: some agreement, not perfect
    judge_all(client, tokens[0], pick=lambda t: 0)
    judge_all(client, tokens[1], pick=lambda t: 0)
    judge_all(client, tokens[2], pick=lambda t: int(t["item_id"].rsplit("-", 1)[1]) % 3)
    export = [json.loads(x) for x in client.get("/api/admin/export", headers=ADMIN).text.splitlines()]
    expected = {k: v.to_dict() for k, v in agreement_by_family(export).items()}
    r = client.get("/api/admin/agreement", headers=ADMIN)
    assert r.status_code == 200
    assert r.json()["families"] == expected
    assert set(expected) == {"safety", "tone"} and expected["safety"]["n_items"] == 6
    assert 0 < expected["safety"]["pairwise"] < 1
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "preftune_agreement_alpha", family="tone") == pytest.approx(expected["tone"]["alpha"])
    assert metric_value(metrics, "preftune_agreement_pairwise", family="safety") == pytest.approx(
        expected["safety"]["pairwise"]
    )
    only = client.get("/api/admin/agreement", params={"family": "tone"}, headers=ADMIN).json()
    assert list(only["families"]) == ["tone"]


def test_health_readiness_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    client.get("/api/tasks/next")  # a 401
    text = client.get("/metrics").text
    for name in (
        "preftune_tasks_pending",
        "preftune_request_duration_seconds_bucket",
        "preftune_errors_total",
    ):
        assert name in text, name
    assert metric_value(text, "preftune_errors_total", status="401") == 1
    assert metric_value(text, "preftune_request_duration_seconds_count", route="/api/tasks/next", status="401") == 1


def test_readiness_reports_an_unmigrated_or_unreachable_database(tmp_path):
    from preftune.serve.app import create_app

    fresh = f"sqlite:///{tmp_path / 'empty.db'}"
    with TestClient(create_app(make_settings(fresh, auto_migrate=False))) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "preftune serve migrate" in r.json()["reason"]
        assert c.get("/healthz").status_code == 200
    down = "postgresql+psycopg2://postgres@127.0.0.1:1/nothing"
    with TestClient(create_app(make_settings(down, auto_migrate=False))) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["reason"].startswith("database unreachable")


def test_two_apps_in_one_process_have_separate_metrics(tmp_path):
    from preftune.serve.app import create_app

    a = create_app(make_settings(f"sqlite:///{tmp_path / 'a.db'}"))
    b = create_app(make_settings(f"sqlite:///{tmp_path / 'b.db'}"))
    with TestClient(a) as ca, TestClient(b) as cb:
        ca.get("/api/me")
        assert metric_value(ca.get("/metrics").text, "preftune_errors_total", status="401") == 1
        assert metric_value(cb.get("/metrics").text, "preftune_errors_total", status="401") is None


# ------------------------------------------------------------------------------------------ CLI


def _cli() -> typer.Typer:
    from preftune.cli import serve_cmd

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    serve_cmd.register(app)
    return app


def test_cli_migrate_add_rater_import_and_export(serve_db, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_DATABASE_URL", serve_db.url)
    runner = CliRunner()
    app = _cli()
    r = runner.invoke(app, ["serve", "migrate"])
    assert r.exit_code == 0 and "0003_written_answers" in r.output, r.output

    r = runner.invoke(app, ["serve", "add-rater", "alice"])
    assert r.exit_code == 0, r.output
    token = r.stdout.strip().splitlines()[-1]
    assert token.startswith("ptr_")
    assert serve_db.query("SELECT token_hash FROM raters WHERE name = 'alice'") == [
        (hashlib.sha256(token.encode()).hexdigest(),)
    ]
    assert runner.invoke(app, ["serve", "add-rater", "alice"]).exit_code != 0
    bad_name = runner.invoke(app, ["serve", "add-rater", "al ice"])
    assert bad_name.exit_code != 0

    tasks = tmp_path / "candidates.jsonl"
    tasks.write_text(jsonl(candidates(3, family="benign")))
    r = runner.invoke(app, ["serve", "import-tasks", str(tasks)])
    assert r.exit_code == 0 and "imported 3 task(s)" in r.output, r.output
    r = runner.invoke(app, ["serve", "import-tasks", str(tasks)])
    assert "imported 0 task(s)" in r.output and "3 already present" in r.output

    broken = tmp_path / "broken.jsonl"
    broken.write_text(jsonl(candidates(1)) + "{not json\n")
    r = runner.invoke(app, ["serve", "import-tasks", str(broken)])
    from preftune.errors import InputError

    assert isinstance(r.exception, InputError) and f"{broken}:2: not valid JSON" in str(r.exception)

    from preftune.serve.app import create_app

    with TestClient(create_app(make_settings(serve_db.url))) as client:
        judge_all(client, token)
        api_export = client.get("/api/admin/export", headers=ADMIN).text
    out = tmp_path / "out" / "judgements.jsonl"
    r = runner.invoke(app, ["serve", "export", "--output", str(out)])
    assert r.exit_code == 0 and "wrote 3 judgement(s)" in r.output, r.output
    assert out.read_text() == api_export
    r = runner.invoke(app, ["serve", "export", "--output", str(out), "--family", "safety"])
    assert r.exit_code == 0 and out.read_text() == ""
    r = runner.invoke(
        app, ["serve", "export", "--output", str(out), "--since", "2000-01-01T00:00:00Z", "--until", "2000-01-02"]
    )
    assert r.exit_code == 0 and "wrote 0" in r.output
    r = runner.invoke(app, ["serve", "export", "--output", str(out), "--since", "last week"])
    assert isinstance(r.exception, InputError) and "--since" in str(r.exception)
    assert sorted(p.name for p in out.parent.iterdir()) == ["judgements.jsonl"]  # no temp files left behind


def test_server_process_logs_json_and_stops_gracefully_on_sigterm(tmp_path):
    """`preftune serve --port P` as a real process: JSON logs, readiness, SIGTERM ends it with exit code 0."""
    port = free_port()
    env = dict(
        os.environ,
        PREFTUNE_DATABASE_URL=f"sqlite:///{tmp_path / 'feedback.db'}",
        PREFTUNE_ADMIN_TOKEN=ADMIN_TOKEN,
        PREFTUNE_AGREEMENT_REFRESH_SECONDS="0",
    )
    code = (
        "import sys, typer; from preftune.cli import serve_cmd; app = typer.Typer()\n"
        "@app.callback()\ndef root(): pass\n"
        "serve_cmd.register(app); app(sys.argv[1:])"
    )
    stderr = tmp_path / "stderr.log"
    with open(stderr, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, "serve", "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, stderr.read_text()
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.2)
        with urllib.request.urlopen(base + "/?token=secret-should-not-be-logged", timeout=5) as resp:
            assert resp.status == 200 and b"Which answer is better?" in resp.read()
        # An import whose body is still arriving when SIGTERM comes is finished, not cut off.
        body = jsonl(candidates(5, family="benign")).encode()
        head = (
            f"POST /api/admin/tasks/import HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"
            f"Content-Type: application/x-ndjson\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(head + body[:100])
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proc.poll() is None, "the server quit with a request in flight"
            sock.sendall(body[100:])
            response = b""
            while chunk := sock.recv(65536):
                response += chunk
        assert response.startswith(b"HTTP/1.1 200"), response[:300]
        assert json.loads(response.split(b"\r\n\r\n", 1)[1])["imported"] == 5
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [json.loads(line) for line in stderr.read_text().splitlines() if line.strip()]
    assert lines, "the server wrote no logs"
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    access = [line for line in lines if line["logger"] == "preftune.serve.access"]
    assert any(line["path"] == "/" and line["status"] == 200 for line in access)
    assert "secret-should-not-be-logged" not in stderr.read_text()
    assert any(line["msg"] == "feedback service stopped" for line in lines)
    with sqlite3.connect(tmp_path / "feedback.db") as conn:
        assert conn.execute("SELECT count(*) FROM tasks").fetchone() == (5,)


def test_collect_reads_the_export_strictly(client, tmp_path):
    """The export is what `preftune collect --format preftune` reads: strict import keeps every record."""
    from preftune.data.formats import Importer
    from preftune.data.validation import ValidationReport

    import_records(client, candidates(3, family="safety") + candidates(2, family="high_risk", n_candidates=4))
    tokens = add_raters(client, 2)
    judge_all(client, tokens[0])
    task = client.get("/api/tasks/next", headers=bearer(tokens[1])).json()
    n = len(task["candidates"])
    body = {"task_id": task["task_id"], "best": n - 1, "ranking": [n - 1, *range(n - 1)], "unsafe": [0]}
    assert client.post("/api/judgements", json=body, headers=bearer(tokens[1])).status_code == 201
    task = client.get("/api/tasks/next", headers=bearer(tokens[1])).json()
    none_ok = {"task_id": task["task_id"], "all_unacceptable": True}
    assert client.post("/api/judgements", json=none_ok, headers=bearer(tokens[1])).status_code == 201
    data = client.get("/api/admin/export", headers=ADMIN).content

    report = ValidationReport(strict=True)
    importer = Importer(report, max_chars=None)
    assert importer.add_file(str(tmp_path / "judgements.jsonl"), data, "auto") == "preftune"
    assert report.records_kept == 7 and not report.dropped
    got = sorted((j.item_id, j.rater_id, j.best, j.all_unacceptable) for j in importer.judgements)
    exported = sorted(
        (r["item_id"], r["rater_id"], r["best"], r["all_unacceptable"]) for r in map(json.loads, data.splitlines())
    )
    assert got == exported


def test_settings_come_from_the_environment_and_fail_with_one_clear_line(monkeypatch, tmp_path):
    from preftune.errors import ConfigError
    from preftune.serve.settings import load_settings

    monkeypatch.setenv("PREFTUNE_HOME", str(tmp_path))
    monkeypatch.delenv("PREFTUNE_DATABASE_URL", raising=False)
    monkeypatch.delenv("PREFTUNE_ADMIN_TOKEN", raising=False)
    s = load_settings()
    assert (s.ratings_per_task, s.max_body_bytes, s.max_text_chars, s.log_level, s.auto_migrate) == (
        3,
        1_048_576,
        8000,
        "INFO",
        True,
    )
    assert s.resolved_database_url() == f"sqlite:///{tmp_path / 'feedback.db'}" and s.admin_token is None
    monkeypatch.setenv("PREFTUNE_RATINGS_PER_TASK", "5")
    monkeypatch.setenv("PREFTUNE_AUTO_MIGRATE", "false")
    monkeypatch.setenv("PREFTUNE_LOG_LEVEL", "debug")
    monkeypatch.setenv("PREFTUNE_ADMIN_TOKEN", "s3cret")
    s = load_settings()
    assert (s.ratings_per_task, s.auto_migrate, s.log_level) == (5, False, "DEBUG")
    assert s.admin_token.get_secret_value() == "s3cret" and "s3cret" not in repr(s)
    monkeypatch.setenv("PREFTUNE_RATINGS_PER_TASK", "zero")
    with pytest.raises(ConfigError, match="PREFTUNE_RATINGS_PER_TASK"):
        load_settings()
    monkeypatch.setenv("PREFTUNE_RATINGS_PER_TASK", "3")
    monkeypatch.setenv("PREFTUNE_DATABASE_URL", "postgres-with-password-hunter2")
    with pytest.raises(ConfigError, match="PREFTUNE_DATABASE_URL") as err:
        load_settings()
    assert "hunter2" not in str(err.value)


def test_agreement_gauges_refresh_in_the_background(tmp_path):
    from preftune.serve.app import create_app

    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    with TestClient(create_app(make_settings(url, agreement_refresh_seconds=1))) as client:
        import_records(client, candidates(4))
        for token in add_raters(client, 2):
            judge_all(client, token, pick=lambda t: 0)
        deadline = time.monotonic() + 20
        while metric_value(client.get("/metrics").text, "preftune_agreement_pairwise", family="safety") is None:
            assert time.monotonic() < deadline, "the agreement gauges were never refreshed"
            time.sleep(0.2)
        assert metric_value(client.get("/metrics").text, "preftune_agreement_pairwise", family="safety") == 1.0
