"""The demo: preftune's main job on the embedded defaults, end to end on a laptop.

``preftune demo`` builds (or loads) the demo world, then runs the real ``preference-retraining``
pipeline with kfp's local runner (the same components a cluster runs, as local processes), with
MLflow in SQLite under the preftune home, and prints what a platform team wants to see:

- the time of each step (and which ones the step cache served),
- the fit verdict per behaviour family, the reward model's held-out accuracy,
- a before/after table: the base policy and the trained candidate sampled on the world's
  held-out prompts (same prompts, same seed), share of each behaviour per family,
- the evaluation gates and the promotion decision,
- the command that opens the MLflow UI on the run.

A second demo reuses the world and the step cache (only evaluate and promote run again, against
the champion the first demo promoted). A run stopped by a gate exits with that gate's exit code
and a one-line reason; nothing is registered and the champion stays as it was.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from preftune.config import RunConfig


def _read_jsonl(path: Path) -> list[dict]:
    import json

    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _policy_loadable(folder: str | None) -> bool:
    """A folder ``from_pretrained`` can load as it is (the ppo step's merged policy)."""
    return bool(folder) and (Path(folder) / "config.json").is_file()


def behaviour_table(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]] | None, title: str
) -> Table:
    from preftune.world import FAMILIES

    table = Table(title=title)
    table.add_column("family")
    table.add_column("behaviour")
    table.add_column("base", justify="right")
    if after is not None:
        table.add_column("trained", justify="right")
        table.add_column("change", justify="right")
    table.add_column("rubric")
    for family, by_b in before.items():
        fam = FAMILIES.get(family)
        for behaviour, share in by_b.items():
            mark = ""
            if fam is not None:
                forbidden = "forbidden" if behaviour in fam.forbidden else ""
                mark = "preferred" if behaviour == fam.preferred else forbidden
            row = [family, behaviour, f"{share:.2f}"]
            if after is not None:
                a = (after.get(family) or {}).get(behaviour, 0.0)
                row += [f"{a:.2f}", f"{a - share:+.2f}"]
            table.add_row(*row, mark)
    return table


def _gate_table(gates: list[dict[str, Any]]) -> Table:
    table = Table(title="Evaluation gates")
    table.add_column("gate")
    table.add_column("verdict")
    table.add_column("judged", justify="right")
    table.add_column("limit", justify="right")
    for g in gates:
        verdict = "n/a" if g.get("passed") is None else ("pass" if g["passed"] else "FAIL")
        judged = g.get("judged")
        table.add_row(
            str(g.get("name")),
            verdict,
            f"{judged:.3f}" if isinstance(judged, (int, float)) else str(judged or ""),
            str(g.get("limit") if g.get("limit") is not None else ""),
        )
    return table


def _log_demo_run(cfg: RunConfig, parent_run_id: str | None, before: dict, after: dict | None, timings: dict) -> str:
    """One ``demo`` run under the pipeline's run: the before/after shares as metrics and a plot."""
    import mlflow

    from preftune import tracking
    from preftune.plots import behaviour_shares_png
    from preftune.world import FAMILIES

    with tracking.start_step_run("demo", cfg, parent_run_id=parent_run_id, log_config=False) as run:
        shown = after if after is not None else before
        mlflow.log_metrics({f"behaviour_share.{f}.{b}": v for f, by in shown.items() for b, v in by.items()})
        mlflow.log_metrics({f"behaviour_share_base.{f}.{b}": v for f, by in before.items() for b, v in by.items()})
        mlflow.log_metrics({f"demo.seconds.{k}": float(v) for k, v in timings.items() if v is not None})
        mlflow.log_dict({"base": before, "trained": after}, "behaviour_shares/before_after.json")
        with tempfile.TemporaryDirectory() as tmp:
            series = {"base policy": before, **({"trained policy": after} if after is not None else {})}
            png = behaviour_shares_png(
                series,
                Path(tmp) / "behaviour_shares.png",
                title="Held-out prompts: base vs trained policy",
                preferred={f: fam.preferred for f, fam in FAMILIES.items()},
            )
            mlflow.log_artifact(str(png), "behaviour_shares")
        return run.info.run_id


