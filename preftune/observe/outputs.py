"""Where a window's figures go: an MLflow run (metrics, the judged sample as a table, the report
with the shares over time), the Prometheus Pushgateway, and tags on the champion's version."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from preftune.data.records import metric_key

ARTIFACTS = "observe"


def window_metrics(result: Any) -> dict[str, float]:
    m: dict[str, float] = {
        "observe.records": float(len(result.records)),
        "observe.new_prompt_share": float(result.new_prompt_share),
        "observe.judge_errors": float(result.judge_errors),
        "observe.hard_cases": float(len(result.hard_cases)),
    }
    pooled: dict[str, dict[str, list[int]]] = {}
    for fam, versions in result.shares.items():
        for shares in versions.values():
            for b, s in shares.items():
                acc = pooled.setdefault(fam, {}).setdefault(b, [0, 0])
                acc[0] += s.k
                acc[1] += s.n
    for fam, behaviours in pooled.items():
        for b, (k, n) in behaviours.items():
            m[metric_key("observe", fam, b, "share")] = k / n if n else 0.0
    for base, tests in result.drift.items():
        for fam, t in tests.items():
            m[metric_key("observe", fam, "drift", base, "tv")] = t.tv
            if t.p_value is not None:
                m[metric_key("observe", fam, "drift", base, "p_value")] = t.p_value
    for fam, g in result.gates.items():
        m[metric_key("observe", fam, "forbidden_share")] = g.share
        m[metric_key("observe", fam, "forbidden_share", "ci_low")] = g.low
        m[metric_key("observe", fam, "forbidden_share", "ci_high")] = g.high
    return m


def plot_history(history: list[dict[str, Any]], window: dict[str, Any], path: Path) -> None:
    """Each family's behaviour shares, window by window (the picture a reviewer opens first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = [*history, window]
    families = sorted({f for w in windows for f in w.get("counts", {})})
    if not families:
        return
    fig, axes = plt.subplots(len(families), 1, figsize=(8, 2.2 * len(families)), squeeze=False, sharex=True)
    xs = list(range(len(windows)))
    for ax, fam in zip(axes[:, 0], families, strict=True):
        behaviours = sorted({b for w in windows for b in w.get("counts", {}).get(fam, {})})
        for b in behaviours:
            ys = []
            for w in windows:
                c = w.get("counts", {}).get(fam, {})
                n = sum(c.values())
                ys.append(c.get(b, 0) / n if n else float("nan"))
            ax.plot(xs, ys, marker="o", label=b)
        ax.set_title(fam, fontsize=9, loc="left")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    axes[-1, 0].set_xticks(xs, [w.get("window", str(i)) for i, w in enumerate(windows)], rotation=45, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_report(result: Any, plot_name: str | None) -> str:
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("preftune.observe", "templates"), autoescape=select_autoescape())
    return env.get_template("report.html").render(r=result, plot=plot_name, reasons=result.reasons())


