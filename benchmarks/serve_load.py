"""Load benchmark of the feedback service: concurrent raters against a PostgreSQL-backed server.

    python benchmarks/serve_load.py [--raters 50] [--seconds 30] [--database-url URL]
    python benchmarks/serve_load.py --mode open --raters 500 --think 2 --seconds 30
    python benchmarks/serve_load.py --mode open --raters 500 --rates 100,200,300 --seconds 45

Modes: ``closed`` (each rater sends its next request as soon as the last one is answered)
and ``open`` (each rater thinks for an exponential time of mean ``--think`` seconds between
tasks, so requests arrive at about raters/think per second; with ``--rates`` the run is
split into steps, each with Poisson task arrivals at that rate taken by whichever rater is
free, the wait for a free rater counted in the latency; the highest rate whose p95 stays
under ``--slo-ms`` with at least 95 % of the arrivals judged in the step is reported as the
highest sustainable rate). ``--cycle combined`` posts each judgement with
``?next=true`` (the rater page's flow: one request per task); ``separate`` asks for the
next task and posts the judgement in two requests. ``--workers`` runs that many uvicorn
worker processes.

Starts ``python -m preftune.serve`` as a separate process on 127.0.0.1 (a fresh PostgreSQL
database on 127.0.0.1:5432 unless ``--database-url`` is given), imports tasks and raters
through the admin API, then runs N simulated raters (asyncio, one keep-alive connection each:
``serve_client.py``) in a bounded loop:
next task -> judgement (best pick, sometimes a full ranking, all-unacceptable or a skip),
and sometimes posts the same judgement again to check idempotency. A send that fails on
the network is retried with the same judgement id until acknowledged.

Afterwards it checks the database holds exactly the acknowledged judgements (none lost,
none doubled, no task over its quota, the export agrees) and stops the server with
SIGTERM (graceful: exit code 0 expected). Prints one JSON object; exit code 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from serve_client import Connection, NetworkError, event_loop_runner  # beside this script
from serve_cpu import CpuMeter

ADMIN_TOKEN = "bench-admin-" + uuid.uuid4().hex
RATINGS_PER_TASK = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fresh_database(host: str, port: int, user: str) -> tuple[str, callable]:
    import psycopg2

    name = f"preftune_bench_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(host=host, port=port, user=user, dbname="postgres", connect_timeout=5)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()

    def drop() -> None:
        c = psycopg2.connect(host=host, port=port, user=user, dbname="postgres", connect_timeout=5)
        c.autocommit = True
        with c.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        c.close()

    return f"postgresql+psycopg2://{user}@{host}:{port}/{name}", drop


def _task_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    families = ["safety", "tone", "high_risk", "benign"]
    out = []
    for i in range(n):
        k = rng.choice([2, 3, 4])
        fam = families[i % len(families)]
        out.append(
            {
                "format": "preftune.candidates",
                "version": 1,
                "item_id": f"bench-{i}",
                "prompt_id": f"bench-p{i}",
                "family": fam,
                "tags": ["bench"],
                "prompt": f"Benchmark prompt {i} about {fam}: " + "lorem ipsum " * rng.randint(5, 40),
                "candidates": [
                    {"id": f"c{j}", "text": f"answer {j} " + "dolor sit amet " * rng.randint(5, 60)} for j in range(k)
                ],
                "policy": "demo:policy",
                "created_at": "2025-01-01T00:00:00Z",
            }
        )
    return out


def _start_server(
    database_url: str, port: int, log_path: Path, workers: int = 1, pythonpath: str = "", pool_size: int = 20
) -> subprocess.Popen:
    env = dict(
        os.environ,
        PREFTUNE_DATABASE_URL=database_url,
        PREFTUNE_ADMIN_TOKEN=ADMIN_TOKEN,
        PREFTUNE_RATINGS_PER_TASK=str(RATINGS_PER_TASK),
        PREFTUNE_LOG_LEVEL="WARNING",
        PREFTUNE_AUTO_MIGRATE="true",
        PREFTUNE_AGREEMENT_REFRESH_SECONDS="0",
        PREFTUNE_DB_POOL_SIZE=str(pool_size),
        PREFTUNE_WORKERS=str(workers),
    )
    if pythonpath:  # e.g. an older checkout of preftune, for before/after figures
        env["PYTHONPATH"] = pythonpath
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "preftune.serve", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready after 60 s: {log_path.read_text()[-2000:]}")


class Stats:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = {"next": [], "submit": [], "resubmit": [], "skip": []}
        self.cycles: list[tuple[float, float]] = []  # (start, seconds) of each task: request(s) until judged
        self.arrivals: list[float] = []  # open loop with --rates: when each task arrived
        self.unserved = 0
        self.acked: dict[str, tuple[int, str]] = {}  # judgement id -> (task id, rater)
        self.errors: dict[str, int] = {}
        self.retries = 0
        self.idempotent_ok = 0
        self.idempotent_bad = 0
        self.skips = 0
        self.exhausted_raters = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def _timed(stats: Stats, kind: str, coro):
    t0 = time.perf_counter()
    resp = await coro
    stats.latency[kind].append(time.perf_counter() - t0)
    return resp


async def _rater(
    client: Connection,
    name: str,
    token: str,
    deadline: float,
    stats: Stats,
    seed: int,
    max_iter: int,
    think: float = 0.0,
    combined: bool = False,
    tickets: asyncio.Queue | None = None,
):
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {token}"}
    task = None
    if think > 0 and tickets is None:  # raters start spread out, as they would arrive
        await asyncio.sleep(rng.uniform(0, think))
    for _ in range(max_iter):  # bounded loop
        cycle_start = time.monotonic()
        if tickets is not None:  # open loop at a set arrival rate: wait for the next arrival
            arrival = await tickets.get()
            if arrival is None:
                return
            if time.monotonic() > deadline + 5:  # the backlog left when the run ended is not served
                stats.unserved += 1
                continue
            cycle_start = arrival  # the time waiting for a free rater counts
        elif cycle_start >= deadline:
            return
        if task is None:
            try:
                r = await _timed(stats, "next", client.get("/api/tasks/next", headers=headers))
            except NetworkError as err:
                stats.error(f"next:{type(err).__name__}")
                continue
            if r.status_code == 204:
                stats.exhausted_raters += 1
                return
            if r.status_code != 200:
                stats.error(f"next:{r.status_code}")
                continue
            task = r.json()
        n = len(task["candidates"])
        roll = rng.random()
        if roll < 0.05:
            try:
                r = await _timed(stats, "skip", client.post(f"/api/tasks/{task['task_id']}/skip", headers=headers))
            except NetworkError as err:  # the next request gets the same open task again
                stats.error(f"skip:{type(err).__name__}")
                continue
            stats.skips += 1
            if r.status_code != 200:
                stats.error(f"skip:{r.status_code}")
            task = None
            continue
        body: dict = {"task_id": task["task_id"], "judgement_id": str(uuid.uuid4()), "unsafe": []}
        if roll < 0.12:
            body["all_unacceptable"] = True
        elif roll < 0.40:
            ranking = [c["index"] for c in task["candidates"]]
            rng.shuffle(ranking)
            body["ranking"], body["best"] = ranking, ranking[0]
        else:
            body["best"] = rng.randrange(n)
        if rng.random() < 0.05:
            body["unsafe"] = [rng.randrange(n)]
        path = "/api/judgements?next=true" if combined else "/api/judgements"
        next_task = None
        for attempt in range(6):  # a lost response is retried with the same id: idempotent
            try:
                r = await _timed(stats, "submit", client.post(path, json=body, headers=headers))
            except NetworkError as err:
                stats.error(f"submit:{type(err).__name__}")
                stats.retries += 1
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            if r.status_code in (200, 201):
                stats.acked[body["judgement_id"]] = (task["task_id"], name)
                stats.cycles.append((cycle_start, time.monotonic() - cycle_start))
                if combined:
                    next_task = r.json().get("next_task")
                    if next_task is None:
                        stats.exhausted_raters += 1
                        return
                break
            stats.error(f"submit:{r.status_code}")
            if r.status_code < 500:
                break
            stats.retries += 1
            await asyncio.sleep(0.05 * (attempt + 1))
        else:
            task = None
            continue
        task = next_task
        if body["judgement_id"] in stats.acked and rng.random() < 0.10:
            try:
                again = await _timed(stats, "resubmit", client.post("/api/judgements", json=body, headers=headers))
            except NetworkError as err:
                stats.error(f"resubmit:{type(err).__name__}")
                continue
            if again.status_code == 200 and again.json().get("judgement_id") == body["judgement_id"]:
                stats.idempotent_ok += 1
            else:
                stats.idempotent_bad += 1
        if think > 0 and tickets is None:
            left = deadline - time.monotonic()
            await asyncio.sleep(max(0.0, min(rng.expovariate(1.0 / think), 10 * think, left)))


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0] * 1000, 2)
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] * 1000, 2)


def _summary(values: list[float]) -> dict:
    return {"count": len(values), "p50_ms": _pct(values, 50), "p95_ms": _pct(values, 95), "p99_ms": _pct(values, 99)}


async def _run_load(
    base: str,
    tokens: dict[str, str],
    seconds: float,
    stats: Stats,
    *,
    think: float = 0.0,
    combined: bool = False,
    rates: list[float] | None = None,
) -> tuple[float, float]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    clients = [Connection(host, int(port)) for _ in tokens]  # one keep-alive connection per rater
    try:
        start = time.monotonic()
        deadline = start + seconds
        tickets: asyncio.Queue | None = asyncio.Queue() if rates else None

        async def arrivals() -> None:
            """Poisson arrivals at each step's rate; a free rater takes each (the pool of raters is bounded)."""
            rng = random.Random(12345)
            step = seconds / len(rates)
            t = start
            for k, rate in enumerate(rates):
                t = max(t, start + k * step)
                while True:
                    t += rng.expovariate(rate)
                    if t >= start + (k + 1) * step:
                        break
                    await asyncio.sleep(max(0.0, t - time.monotonic()))
                    stats.arrivals.append(t)
                    tickets.put_nowait(t)
            for _ in tokens:
                tickets.put_nowait(None)

        await asyncio.gather(
            *(
                _rater(
                    clients[i],
                    name,
                    token,
                    deadline,
                    stats,
                    seed=i,
                    max_iter=100_000,
                    think=think,
                    combined=combined,
                    tickets=tickets,
                )
                for i, (name, token) in enumerate(tokens.items())
            ),
            *([arrivals()] if rates else []),
        )
        return start, time.monotonic() - start
    finally:
        for c in clients:
            c.close()


