"""Prometheus metrics of the feedback service, in a registry of its own per app.

A registry per app (rather than the process-global default) lets tests and embedders
create several apps in one process without "duplicated timeseries" errors.

Names (also in ``docs/architecture.md``):

- ``preftune_judgements_total{family}``: judgements stored since the process started.
- ``preftune_judgements_undone_total{family}``: judgements their rater took back (undo).
- ``preftune_tasks_pending``: tasks that still want judgements (read from the database at scrape).
- ``preftune_request_duration_seconds{method,route,status}``: request latency histogram.
- ``preftune_agreement_alpha{family}``, ``preftune_agreement_pairwise{family}``: the latest
  agreement point estimates (refreshed in the background and by the agreement endpoint).
- ``preftune_errors_total{status}``: responses with status >= 400.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("preftune.serve.metrics")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _PendingTasksCollector(Collector):
    """Reads the pending-task count from the database when Prometheus scrapes."""

    def __init__(self, count: Callable[[], int]):
        self._count = count

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily("preftune_tasks_pending", "Tasks that still want judgements.")]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            value = self._count()
        except Exception as err:  # noqa: BLE001 - a scrape must not fail because the database is down
            log.warning("tasks_pending not exported: database query failed: %s", err)
            return
        yield GaugeMetricFamily("preftune_tasks_pending", "Tasks that still want judgements.", value=value)


class Metrics:
    def __init__(self, pending_count: Callable[[], int]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.judgements = Counter(
            "preftune_judgements", "Judgements stored, by behaviour family.", ["family"], registry=r
        )
        self.undone = Counter(
            "preftune_judgements_undone", "Judgements taken back by their rater, by family.", ["family"], registry=r
        )
        self.latency = Histogram(
            "preftune_request_duration_seconds",
            "Latency of HTTP requests.",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter("preftune_errors", "HTTP responses with status >= 400.", ["status"], registry=r)
        self.alpha = Gauge(
            "preftune_agreement_alpha", "Krippendorff's alpha of rater agreement, by family.", ["family"], registry=r
        )
        self.pairwise = Gauge(
            "preftune_agreement_pairwise", "Share of agreeing rater pairs, by family.", ["family"], registry=r
        )
        r.register(_PendingTasksCollector(pending_count))

    def set_agreement(self, families: dict[str, dict[str, Any]]) -> None:
        """Publish agreement point estimates; undefined values (too few items) become NaN."""
        for name, fa in families.items():
            for gauge, key in ((self.alpha, "alpha"), (self.pairwise, "pairwise")):
                value = fa.get(key)
                gauge.labels(family=name).set(float(value) if value is not None else math.nan)

    def render(self) -> bytes:
        return generate_latest(self.registry)
