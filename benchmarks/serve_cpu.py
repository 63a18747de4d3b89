"""CPU time the load benchmark's processes spend during the load phase (Linux ``/proc``).

On a shared machine throughput and latency move with everyone else's load; CPU time per
judgement moves much less, so it is what compares two versions of the service fairly. Three
groups: the service (its process and its uvicorn workers), the PostgreSQL backends connected
to the benchmark's database, and the benchmark client itself. A backend that exits during
the window (a pool overflow connection closed) takes its time with it, so PostgreSQL's share
is a lower bound.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")


def _ticks(pid: int) -> int | None:
    try:
        fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks


def _children(pid: int) -> list[int]:
    out = []
    for task in (PROC / str(pid) / "task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _backends(database: str) -> list[int]:
    """PostgreSQL backends serving ``database`` (their title is ``postgres: user db host(port) state``)."""
    out = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("postgres: ") and f" {database} " in title:
            out.append(int(entry.name))
    return out


class CpuMeter:
    """Snapshot per-process CPU at ``start()``; ``stop()`` returns CPU seconds per group since then."""

    def __init__(self, server_pid: int, database: str):
        self.server_pid, self.database = server_pid, database
        self.available = PROC.joinpath("self", "stat").exists()
        self._start: dict[str, dict[int, int]] = {}

    def _snapshot(self) -> dict[str, dict[int, int]]:
        groups = {
            "server": [self.server_pid, *_children(self.server_pid)],
            "postgres": _backends(self.database),
            "client": [os.getpid()],
        }
        return {g: {p: t for p in pids if (t := _ticks(p)) is not None} for g, pids in groups.items()}

    def start(self) -> None:
        if self.available:
            self._start = self._snapshot()

    def stop(self) -> dict[str, float] | None:
        if not self.available:
            return None
        end = self._snapshot()
        hz = os.sysconf("SC_CLK_TCK")
        out = {}
        for group, ticks in end.items():
            before = self._start.get(group, {})
            out[group] = sum(t - before.get(p, 0) for p, t in ticks.items()) / hz  # new processes count whole
        return out
