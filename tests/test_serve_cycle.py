# ruff: noqa: F811 - the serve_db/serve_pg_url fixtures are imported by name from support.serve
"""The next+submit cycle: statements and commits per cycle, counters, undo, lapsed leases.

Counts, not speed: every statement the service's engine sends and every commit is counted
with SQLAlchemy events while one rater works through tasks.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event
from support.serve import ADMIN_TOKEN, candidates, jsonl, make_settings, serve_db, serve_pg_url  # noqa: F401

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Count:
    def __init__(self, engine) -> None:  # noqa: ANN001
        self.statements: list[str] = []
        self.seen: list[str] = []  # every statement, never cleared
        self.commits = 0
        event.listen(engine, "before_cursor_execute", lambda *a: (self.statements.append(a[2]), self.seen.append(a[2])))
        event.listen(engine, "commit", self._commit)

    def _commit(self, _conn) -> None:  # noqa: ANN001
        self.commits += 1

    def take(self) -> tuple[int, int]:
        out = (len(self.statements), self.commits)
        self.statements, self.commits = [], 0
        return out


def _setup(client, n_tasks: int, raters: list[str]) -> list[str]:
    r = client.post("/api/admin/tasks/import", content=jsonl(candidates(n_tasks)), headers=ADMIN)
    assert r.status_code == 200, r.text
    tokens = []
    for name in raters:
        r = client.post("/api/admin/raters", json={"name": name}, headers=ADMIN)
        assert r.status_code == 201, r.text
        tokens.append(r.json()["token"])
    return tokens


def counters_agree(serve_db) -> None:
    """Every task's counters equal what its assignments and judgements say."""
    bad = serve_db.query(
        "SELECT t.id, t.n_done, t.n_taken, "
        "(SELECT count(*) FROM judgements j WHERE j.task_id = t.id), "
        "(SELECT count(*) FROM assignments a WHERE a.task_id = t.id AND a.status IN ('open', 'done')) "
        "FROM tasks t"
    )
    assert [row for row in bad if row[1] != row[3] or row[2] != row[4]] == [], bad


def test_a_cycle_is_few_statements_and_one_commit(serve_db):
    """PostgreSQL: store + next in 3 statements and 1 commit (at most 4 and 1); SQLite: 1 commit."""
    from preftune.serve.app import create_app

    app = create_app(make_settings(serve_db.url))
    with TestClient(app) as client:
        (token,) = _setup(client, 12, ["counted"])
        count = Count(app.state.preftune.engine)
        task = client.get("/api/tasks/next", headers=bearer(token)).json()
        count.take()
        combined = []
        for _ in range(5):
            r = client.post(
                "/api/judgements?next=true", json={"task_id": task["task_id"], "best": 0}, headers=bearer(token)
            )
            assert r.status_code == 201, r.text
            task = r.json()["next_task"]
            assert task is not None
            combined.append(count.take())
        separate = []
        for _ in range(5):
            task = client.get("/api/tasks/next", headers=bearer(token)).json()
            r = client.post("/api/judgements", json={"task_id": task["task_id"], "best": 1}, headers=bearer(token))
            assert r.status_code == 201, r.text
            separate.append(count.take())
    if serve_db.kind == "postgresql":
        assert set(combined) == {(3, 1)}, combined  # auth, store, reserve
        assert set(separate) == {(4, 2)}, separate  # (auth, reserve) + (auth, store)
        # the hot path runs the statements prepared when the connection was opened (preftune.serve.pgsql)
        assert all(q.startswith("EXECUTE preftune_") for q in count.seen), count.seen
    else:
        # in-process statements, BEGIN IMMEDIATE included; still one commit per cycle
        assert all(q <= 10 and c == 1 for q, c in combined), combined
        assert all(c == 2 for _, c in separate), separate
    counters_agree(serve_db)


def test_statements_prepared_or_plain_are_the_same_statements():
    from preftune.serve.pgsql import PgStatement

    stmt = PgStatement("t", "SELECT CAST(:b AS json), x::text FROM y WHERE a = :a OR c > :a", {"a": "int", "b": "text"})
    assert stmt.plain == "SELECT CAST(%(b)s AS json), x::text FROM y WHERE a = %(a)s OR c > %(a)s"
    assert stmt.prepare == "PREPARE t (int, text) AS SELECT CAST($2 AS json), x::text FROM y WHERE a = $1 OR c > $1"
    assert stmt.execute == "EXECUTE t (%(a)s, %(b)s)"
    with pytest.raises(ValueError, match="parameters"):
        PgStatement("u", "SELECT :a, :c", {"a": "integer"})