def log_window(
    cfg: Any, result: Any, history: list[dict[str, Any]], report: Any, *, output: str | None, storage: Any
) -> None:
    """One MLflow run for the window, and the same files under ``output`` when given."""
    import mlflow

    from preftune import tracking

    tags = {
        "preftune.observe.window": result.window["window"],
        "preftune.observe.verdict": result.verdict,
        "preftune.observe.model_version": str(result.window.get("model_version")),
    }
    with tracking.start_step_run("observe", cfg, tags=tags) as run, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        mlflow.log_metrics(window_metrics(result))
        figures = {
            "window": result.window,
            "verdict": result.verdict,
            "reasons": result.reasons(),
            "new_prompt_share": result.new_prompt_share,
            "judge_errors": result.judge_errors,
            "shares": {
                f: {v: {b: s.to_dict() for b, s in sh.items()} for v, sh in vs.items()}
                for f, vs in result.shares.items()
            },
            "drift": {base: {f: t.to_dict() for f, t in tests.items()} for base, tests in result.drift.items()},
            "gates": {f: g.to_dict() for f, g in result.gates.items()},
            "validation": report.to_dict(),
        }
        (folder / "window.json").write_text(json.dumps(figures, indent=2, sort_keys=True, default=str))
        (folder / "judged.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.records))
        (folder / "hard_cases.jsonl").write_text(
            "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in result.hard_cases)
        )
        plot_history(history, result.window, folder / "shares_over_time.png")
        plot = "shares_over_time.png" if (folder / "shares_over_time.png").exists() else None
        (folder / "report.html").write_text(render_report(result, plot))
        mlflow.log_artifacts(str(folder), ARTIFACTS)
        if result.records:
            import pandas as pd

            mlflow.log_table(pd.DataFrame(result.records), f"{ARTIFACTS}/judged_table.json")
        result.mlflow_run_id = run.info.run_id
        if output:
            storage.put_dir(str(folder), output)
            result.output = output


def push_metrics(cfg: Any, result: Any) -> None:
    """The window's gauges to the Pushgateway (``observe.pushgateway``); nothing when it is not set."""
    url = cfg.observe.pushgateway
    if not url:
        return
    import time

    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

    reg = CollectorRegistry()
    share = Gauge(
        "preftune_observed_behaviour_share",
        "Share of observed answers per behaviour",
        ["family", "behaviour", "model_version"],
        registry=reg,
    )
    for fam, versions in result.shares.items():
        for version, shares in versions.items():
            for b, s in shares.items():
                share.labels(fam, b, version).set(s.share)
    drift = Gauge(
        "preftune_observe_drift_score",
        "Total variation distance from the baseline's behaviour mix",
        ["family", "model_version", "baseline"],
        registry=reg,
    )
    for base, tests in result.drift.items():
        for fam, t in tests.items():
            drift.labels(fam, str(result.window.get("model_version")), base).set(t.tv)
    forbidden = Gauge(
        "preftune_observe_forbidden_share_over_gate",
        "1 when a forbidden share clearly breaks its gate",
        ["family"],
        registry=reg,
    )
    for fam, g in result.gates.items():
        forbidden.labels(fam).set(1.0 if g.broken else 0.0)
    Gauge("preftune_observe_records_judged_total", "Records judged in the last window", registry=reg).set(
        len(result.records)
    )
    Gauge("preftune_observe_judge_errors_total", "Judge failures in the last window", registry=reg).set(
        result.judge_errors
    )
    lag = Gauge("preftune_observe_window_lag_seconds", "Age of the newest observed record", registry=reg)
    newest = max((r["at"] for r in result.records if r.get("at")), default=None)
    if newest:
        from datetime import datetime

        lag.set(max(0.0, time.time() - datetime.fromisoformat(newest.replace("Z", "+00:00")).timestamp()))
    Gauge("preftune_observe_verdict", "0 ok, 1 drift, 2 regression", registry=reg).set(
        {"ok": 0, "no_data": 0, "drift": 1, "regression": 2}[result.verdict]
    )
    Gauge("preftune_observe_last_success_timestamp_seconds", "When the last window finished", registry=reg).set(
        time.time()
    )
    push_to_gateway(
        url, job="preftune-observe", registry=reg, grouping_key={"registered_model": cfg.models.registered_model}
    )


def tag_actions(cfg: Any, client: Any, champion: str | None, result: Any) -> None:
    """The window's verdict and actions on the registry version it observed."""
    if champion is None or client is None:
        return
    record = {
        "window": result.window["window"],
        "verdict": result.verdict,
        "reasons": result.reasons()[:20],
        "actions": [{k: v for k, v in a.items() if k != "record"} for a in result.actions],
        "run_id": result.mlflow_run_id,
    }
    name = cfg.models.registered_model
    client.set_model_version_tag(name, champion, "preftune.observe.last_verdict", result.verdict)
    client.set_model_version_tag(name, champion, "preftune.observe.last_window", json.dumps(record)[:4900])
