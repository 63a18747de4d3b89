"""Two service processes on one PostgreSQL database, raters sent to either at random.

What an HPA-scaled deployment does: every replica hands out tasks from the same tables. The
checks: no task over its quota, no task twice to one rater, every acknowledged judgement
stored exactly once (and nothing stored that was not acknowledged).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
from support.postgres import fresh_postgres_db
from support.serve import ADMIN_TOKEN, candidates, free_port, jsonl

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

RATINGS = 2
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _start(url: str, port: int, log) -> subprocess.Popen:  # noqa: ANN001
    env = dict(
        os.environ,
        PREFTUNE_DATABASE_URL=url,
        PREFTUNE_ADMIN_TOKEN=ADMIN_TOKEN,
        PREFTUNE_RATINGS_PER_TASK=str(RATINGS),
        PREFTUNE_LOG_LEVEL="WARNING",
        PREFTUNE_AGREEMENT_REFRESH_SECONDS="0",
        PREFTUNE_DB_POOL_SIZE="4",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "preftune.serve", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )


def _ready(base: str, proc: subprocess.Popen, log_path) -> None:  # noqa: ANN001
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()[-2000:]
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{base} not ready: {log_path.read_text()[-2000:]}")


def test_two_replicas_never_double_assign_or_lose_a_judgement(tmp_path):
    url, drop = fresh_postgres_db("preftune_replicas")
    procs: list[subprocess.Popen] = []
    try:
        bases = []
        for i in range(2):
            port = free_port()
            log_path = tmp_path / f"replica{i}.log"
            procs.append(_start(url, port, open(log_path, "w")))  # noqa: SIM115 - closed with the process
            bases.append((f"http://127.0.0.1:{port}", log_path))
        for proc, (base, log_path) in zip(procs, bases, strict=True):
            _ready(base, proc, log_path)
        urls = [b for b, _ in bases]
        n_tasks, n_raters = 24, 8
        r = httpx.post(urls[0] + "/api/admin/tasks/import", content=jsonl(candidates(n_tasks)), headers=ADMIN)
        assert r.status_code == 200, r.text
        tokens = {}
        for i in range(n_raters):
            r = httpx.post(urls[i % 2] + "/api/admin/raters", json={"name": f"rep{i}"}, headers=ADMIN)
            tokens[f"rep{i}"] = r.json()["token"]

        acked: dict[str, tuple[int, str]] = {}
        seen: dict[str, list[int]] = {name: [] for name in tokens}
        errors: list[str] = []
        lock = threading.Lock()
        barrier = threading.Barrier(n_raters)

        def rater(name: str, token: str, seed: int) -> None:
            rng = random.Random(seed)
            headers = {"Authorization": f"Bearer {token}"}
            clients = [httpx.Client(base_url=u, timeout=30) for u in urls]
            try:
                barrier.wait()
                task = None
                for _ in range(200):
                    c = rng.choice(clients)  # any replica, every request
                    if task is None:
                        r = c.get("/api/tasks/next", headers=headers)
                        if r.status_code == 204:
                            return
                        if r.status_code != 200:
                            errors.append(f"next {r.status_code} {r.text}")
                            continue
                        task = r.json()
                        with lock:
                            if not seen[name] or seen[name][-1] != task["task_id"]:
                                seen[name].append(task["task_id"])
                    body = {"task_id": task["task_id"], "judgement_id": str(uuid.uuid4()), "best": 0}
                    combined = rng.random() < 0.5
                    for _attempt in range(5):
                        r = rng.choice(clients).post(
                            "/api/judgements" + ("?next=true" if combined else ""), json=body, headers=headers
                        )
                        if r.status_code < 500:
                            break
                    if r.status_code not in (200, 201):
                        errors.append(f"submit {r.status_code} {r.text}")
                        task = None
                        continue
                    with lock:
                        acked[body["judgement_id"]] = (task["task_id"], name)
                    if rng.random() < 0.2:  # a retried send, to the other replica perhaps: stored once
                        again = rng.choice(clients).post("/api/judgements", json=body, headers=headers)
                        if again.status_code != 200:
                            errors.append(f"resubmit {again.status_code} {again.text}")
                    task = r.json().get("next_task") if combined else None
                    if combined and task is not None:
                        with lock:
                            seen[name].append(task["task_id"])
                    if combined and task is None:
                        return
            finally:
                for c in clients:
                    c.close()

        threads = [threading.Thread(target=rater, args=(name, tok, i)) for i, (name, tok) in enumerate(tokens.items())]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        assert errors == []

        from sqlalchemy import create_engine, text

        engine = create_engine(url)
        with engine.connect() as conn:
            stored = {
                uid: (task_id, name)
                for uid, task_id, name in conn.execute(
                    text("SELECT j.uid, j.task_id, r.name FROM judgements j JOIN raters r ON r.id = j.rater_id")
                )
            }
            over = conn.execute(
                text(f"SELECT count(*) FROM (SELECT task_id FROM judgements GROUP BY 1 HAVING count(*) > {RATINGS}) o")
            ).scalar()
            twice = conn.execute(
                text(
                    "SELECT count(*) FROM (SELECT task_id, rater_id FROM assignments "
                    "GROUP BY 1, 2 HAVING count(*) > 1) d"
                )
            ).scalar()
            counters = conn.execute(
                text(
                    "SELECT count(*) FROM tasks t WHERE t.n_done <> (SELECT count(*) FROM judgements j "
                    "WHERE j.task_id = t.id) OR t.n_taken <> (SELECT count(*) FROM assignments a "
                    "WHERE a.task_id = t.id AND a.status IN ('open', 'done'))"
                )
            ).scalar()
        engine.dispose()
        assert stored == acked  # every acknowledged judgement once, nothing else
        assert len(stored) == n_tasks * RATINGS  # all the work got done, across both replicas
        assert over == 0 and twice == 0 and counters == 0
        for name, tasks in seen.items():
            assert len(tasks) == len(set(tasks)), f"{name} was handed a task twice: {tasks}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        drop()
