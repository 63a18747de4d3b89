"""Database round trips of one rater's next+submit cycle, counted with SQLAlchemy events.

    python benchmarks/serve_profile.py [--database-url URL] [--cycles 50]

Runs the service in-process (FastAPI's TestClient, no network) on a fresh PostgreSQL
database on 127.0.0.1:5432 (or ``--database-url``, e.g. a SQLite file), imports tasks, and
has one rater judge ``--cycles`` tasks. Every statement the service's engine sends
(``before_cursor_execute``) and every commit (``commit``) is counted per cycle:

- ``separate``: ``GET /api/tasks/next`` then ``POST /api/judgements`` (two requests);
- ``combined``: ``POST /api/judgements?next=true``, which stores the judgement and hands out
  the next task in one transaction (skipped when the service has no such option).

Prints one JSON object with the mean and maximum statements and commits per cycle and the
statements of one cycle, so a change in the query plan shows up as text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid

RATINGS = 3


def _fresh_pg() -> tuple[str, object]:
    """A fresh PostgreSQL database and its drop function (the load benchmark's, on the test server)."""
    from serve_load import _fresh_database  # beside this script

    return _fresh_database(
        os.environ.get("PREFTUNE_TEST_PG_HOST", "127.0.0.1"),
        int(os.environ.get("PREFTUNE_TEST_PG_PORT", "5432")),
        os.environ.get("PREFTUNE_TEST_PG_USER", "postgres"),
    )


class Counter:
    def __init__(self, engine) -> None:  # noqa: ANN001
        from sqlalchemy import event

        self.statements: list[str] = []
        self.commits = 0
        event.listen(engine, "before_cursor_execute", self._stmt)
        event.listen(engine, "commit", self._commit)

    def _stmt(self, _conn, _cursor, statement, _params, _context, _executemany) -> None:  # noqa: ANN001
        self.statements.append(" ".join(statement.split()))

    def _commit(self, _conn) -> None:  # noqa: ANN001
        self.commits += 1

    def take(self) -> tuple[list[str], int]:
        out = (self.statements, self.commits)
        self.statements, self.commits = [], 0
        return out


def _records(n: int) -> str:
    lines = []
    for i in range(n):
        rec = {
            "format": "preftune.candidates",
            "version": 1,
            "item_id": f"prof-{i}",
            "prompt_id": f"prof-p{i}",
            "family": "tone",
            "tags": ["profile"],
            "prompt": f"Profile prompt {i}?",
            "candidates": [{"id": f"c{k}", "text": f"answer {k} to {i}"} for k in range(3)],
        }
        lines.append(json.dumps(rec))
    return "\n".join(lines) + "\n"


def profile(database_url: str, cycles: int) -> dict:
    from fastapi.testclient import TestClient

    from preftune.serve.app import create_app
    from preftune.serve.settings import ServeSettings

    admin = "profile-admin-" + uuid.uuid4().hex
    settings = ServeSettings(
        database_url=database_url,
        admin_token=admin,
        ratings_per_task=RATINGS,
        agreement_refresh_seconds=0,
        log_level="WARNING",
    )
    app = create_app(settings)
    out: dict = {"benchmark": "serve_profile", "database": database_url.split(":", 1)[0], "cycles": cycles}
    with TestClient(app) as client:
        adm = {"Authorization": f"Bearer {admin}"}
        client.post("/api/admin/tasks/import", content=_records(4 * cycles + 10), headers=adm).raise_for_status()
        tokens = []
        for name in ("prof-a", "prof-b"):
            r = client.post("/api/admin/raters", json={"name": name}, headers=adm)
            r.raise_for_status()
            tokens.append({"Authorization": f"Bearer {r.json()['token']}"})
        counter = Counter(app.state.preftune.engine)

        def run(kind: str, auth: dict) -> dict:
            per_cycle: list[tuple[int, int]] = []
            sample: list[str] = []
            task = None
            if kind == "combined":
                task = client.get("/api/tasks/next", headers=auth).json()
                counter.take()
            for i in range(cycles):
                if kind == "separate":
                    task = client.get("/api/tasks/next", headers=auth).json()
                    r = client.post("/api/judgements", json={"task_id": task["task_id"], "best": 0}, headers=auth)
                    assert r.status_code == 201, r.text
                else:
                    r = client.post(
                        "/api/judgements?next=true", json={"task_id": task["task_id"], "best": 0}, headers=auth
                    )
                    assert r.status_code == 201, r.text
                    body = r.json()
                    if "next_task" not in body:
                        return {"supported": False}
                    task = body["next_task"]
                statements, commits = counter.take()
                per_cycle.append((len(statements), commits))
                if i == cycles // 2:
                    sample = statements
            queries = [q for q, _ in per_cycle]
            commit_counts = [c for _, c in per_cycle]
            return {
                "queries_per_cycle_mean": round(sum(queries) / len(queries), 2),
                "queries_per_cycle_max": max(queries),
                "commits_per_cycle_mean": round(sum(commit_counts) / len(commit_counts), 2),
                "commits_per_cycle_max": max(commit_counts),
                "statements_of_one_cycle": sample,
            }

        out["separate"] = run("separate", tokens[0])
        out["combined"] = run("combined", tokens[1])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--database-url", default="")
    p.add_argument("--cycles", type=int, default=50)
    args = p.parse_args(argv)
    drop = None
    url = args.database_url
    if not url:
        url, drop = _fresh_pg()
    try:
        result = profile(url, args.cycles)
    finally:
        if drop is not None:
            drop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