def _steps(stats: Stats, start: float, seconds: float, rates: list[float], slo_ms: float) -> dict:
    """Per arrival-rate step: offered and achieved cycles per second and the cycle latency percentiles."""
    step = seconds / len(rates)
    out = []
    for k, rate in enumerate(rates):
        lo, hi = start + k * step, start + (k + 1) * step
        warm = lo + min(2.0, step / 4)  # the first moments after a rate change are a transition
        lat = [d for t, d in stats.cycles if warm <= t < hi]
        offered = sum(1 for t in stats.arrivals if warm <= t < hi)
        summary = _summary(lat)
        ok = bool(lat) and len(lat) >= 0.95 * offered * _done_share(stats) and (summary["p95_ms"] or 1e9) < slo_ms
        out.append(
            {
                "rate": rate,
                "offered_per_s": round(offered / (hi - warm), 1),
                "judged_per_s": round(len(lat) / (hi - warm), 1),
                **summary,
                "sustained": ok,
            }
        )
    sustained = [s["rate"] for s in out if s["sustained"]]
    return {"steps": out, "highest_sustainable_rate": max(sustained) if sustained else None, "slo_p95_ms": slo_ms}


def _done_share(stats: Stats) -> float:
    """Offered cycles include skips (about 5 %), which end without a judgement."""
    done = len(stats.cycles)
    return done / (done + stats.skips) if done else 1.0