def test_a_connection_without_prepared_statements_runs_the_plain_ones(serve_db):
    """A connection opened before the schema existed cannot prepare: the same cycle, sent as plain SQL."""
    if serve_db.kind != "postgresql":
        pytest.skip("prepared statements are PostgreSQL's")
    from preftune.serve import pgsql
    from preftune.serve.app import create_app

    app = create_app(make_settings(serve_db.url))
    with TestClient(app) as client:
        tokens = _setup(client, 6, ["plain-a", "plain-b"])
        engine = app.state.preftune.engine
        event.remove(engine, "connect", pgsql.prepare_on_connect)
        engine.dispose()
        count = Count(engine)
        for token in tokens:
            task = client.get("/api/tasks/next", headers=bearer(token)).json()
            for _ in range(2):
                r = client.post(
                    "/api/judgements?next=true", json={"task_id": task["task_id"], "best": 0}, headers=bearer(token)
                )
                assert r.status_code == 201, r.text
                task = r.json()["next_task"]
        assert count.seen and not any(q.startswith("EXECUTE") for q in count.seen), count.seen
    assert serve_db.query("SELECT count(*) FROM judgements") == [(4,)]
    counters_agree(serve_db)


def test_submit_with_next_is_idempotent_and_hands_out_each_task_once(serve_db):
    from preftune.serve.app import create_app

    with TestClient(create_app(make_settings(serve_db.url, ratings_per_task=2))) as client:
        a, b = _setup(client, 3, ["a", "b"])
        task = client.get("/api/tasks/next", headers=bearer(a)).json()
        body = {"task_id": task["task_id"], "judgement_id": "j-1", "best": 0}
        first = client.post("/api/judgements?next=true", json=body, headers=bearer(a))
        assert first.status_code == 201
        again = client.post("/api/judgements?next=true", json=body, headers=bearer(a))  # a lost answer, retried
        assert again.status_code == 200 and again.json()["judgement_id"] == "j-1"
        assert again.json()["next_task"]["task_id"] == first.json()["next_task"]["task_id"]  # the same reservation
        seen_a = [task["task_id"]]
        nxt = first.json()["next_task"]
        while nxt is not None:
            seen_a.append(nxt["task_id"])
            r = client.post("/api/judgements?next=true", json={"task_id": nxt["task_id"], "best": 1}, headers=bearer(a))
            assert r.status_code == 201, r.text
            nxt = r.json()["next_task"]
        assert sorted(seen_a) == [1, 2, 3]
        bad = client.post("/api/judgements?next=true", json={"task_id": 1, "best": 7}, headers=bearer(b))
        assert bad.status_code == 404  # b was never given task 1
        t = client.get("/api/tasks/next", headers=bearer(b)).json()
        bad = client.post("/api/judgements?next=true", json={"task_id": t["task_id"], "best": 7}, headers=bearer(b))
        assert bad.status_code == 422  # out of range: nothing stored, the reservation kept
        assert client.get("/api/tasks/next", headers=bearer(b)).json()["task_id"] == t["task_id"]
    assert serve_db.query("SELECT count(*) FROM judgements") == [(3,)]
    counters_agree(serve_db)


def test_undo_takes_back_the_last_judgement_within_the_window(serve_db):
    from preftune.serve.app import create_app

    with TestClient(create_app(make_settings(serve_db.url, undo_seconds=30))) as client:
        (token,) = _setup(client, 4, ["undoer"])
        me = client.get("/api/me", headers=bearer(token)).json()
        assert (me["judgements"], me["remaining"], me["undo_seconds"]) == (0, 4, 30)
        t1 = client.get("/api/tasks/next", headers=bearer(token)).json()
        r1 = client.post(
            "/api/judgements", json={"task_id": t1["task_id"], "judgement_id": "u-1", "best": 0}, headers=bearer(token)
        )
        r2 = client.post(
            "/api/judgements?next=true",
            json={
                "task_id": client.get("/api/tasks/next", headers=bearer(token)).json()["task_id"],
                "best": 2,
                "judgement_id": "u-2",
            },
            headers=bearer(token),
        )
        assert r1.status_code == r2.status_code == 201
        t2, t3 = r2.json()["task_id"], r2.json()["next_task"]["task_id"]
        assert client.post("/api/judgements/u-1/undo", headers=bearer(token)).status_code == 409  # not the last
        assert client.post("/api/judgements/nope/undo", headers=bearer(token)).status_code == 404
        undone = client.post("/api/judgements/u-2/undo", headers=bearer(token))
        assert undone.status_code == 200, undone.text
        assert undone.json()["task"]["task_id"] == t2
        # the task is the rater's open task again; the one reserved after it went back unseen
        assert client.get("/api/tasks/next", headers=bearer(token)).json()["task_id"] == t2
        assert serve_db.query("SELECT uid FROM judgements") == [("u-1",)]
        assert serve_db.query("SELECT count(*) FROM assignments WHERE task_id = :t", t=t3) == [(0,)]
        counters_agree(serve_db)
        me = client.get("/api/me", headers=bearer(token)).json()
        assert (me["judgements"], me["remaining"]) == (1, 3)
        # judged again (another answer is fine now), and the first judgement is no longer the last
        r = client.post(
            "/api/judgements", json={"task_id": t2, "best": 1, "judgement_id": "u-3"}, headers=bearer(token)
        )
        assert r.status_code == 201
        assert client.post("/api/judgements/u-2/undo", headers=bearer(token)).status_code == 404
    assert serve_db.query("SELECT uid, best FROM judgements ORDER BY id") == [("u-1", 0), ("u-3", 1)]
    counters_agree(serve_db)


