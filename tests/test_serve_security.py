# ruff: noqa: F811 - the serve_db/serve_pg_url fixtures are imported by name from support.serve
"""Security of the feedback service: auth, isolation between raters, limits, hostile input."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
from fastapi.testclient import TestClient
from support.serve import ADMIN_TOKEN, candidates, jsonl, make_settings, serve_db, serve_pg_url  # noqa: F401

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

RATER_ENDPOINTS = [
    ("GET", "/api/me"),
    ("GET", "/api/tasks/next"),
    ("GET", "/api/tasks/1"),
    ("POST", "/api/tasks/1/skip"),
    ("POST", "/api/judgements"),
    ("GET", "/api/judgements"),
    ("GET", "/api/judgements/some-id"),
]
ADMIN_ENDPOINTS = [
    ("POST", "/api/admin/raters"),
    ("GET", "/api/admin/raters"),
    ("POST", "/api/admin/raters/alice/disable"),
    ("POST", "/api/admin/tasks/import"),
    ("GET", "/api/admin/export"),
    ("GET", "/api/admin/agreement"),
    ("GET", "/api/admin/stats"),
]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def client(serve_db):
    from preftune.serve.app import create_app

    with TestClient(create_app(make_settings(serve_db.url, max_body_bytes=4096, max_text_chars=200))) as c:
        yield c


def _rater(client, name: str) -> str:
    r = client.post("/api/admin/raters", json={"name": name}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()["token"]


def _call(client, method: str, path: str, headers: dict[str, str] | None = None):
    body = {"task_id": 1, "best": 0} if path == "/api/judgements" else None
    if path == "/api/admin/raters" and method == "POST":
        body = {"name": "mallory"}
    if path.endswith("/import"):
        return client.request(method, path, content=jsonl(candidates(1)), headers=headers or {})
    return client.request(method, path, json=body, headers=headers or {})


@pytest.mark.parametrize("method,path", RATER_ENDPOINTS + ADMIN_ENDPOINTS)
def test_no_token_is_401(client, method, path):
    r = _call(client, method, path)
    assert r.status_code == 401, (path, r.text)
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert "token" in r.json()["detail"]


def test_wrong_tokens_are_401_and_roles_do_not_mix(client, serve_db):
    rater = _rater(client, "alice")
    for method, path in RATER_ENDPOINTS:
        for headers in (
            bearer("ptr_wrong"),
            bearer(ADMIN_TOKEN),
            {"Authorization": f"Basic {rater}"},
            {"Authorization": rater},
        ):
            assert _call(client, method, path, headers).status_code == 401, (path, headers)
    for method, path in ADMIN_ENDPOINTS:
        for headers in (bearer(rater), bearer(ADMIN_TOKEN + "x"), bearer(ADMIN_TOKEN[:-1])):
            assert _call(client, method, path, headers).status_code == 401, (path, headers)
    assert serve_db.query("SELECT count(*) FROM raters") == [(1,)]  # the refused admin calls changed nothing
    assert serve_db.query("SELECT count(*) FROM tasks") == [(0,)]


def test_admin_endpoints_are_closed_without_an_admin_token(serve_db):
    from preftune.serve.app import create_app

    with TestClient(create_app(make_settings(serve_db.url, admin_token=None))) as c:
        r = c.get("/api/admin/stats", headers=ADMIN)
        assert r.status_code == 403 and "PREFTUNE_ADMIN_TOKEN" in r.json()["detail"]


def test_tokens_are_stored_hashed(client, serve_db):
    token = _rater(client, "alice")
    rows = serve_db.query("SELECT name, token_hash FROM raters")
    assert rows == [("alice", hashlib.sha256(token.encode()).hexdigest())]
    state = client.app.state.preftune
    assert state.admin_token_hash == hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()
    assert ADMIN_TOKEN not in repr(vars(state))
    listing = client.get("/api/admin/raters", headers=ADMIN).text
    assert token not in listing and rows[0][1] not in listing


def test_a_rater_cannot_read_or_touch_another_raters_tasks_and_judgements(client):
    client.post("/api/admin/tasks/import", content=jsonl(candidates(3)), headers=ADMIN)
    alice, bob = _rater(client, "alice"), _rater(client, "bob")
    task = client.get("/api/tasks/next", headers=bearer(alice)).json()
    secret_pick = {"task_id": task["task_id"], "judgement_id": "alice-j1", "best": 2, "unsafe": [0]}
    assert client.post("/api/judgements", json=secret_pick, headers=bearer(alice)).status_code == 201

    assert client.get(f"/api/tasks/{task['task_id']}", headers=bearer(bob)).status_code == 404
    assert client.get("/api/judgements/alice-j1", headers=bearer(bob)).status_code == 404
    assert client.get("/api/judgements", headers=bearer(bob)).json()["judgements"] == []
    assert client.post(f"/api/tasks/{task['task_id']}/skip", headers=bearer(bob)).status_code == 404
    forged = client.post("/api/judgements", json={**secret_pick, "best": 0}, headers=bearer(bob))
    assert forged.status_code == 404  # bob was never given this task
    bob_task = client.get("/api/tasks/next", headers=bearer(bob)).json()
    reuse = client.post(
        "/api/judgements",
        json={"task_id": bob_task["task_id"], "judgement_id": "alice-j1", "best": 1},
        headers=bearer(bob),
    )
    assert reuse.status_code == 409 and "best" not in reuse.text and "2" not in reuse.json()["detail"]

    own = client.get("/api/judgements/alice-j1", headers=bearer(alice)).json()
    assert (own["rater_id"], own["best"], own["unsafe"]) == ("alice", 2, [0])
    assert [j["judgement_id"] for j in client.get("/api/judgements", headers=bearer(alice)).json()["judgements"]] == [
        "alice-j1"
    ]
    me = client.get("/api/me", headers=bearer(bob)).json()
    assert me["name"] == "bob" and me["judgements"] == 0


def test_oversized_bodies_are_refused_with_413(client, serve_db):
    token = _rater(client, "alice")
    big = {"task_id": 1, "best": 0, "judgement_id": "x", "pad": "a" * 5000}
    r = client.post("/api/judgements", json=big, headers=bearer(token))
    assert r.status_code == 413 and "PREFTUNE_MAX_BODY_BYTES" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        for _ in range(10):
            yield b"x" * 1000

    r = client.post("/api/admin/tasks/import", content=chunks(), headers=ADMIN)
    assert r.status_code == 413
    assert serve_db.query("SELECT count(*) FROM tasks") == [(0,)]
    long_text = candidates(1, texts=["short", "y" * 201])
    r = client.post("/api/admin/tasks/import", content=jsonl(long_text), headers=ADMIN)
    assert r.status_code == 422 and "PREFTUNE_MAX_TEXT_CHARS" in r.json()["detail"]
    r = client.post("/api/admin/raters", json={"name": "n" * 101}, headers=ADMIN)
    assert r.status_code == 422
    metrics = client.get("/metrics").text
    assert 'preftune_errors_total{status="413"} 2.0' in metrics


def test_malformed_requests_get_clear_4xx(client):
    token = _rater(client, "alice")
    h = {**bearer(token), "content-type": "application/json"}
    r = client.post("/api/judgements", content=b'{"task_id": 1, "best": ', headers=h)
    assert r.status_code == 400 and r.json()["detail"].startswith("malformed JSON body")
    r = client.post("/api/judgements", content=b"[1, 2]", headers=h)
    assert r.status_code == 422
    r = client.post("/api/judgements", json={"task_id": "one", "best": 0}, headers=bearer(token))
    assert r.status_code == 422 and r.json()["detail"].startswith("task_id:")
    r = client.post("/api/judgements", json={"task_id": 1, "best": -1}, headers=bearer(token))
    assert r.status_code == 422
    r = client.post("/api/judgements", json={"task_id": 1, "best": 0, "judgement_id": "bad id!"}, headers=bearer(token))
    assert r.status_code == 422 and "judgement_id" in r.json()["detail"]
    r = client.post("/api/admin/tasks/import", content=b"\xff\xfe\x00", headers=ADMIN)
    assert r.status_code == 400 and "UTF-8" in r.json()["detail"]
    r = client.post("/api/admin/tasks/import", content=b"[]\n", headers=ADMIN)
    assert r.status_code == 422 and "body:1" in r.json()["detail"]
    r = client.post("/api/admin/tasks/import", content=b"\n\n", headers=ADMIN)
    assert r.status_code == 422 and "empty" in r.json()["detail"]
    r = client.get("/api/tasks/not-a-number", headers=bearer(token))
    assert r.status_code == 422
    assert client.get("/api/nothing-here").status_code == 404
    r = client.post("/api/admin/raters", json={"name": "x'; DROP TABLE raters; --"}, headers=ADMIN)
    assert r.status_code == 422


def test_sql_looking_strings_are_stored_and_returned_verbatim(client, serve_db):
    nasty_prompt = "'; DROP TABLE judgements; --"
    nasty = ["Robert'); DROP TABLE raters;--", '" OR 1=1 --', "\\x00 %s %(x)s :param $1 ?"]
    nasty_family = "safety' OR '1'='1"
    recs = candidates(1, family=nasty_family, texts=nasty, prompt=nasty_prompt)
    recs[0]["tags"] = ["'; DELETE FROM tasks; --"]
    assert client.post("/api/admin/tasks/import", content=jsonl(recs), headers=ADMIN).status_code == 200
    client.post("/api/admin/tasks/import", content=jsonl(candidates(1, family="benign")), headers=ADMIN)
    token = _rater(client, "alice")
    task = client.get("/api/tasks/next", headers=bearer(token)).json()
    assert task["prompt"] == nasty_prompt and sorted(c["text"] for c in task["candidates"]) == sorted(nasty)
    client.post("/api/judgements", json={"task_id": task["task_id"], "best": 0}, headers=bearer(token))

    assert serve_db.query("SELECT prompt, family FROM tasks WHERE id = 1") == [(nasty_prompt, nasty_family)]
    assert serve_db.query("SELECT count(*) FROM judgements") == [(1,)]
    exported = client.get("/api/admin/export", params={"family": nasty_family}, headers=ADMIN).text.splitlines()
    rec = json.loads(exported[0])
    assert (rec["prompt"], rec["family"], [c["text"] for c in rec["candidates"]], rec["tags"]) == (
        nasty_prompt,
        nasty_family,
        nasty,
        ["'; DELETE FROM tasks; --"],
    )
    injected = client.get("/api/admin/export", params={"family": "x' OR '1'='1"}, headers=ADMIN).text
    assert injected == ""
    assert serve_db.query("SELECT count(*) FROM tasks") == [(2,)]


def test_responses_carry_security_headers_and_logs_carry_no_tokens(client, caplog):
    token = _rater(client, "alice")
    with caplog.at_level(logging.INFO, logger="preftune"):
        page = client.get(f"/?token={token}")
        api = client.get("/api/me", headers=bearer(token))
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.headers["referrer-policy"] == "no-referrer"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert api.headers["cache-control"] == "no-store"
    logged = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    assert "/api/me" in logged and token not in logged and ADMIN_TOKEN not in logged


def test_internal_errors_answer_500_without_internals(serve_db, monkeypatch):
    from preftune.serve import service
    from preftune.serve.app import create_app

    def broken(*_a, **_k):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(service, "stats", broken)
    app = create_app(make_settings(serve_db.url))
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/api/admin/stats", headers=ADMIN)
        assert r.status_code == 500 and "secret internal detail" not in r.text
        assert r.json()["detail"].startswith("internal error")
        assert 'preftune_errors_total{status="500"} 1.0' in c.get("/metrics").text


def test_a_disabled_rater_is_locked_out_and_their_open_task_freed(serve_db):
    from preftune.serve.app import create_app

    with TestClient(create_app(make_settings(serve_db.url, ratings_per_task=1))) as client:
        client.post("/api/admin/tasks/import", content=jsonl(candidates(1)), headers=ADMIN)
        alice, bob = _rater(client, "alice"), _rater(client, "bob")
        task_id = client.get("/api/tasks/next", headers=bearer(alice)).json()["task_id"]
        assert client.get("/api/tasks/next", headers=bearer(bob)).status_code == 204
        assert client.post("/api/admin/raters/alice/disable", headers=ADMIN).json() == {
            "name": "alice",
            "disabled": True,
        }
        assert client.get("/api/me", headers=bearer(alice)).status_code == 401
        assert client.get("/api/tasks/next", headers=bearer(bob)).json()["task_id"] == task_id
        assert client.post("/api/admin/raters/nobody/disable", headers=ADMIN).status_code == 404
        listed = client.get("/api/admin/raters", headers=ADMIN).json()["raters"]
        assert [(r["name"], r["disabled"]) for r in listed] == [("alice", True), ("bob", False)]