def _verify(database_url: str, base: str, stats: Stats) -> dict:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT j.uid, j.task_id, r.name FROM judgements j JOIN raters r ON r.id = j.rater_id")
        ).all()
        dup_pairs = conn.execute(
            text("SELECT count(*) FROM (SELECT task_id, rater_id FROM judgements GROUP BY 1, 2 HAVING count(*) > 1) d")
        ).scalar()
        over_quota = conn.execute(
            text(
                "SELECT count(*) FROM (SELECT task_id FROM judgements GROUP BY 1 "
                f"HAVING count(*) > {RATINGS_PER_TASK}) o"
            )
        ).scalar()
        n_done_mismatch = conn.execute(
            text(
                "SELECT count(*) FROM tasks t WHERE t.n_done <> "
                "(SELECT count(*) FROM judgements j WHERE j.task_id = t.id)"
            )
        ).scalar()
    engine.dispose()
    in_db = {uid: (task_id, name) for uid, task_id, name in rows}
    acked = stats.acked
    lost = [uid for uid in acked if uid not in in_db]
    unexpected = [uid for uid in in_db if uid not in acked]
    mismatched = [uid for uid in acked if uid in in_db and in_db[uid] != acked[uid]]
    export = httpx.get(f"{base}/api/admin/export", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=120)
    export_lines = [line for line in export.text.splitlines() if line.strip()]
    return {
        "judgements_acknowledged": len(acked),
        "judgements_in_db": len(rows),
        "lost": len(lost),
        "unexpected": len(unexpected),
        "mismatched": len(mismatched),
        "duplicate_task_rater_pairs": int(dup_pairs),
        "tasks_over_quota": int(over_quota),
        "task_counter_mismatches": int(n_done_mismatch),
        "export_records": len(export_lines),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--raters", type=int, default=50)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--tasks", type=int, default=0, help="tasks to import (default: enough for the run)")
    p.add_argument("--mode", choices=["closed", "open"], default="closed")
    p.add_argument("--think", type=float, default=2.0, help="open mode: mean think time between tasks, seconds")
    p.add_argument("--rates", default="", help="open mode: arrival-rate steps (tasks/s), e.g. 100,200,300")
    p.add_argument("--slo-ms", type=float, default=100.0, help="p95 a rate must hold to count as sustainable")
    p.add_argument("--cycle", choices=["separate", "combined"], default="separate")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds left out of latency.cycle_after_warmup")
    p.add_argument("--pool-size", type=int, default=20, help="PREFTUNE_DB_POOL_SIZE of each worker")
    p.add_argument("--server-pythonpath", default="", help="PYTHONPATH of the server process (an older checkout)")
    p.add_argument("--database-url", default="", help="PostgreSQL URL (default: a fresh database on 127.0.0.1:5432)")
    p.add_argument("--pg-host", default=os.environ.get("PREFTUNE_TEST_PG_HOST", "127.0.0.1"))
    p.add_argument("--pg-port", type=int, default=int(os.environ.get("PREFTUNE_TEST_PG_PORT", "5432")))
    p.add_argument("--pg-user", default=os.environ.get("PREFTUNE_TEST_PG_USER", "postgres"))
    args = p.parse_args(argv)
    if args.raters < 1 or args.seconds <= 0:
        p.error("--raters must be >= 1 and --seconds > 0")

    drop = None
    database_url = args.database_url
    if not database_url:
        database_url, drop = _fresh_database(args.pg_host, args.pg_port, args.pg_user)
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    n_tasks = args.tasks or max(200, int(args.seconds * 200))
    workdir = Path(tempfile.mkdtemp(prefix="preftune-serve-load-"))
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = None
    result: dict = {
        "benchmark": "serve_load",
        "mode": args.mode,
        "cycle": args.cycle,
        "workers": args.workers,
        "pool_size": args.pool_size,
        "warmup_s": args.warmup,
        "raters": args.raters,
        "seconds": args.seconds,
        "think_s": args.think if args.mode == "open" and not rates else None,
        "database": "postgresql",
        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
    }
    try:
        proc = _start_server(
            database_url, port, workdir / "server.log", args.workers, args.server_pythonpath, args.pool_size
        )
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        records = _task_records(n_tasks, seed=0)
        with httpx.Client(base_url=base, timeout=60) as c:
            chunk: list[str] = []
            size = 0
            for rec in records:  # stay under PREFTUNE_MAX_BODY_BYTES per import request
                line = json.dumps(rec) + "\n"
                if size + len(line) > 900_000:
                    c.post("/api/admin/tasks/import", content="".join(chunk), headers=admin).raise_for_status()
                    chunk, size = [], 0
                chunk.append(line)
                size += len(line)
            if chunk:
                c.post("/api/admin/tasks/import", content="".join(chunk), headers=admin).raise_for_status()
            tokens = {}
            for i in range(args.raters):
                r = c.post("/api/admin/raters", json={"name": f"load-{i}"}, headers=admin)
                r.raise_for_status()
                tokens[f"load-{i}"] = r.json()["token"]
        stats = Stats()
        meter = CpuMeter(proc.pid, database_url.rsplit("/", 1)[-1].split("?")[0])
        meter.start()
        start, elapsed = event_loop_runner()(
            _run_load(
                base,
                tokens,
                args.seconds,
                stats,
                think=args.think if args.mode == "open" else 0.0,
                combined=args.cycle == "combined",
                rates=rates if args.mode == "open" else None,
            )
        )
        cpu = meter.stop()
        loadavg_after = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
        checks = _verify(database_url, base, stats)
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(timeout=60)
        all_latency = [v for values in stats.latency.values() for v in values]
        result.update(
            {
                "tasks": n_tasks,
                "ratings_per_task": RATINGS_PER_TASK,
                "elapsed_s": round(elapsed, 2),
                "requests": len(all_latency),
                "throughput_requests_per_s": round(len(all_latency) / elapsed, 1),
                "throughput_judgements_per_s": round(len(stats.acked) / elapsed, 1),
                "loadavg_after": loadavg_after,
                "cycles_per_s": round(len(stats.cycles) / elapsed, 1),
                # CPU seconds of the load phase per group, and per acknowledged judgement: the figure that
                # compares versions fairly on a shared machine (see serve_cpu.py)
                "cpu_s": {k: round(v, 2) for k, v in cpu.items()} if cpu else None,
                "cpu_ms_per_judgement": (
                    {k: round(1000 * v / len(stats.acked), 3) for k, v in cpu.items()} if cpu and stats.acked else None
                ),
                "latency": {
                    "cycle": _summary([d for _, d in stats.cycles]),
                    # the same without the cycles that started in the first --warmup seconds (raters
                    # connecting and loading their first task all at once; the service's pool filling)
                    "cycle_after_warmup": _summary([d for t, d in stats.cycles if t >= start + args.warmup]),
                    "all": _summary(all_latency),
                    "next_task": _summary(stats.latency["next"]),
                    "submit": _summary(stats.latency["submit"]),
                    "resubmit": _summary(stats.latency["resubmit"]),
                },
                "idempotent_resubmits_ok": stats.idempotent_ok,
                "idempotent_resubmits_bad": stats.idempotent_bad,
                "skips": stats.skips,
                "retries": stats.retries,
                "errors": stats.errors,
                "raters_out_of_tasks": stats.exhausted_raters,
                "arrivals_not_served": stats.unserved,
                "server_exit_code": exit_code,
                "server_log": str(workdir / "server.log"),
                **checks,
            }
        )
        if rates and args.mode == "open":
            result["rate_steps"] = _steps(stats, start, args.seconds, rates, args.slo_ms)
        result["ok"] = (
            checks["lost"] == 0
            and checks["unexpected"] == 0
            and checks["mismatched"] == 0
            and checks["duplicate_task_rater_pairs"] == 0
            and checks["tasks_over_quota"] == 0
            and checks["task_counter_mismatches"] == 0
            and checks["export_records"] == checks["judgements_in_db"]
            and stats.idempotent_bad == 0
            and checks["judgements_acknowledged"] > 0
            and exit_code == 0
        )
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if drop is not None:
            drop()
    print(json.dumps(result, indent=2))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
