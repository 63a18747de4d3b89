"""What a PPO run shows while it trains: MLflow metrics and sample tables, Prometheus gauges, curves.

Metric names are stable API (dashboards and alerts use them) and are listed in ``docs/ppo.md``:
every per-update figure is ``ppo/<name>`` in MLflow and ``preftune_ppo_<name>`` as a Prometheus
gauge. Observability never stops training: a failing Pushgateway is reported once and skipped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from preftune.ppo.reporting import UpdateEvent

log = logging.getLogger(__name__)

PROMETHEUS_GAUGES: dict[str, str] = {
    "ppo/reward_mean": "Mean (normalised, clipped, EOS-penalised) reward of the last rollout.",
    "ppo/kl": "Mean KL to the reference per response (nats) of the last rollout.",
    "ppo/kl_coef": "KL penalty coefficient used for the last rollout.",
    "ppo/entropy": "Mean per-token entropy of the policy on the last rollout.",
    "ppo/policy_loss": "Clipped surrogate loss averaged over the last update.",
    "ppo/value_loss": "Clipped value loss averaged over the last update.",
    "ppo/clip_frac": "Share of tokens whose probability ratio was clipped in the last update.",
    "ppo/approx_kl": "Approximate KL between the updated and the rollout policy.",
    "ppo/response_length": "Mean response length in tokens (up to and including EOS).",
    "ppo/tokens_per_s": "Generated tokens per second of wall time (rollout + update).",
    "ppo/samples_per_s": "Responses per second of wall time (rollout + update).",
}


def prometheus_name(metric: str) -> str:
    """``ppo/reward_mean`` -> ``preftune_ppo_reward_mean``."""
    return "preftune_" + metric.replace("/", "_")


class MlflowLogger:
    """Per-update metrics and, when due, a table of sample generations, on the active MLflow run."""

    def __init__(self) -> None:
        import mlflow

        self._mlflow = mlflow

    def log_history(self, history: Sequence[Mapping[str, float]]) -> None:
        """Re-log restored metrics (a resumed run starts a new MLflow run; its curves stay complete)."""
        for rec in history:
            step = int(rec["update"])
            self._mlflow.log_metrics({k: float(v) for k, v in rec.items() if k != "update"}, step=step)

    def on_update(self, event: UpdateEvent) -> None:
        finite = {k: float(v) for k, v in event.metrics.items() if math.isfinite(float(v))}
        self._mlflow.log_metrics(finite, step=event.update)
        if event.samples:
            columns: dict[str, list[Any]] = {k: [row[k] for row in event.samples] for k in event.samples[0]}
            columns["update"] = [event.update] * len(event.samples)
            self._mlflow.log_table(data=columns, artifact_file=f"samples/update_{event.update:06d}.json")


class PushgatewayReporter:
    """Pushes the key gauges to a Prometheus Pushgateway after every update (batch-job pattern)."""

    def __init__(self, url: str, job: str, grouping_key: Mapping[str, str], timeout_s: float = 5.0) -> None:
        from prometheus_client import CollectorRegistry, Gauge

        self.url = url
        self.job = job
        self.grouping_key = dict(grouping_key)
        self.timeout_s = timeout_s
        self.registry = CollectorRegistry()
        self.gauges = {
            m: Gauge(prometheus_name(m), help_text, registry=self.registry)
            for m, help_text in PROMETHEUS_GAUGES.items()
        }
        self.update_gauge = Gauge("preftune_ppo_update", "Updates completed.", registry=self.registry)
        self.total_gauge = Gauge("preftune_ppo_updates_total", "Updates planned for the run.", registry=self.registry)
        self.time_gauge = Gauge(
            "preftune_ppo_last_update_timestamp_seconds",
            "Unix time of the last completed update.",
            registry=self.registry,
        )
        self._warned = False

    def on_update(self, event: UpdateEvent) -> None:
        from prometheus_client import push_to_gateway

        for metric, gauge in self.gauges.items():
            if metric in event.metrics:
                gauge.set(float(event.metrics[metric]))
        self.update_gauge.set(event.update)
        self.total_gauge.set(event.total)
        self.time_gauge.set(time.time())
        try:
            push_to_gateway(
                self.url, job=self.job, registry=self.registry, grouping_key=self.grouping_key, timeout=self.timeout_s
            )
        except OSError as err:  # urllib errors are OSErrors: unreachable, refused, HTTP error
            if not self._warned:
                log.warning("cannot push PPO metrics to the Pushgateway %s (%s); training goes on", self.url, err)
                self._warned = True


def curves_png(history: Sequence[Mapping[str, float]], path: str | Path, kl_budget: float | None = None) -> Path:
    """Reward and KL per update, one panel each (the KL budget as a dashed line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    updates = [h["update"] for h in history]
    fig, (ax_r, ax_k) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_r.plot(updates, [h["ppo/reward_mean"] for h in history], marker=".", label="reward (normalised)")
    if history and "ppo/raw_reward_mean" in history[0]:
        ax_r.plot(updates, [h["ppo/raw_reward_mean"] for h in history], linestyle=":", label="raw reward")
    ax_r.set_xlabel("update")
    ax_r.set_title("reward")
    ax_r.legend(fontsize=8)
    ax_k.plot(updates, [h["ppo/kl"] for h in history], marker=".", color="tab:red", label="KL to reference")
    if kl_budget is not None:
        ax_k.axhline(kl_budget, color="tab:red", linestyle="--", linewidth=0.8, label="KL budget")
    ax_k.set_xlabel("update")
    ax_k.set_title("KL (nats per response)")
    ax_k.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