def test_undo_after_the_window_keeps_the_judgement(serve_db):
    from sqlalchemy import text

    from preftune.serve.app import create_app

    with TestClient(create_app(make_settings(serve_db.url, undo_seconds=5))) as client:
        (token,) = _setup(client, 2, ["late"])
        t = client.get("/api/tasks/next", headers=bearer(token)).json()
        body = {"task_id": t["task_id"], "judgement_id": "late-1", "best": 0}
        assert client.post("/api/judgements", json=body, headers=bearer(token)).status_code == 201
        engine = serve_db.engine()
        with engine.begin() as conn:
            conn.execute(text("UPDATE judgements SET created_at = :t"), {"t": "2000-01-01 00:00:00"})
        engine.dispose()
        r = client.post("/api/judgements/late-1/undo", headers=bearer(token))
        assert r.status_code == 409 and "undo window" in r.json()["detail"]
    with TestClient(create_app(make_settings(serve_db.url, undo_seconds=0))) as client:
        token = client.post("/api/admin/raters", json={"name": "nounder"}, headers=ADMIN).json()["token"]
        assert client.post("/api/judgements/late-1/undo", headers=bearer(token)).status_code == 409
    assert serve_db.query("SELECT uid FROM judgements") == [("late-1",)]


def test_lapsed_leases_are_released_and_counters_stay_true(serve_db):
    from sqlalchemy import text

    from preftune.serve import db, service

    engine = db.make_engine(serve_db.url)
    sessions = db.make_sessionmaker(engine)
    with sessions() as s:
        service.import_tasks(
            s, service.parse_candidates_jsonl(jsonl(candidates(3)).splitlines(), source="t", max_text_chars=100)
        )
        raters = [service.create_rater(s, f"r{i}")[0] for i in range(4)]
    with sessions() as s:
        got = [service.next_task(s, r, ratings_per_task=1, ttl_seconds=600) for r in raters]
    assert [a.task_id if a else None for a in got] == [1, 2, 3, None]
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE assignments SET expires_at = :t WHERE rater_id = :r"),
            {"t": "2000-01-01 00:00:00", "r": raters[0].id},
        )
    with sessions() as s:
        assert service.release_expired(s) == 1
        assert service.release_expired(s) == 0
    counters_agree(serve_db)
    with sessions() as s:
        a = service.next_task(s, raters[3], ratings_per_task=1, ttl_seconds=600)
        assert a is not None and a.task_id == got[0].task_id
        service.skip_task(s, raters[1], got[1].task_id)
        service.disable_rater(s, raters[2].name)
    counters_agree(serve_db)
    assert serve_db.query("SELECT status FROM assignments ORDER BY id") == [
        ("expired",),
        ("skipped",),
        ("expired",),
        ("open",),
    ]
    engine.dispose()


def test_one_open_task_per_rater_is_a_constraint(serve_db):
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    from preftune.serve import db, service

    engine = db.make_engine(serve_db.url)
    sessions = db.make_sessionmaker(engine)
    with sessions() as s:
        service.import_tasks(
            s, service.parse_candidates_jsonl(jsonl(candidates(2)).splitlines(), source="t", max_text_chars=100)
        )
        rater = service.create_rater(s, "double")[0]
        first = service.next_task(s, rater, ratings_per_task=3, ttl_seconds=600)
        other = 2 if first.task_id == 1 else 1
    with pytest.raises(IntegrityError):
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO assignments (task_id, rater_id, status, assigned_at, expires_at) "
                    "VALUES (:t, :r, 'open', '2030-01-01', '2030-01-01')"
                ),
                {"t": other, "r": rater.id},
            )
    engine.dispose()