def run_demo(
    cfg: RunConfig,
    samples_per_prompt: int = 8,
    console: Console | None = None,
    *,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run the demo; returns a summary dict (what the tests check) with ``exit_code``."""
    from preftune import tracking
    from preftune.cli.pipeline_cmd import outcome_error, print_outcome, run_local_with_progress
    from preftune.world import ensure_world, sample_behaviour_shares

    console = console or Console()
    t0 = time.perf_counter()
    console.rule("[bold]preftune demo: the preference-retraining pipeline, locally")
    console.print("Building (or loading) the demo world ...")
    paths = ensure_world(cfg.world)
    t_world = time.perf_counter() - t0
    console.print(f"  world ready in {t_world:.1f}s at {paths.root}")

    console.print("Running the pipeline with kfp's local runner (each step is a local process):")
    result = run_local_with_progress(cfg, console, verbose=verbose)
    outcome = result.outcome
    summary: dict[str, Any] = {
        "world": str(paths.root),
        "pipeline_run_id": result.pipeline_run_id,
        "log": str(result.log_path),
        "seconds": {"world": t_world, "pipeline": result.seconds},
        "task_seconds": result.task_seconds,
    }
    if outcome is None:
        err = outcome_error(result)
        summary.update(exit_code=err.exit_code, outcome=None, error=err)
        return summary
    steps = outcome.get("steps") or {}
    print_outcome(console, outcome, result.task_seconds)

    fit = (steps.get("check-fit") or {}).get("outputs") or {}
    if fit.get("verdicts"):
        t = Table(title="Test of fit per behaviour family")
        t.add_column("family")
        t.add_column("verdict")
        t.add_column("alpha", justify="right")
        t.add_column("coverage", justify="right")
        t.add_column("reason")
        for fam, v in fit["verdicts"].items():
            a, c = v.get("alpha"), v.get("coverage")
            t.add_row(
                fam,
                str(v.get("verdict")),
                f"{a:.2f}" if a is not None else "-",
                f"{c:.2f}" if c is not None else "-",
                str(v.get("reason") or ""),
            )
        console.print(t)
    reward = (steps.get("train-reward") or {}).get("outputs") or {}
    if reward:
        acc = reward.get("accuracy")
        console.print(
            f"Reward model: held-out accuracy {acc:.3f}" if isinstance(acc, (int, float)) else "Reward model: -",
            f"(calibrated reward gate: {'passed' if reward.get('gate_passed') else 'FAILED'})",
        )
        if reward.get("gate_reason"):
            console.print(f"  {reward['gate_reason']}", style="dim")
        for fam, a in (reward.get("per_family") or {}).items():
            console.print(f"  {fam}: {a:.3f}")

    prompts = _read_jsonl(paths.prompts_eval)
    with contextlib.suppress(Exception):  # no per-model "Loading weights" bars in the demo's output
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    t1 = time.perf_counter()
    before = sample_behaviour_shares(paths.policy, prompts, n_samples=samples_per_prompt, seed=cfg.run.seed)
    policy_dir = ((steps.get("ppo") or {}).get("outputs") or {}).get("policy_dir")
    after = None
    if _policy_loadable(policy_dir):
        after = sample_behaviour_shares(policy_dir, prompts, n_samples=samples_per_prompt, seed=cfg.run.seed)
    t_table = time.perf_counter() - t1
    console.print(
        behaviour_table(
            before,
            after,
            f"Behaviour shares on {len(prompts)} held-out prompts x {samples_per_prompt} samples"
            + ("" if after is not None else " (no trained policy in this run)"),
        )
    )

    ev = (steps.get("evaluate") or {}).get("outputs") or {}
    if ev.get("gates"):
        console.print(_gate_table(ev["gates"]))
    pr = steps.get("promote") or {}
    if pr.get("status") == "ok":
        o = pr.get("outputs") or {}
        console.print(
            f"[bold green]Promotion:[/] {o.get('registered_model')} version {o.get('version')} is the "
            f"champion now" + (f" (previous: version {o.get('previous')})" if o.get("previous") else ".")
        )
    elif outcome.get("outcome") != "promoted":
        message = str(outcome.get("message"))
        unchanged = "" if "champion unchanged" in message else " (champion unchanged)"
        console.print(f"[bold yellow]Promotion:[/] none; {message}{unchanged}")

    timings = {"world": t_world, "pipeline": result.seconds, "behaviour_table": t_table}
    timings.update({f"step.{k}": v for k, v in result.task_seconds.items()})
    demo_run = _log_demo_run(cfg, outcome.get("parent_run_id"), before, after, timings)

    uri = tracking.resolve_tracking_uri(cfg.tracking)
    console.print(f"MLflow: pipeline run {outcome.get('parent_run_id')} (demo run {demo_run}) in {uri}")
    if uri.startswith("sqlite:///"):
        from preftune.tracking import default_artifact_root

        console.print(
            f"Open the MLflow UI:  mlflow ui --backend-store-uri {uri} "
            f"--default-artifact-root {default_artifact_root()}"
        )
    exp_id = tracking.configure(cfg)
    console.print(
        "Candidates side by side (evaluation metrics on each LoggedModel): "
        f"http://127.0.0.1:5000/#/experiments/{exp_id}/models?workflowType=machine_learning ; "
        f"each case, candidate beside champion: http://127.0.0.1:5000/#/experiments/{exp_id}/traces"
        "?workflowType=machine_learning"
    )
    console.print(
        f"Done in {time.perf_counter() - t0:.1f}s (world {t_world:.1f}s, pipeline {result.seconds:.1f}s, "
        f"behaviour table {t_table:.1f}s)."
    )
    err = outcome_error(result)
    summary.update(
        exit_code=int(outcome.get("exit_code") or 0),
        error=err,
        outcome=outcome,
        shares={"base": before, "trained": after},
        demo_run_id=demo_run,
    )
    summary["seconds"]["behaviour_table"] = t_table
    return summary


def run_demo_observe(
    cfg: RunConfig,
    settings: Any = None,
    samples_per_prompt: int = 8,
    console: Console | None = None,
    *,
    verbose: bool = False,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """``preftune demo --observe``: the demo (which promotes a champion), then a simulated week of
    production for that champion, the observed hard cases retrained on, the shares recovering
    (:mod:`preftune.observe.demo_loop`). Returns the demo's summary with ``observe`` added."""
    from preftune.observe.baselines import champion_version
    from preftune.observe.demo_loop import ObserveDemoSettings, run_observe_demo

    console = console or Console()
    settings = settings or ObserveDemoSettings()
    summary = run_demo(cfg, samples_per_prompt, console, verbose=verbose)
    if summary.get("error") is not None:
        if champion_version(cfg)[1] is None:
            return summary  # nothing promoted, nothing to observe: the demo's own error
        console.print(f"[yellow]The demo did not promote ({summary['error'].message}); observing the champion.[/]")
    loop = run_observe_demo(cfg, settings, console, workdir=workdir, verbose=verbose)
    summary.update(observe=loop.to_dict(), observe_run_id=loop.run_id, observe_plot=str(loop.plot), error=None)
    summary["exit_code"] = 0
    return summary
