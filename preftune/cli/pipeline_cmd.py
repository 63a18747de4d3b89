"""``preftune run``, ``preftune compile`` and ``preftune schedule``: the retraining pipeline, anywhere.

- ``run --config run.yaml``: the whole pipeline with kfp's local runner on this machine;
  ``run --config run.yaml --host URL``: submitted to a Kubeflow Pipelines endpoint instead.
- ``compile``: the pipeline (for a run config's Kubernetes settings) as Kubeflow YAML, and the
  components' specs.
- ``schedule``: create or update a recurring run by name; ``--list``; ``--delete``.

Heavy imports (kfp, mlflow, torch) happen inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from preftune.errors import ConfigError, ExitCode, PreftuneError


def _load(config: Path | None) -> Any:
    from preftune.config import load_config

    return load_config(config)


def _fmt_seconds(s: Any) -> str:
    if s is None:
        return "-"
    s = float(s)
    return f"{s:.0f}s" if s >= 10 else f"{s:.1f}s"


def step_line(step: str, s: dict[str, Any]) -> str:
    """One human line with the figures that matter for a step."""
    o = s.get("outputs") or {}
    status = s.get("status")
    if status in ("not run", None):
        return "-"
    if status == "failed":
        return f"error: {s.get('error')}"
    if step == "collect":
        c = o.get("counts") or {}
        return (
            f"dataset {str(o.get('dataset_hash', ''))[:12]}: {c.get('train_pairs', 0)} train / "
            f"{c.get('eval_pairs', 0)} held-out pairs, {c.get('judgements', 0)} judgements"
        )
    if step == "check-fit":
        verdicts = ", ".join(f"{f} {v.get('verdict')}" for f, v in (o.get("verdicts") or {}).items())
        return ("fit: " if o.get("fit") else "NOT FIT: ") + verdicts
    if step == "train-reward":
        acc = o.get("accuracy")
        gate = "passed" if o.get("gate_passed") else "FAILED"
        acc_s = f"{acc:.3f}" if isinstance(acc, (int, float)) else "?"
        base = o.get("baselines") or {}
        best = f", best trivial baseline {max(base.values()):.3f}" if base else ""
        if "nothing left to beat" in str(o.get("gate_reason") or ""):  # reward.gate's "no headroom" rule applied
            gate += ": the baseline is at the agreement ceiling, so accuracy had to reach a share of that ceiling"
        return f"held-out accuracy {acc_s}{best} (calibrated gate: {gate})"
    if step == "ppo":
        kl, r0, r1 = o.get("kl"), o.get("reward_first"), o.get("reward_final")
        fmt = lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "?"  # noqa: E731
        return f"{o.get('updates')} updates, reward {fmt(r0)} -> {fmt(r1)}, KL {fmt(kl)} (budget {o.get('kl_budget')})"
    if step == "evaluate":
        gates = o.get("gates") or []
        failed = [g.get("name") for g in gates if g.get("passed") is False]
        judged = sum(1 for g in gates if g.get("passed") is not None)
        return (
            f"{judged - len(failed)}/{judged} gates passed"
            + (f"; failed: {', '.join(failed[:6])}" if failed else "")
            + (" (first promotion: absolute gates only)" if o.get("first_promotion") else "")
        )
    if step == "promote":
        if o.get("promoted"):
            return f"promoted {o.get('registered_model')} v{o.get('version')}" + (
                f" (was v{o.get('previous')})" if o.get("previous") else ""
            )
        return "rejected: " + "; ".join((o.get("reasons") or [])[:3])
    return ""


def print_outcome(console: Any, outcome: dict[str, Any], task_seconds: dict[str, float] | None = None) -> None:
    """The run's steps and outcome as a table."""
    from rich.table import Table

    from preftune.pipeline.graph import STEPS

    table = Table(title=f"preference-retraining {outcome.get('pipeline_run_id')}")
    table.add_column("step")
    table.add_column("status")
    table.add_column("time", justify="right")
    table.add_column("result")
    for step in STEPS:
        s = (outcome.get("steps") or {}).get(step) or {}
        status = s.get("status", "not run")
        shown = {"ok": "done", "stopped": "stopped (gate)"}.get(status, status)
        if s.get("cached"):
            shown = "cached"
            took = f"{_fmt_seconds(s.get('seconds'))} earlier"
        else:
            took = _fmt_seconds((task_seconds or {}).get(step, s.get("seconds")))
        table.add_row(step, shown, took, step_line(step, s))
    console.print(table)
    colour = "green" if outcome.get("exit_code") == 0 else "yellow" if outcome.get("outcome") != "failed" else "red"
    console.print(f"[bold {colour}]{outcome.get('outcome')}[/]: {outcome.get('message')}")


def run_local_with_progress(cfg: Any, console: Any, *, verbose: bool = False) -> Any:
    """Preflight, then the local run with one console line per task; returns the LocalRun."""
    from rich.console import Console

    from preftune.pipeline.preflight import preflight
    from preftune.pipelines.local import run_local

    preflight(cfg, local=True)
    # the local runner's output is redirected to its log while it runs: keep the progress on the real stream
    live = Console(file=console.file, stderr=console.stderr)

    def notify(task: str, event: str, seconds: float | None) -> None:
        if event == "started":
            live.print(f"  [dim]{task} ...[/]")
        else:
            mark = "[green]done[/]" if event == "succeeded" else "[red]failed[/]"
            live.print(f"  {task}: {mark} in {_fmt_seconds(seconds)}")

    return run_local(cfg, notify=None if verbose else notify, verbose=verbose)


def finish_local(console: Any, result: Any) -> None:
    """Print a local run's outcome (the table on stdout)."""
    if result.outcome is not None:
        print_outcome(console, result.outcome, dict(result.task_seconds))
    console.print(f"log: {result.log_path}")


def outcome_error(result: Any) -> PreftuneError | None:
    """The error a local run ends with: a gate's code (10, 11, 13) or the failing step's, with one line."""
    if result.outcome is None:
        return PreftuneError(
            f"the pipeline ended without recording an outcome ({result.kfp_error or 'see the log'}); "
            f"log: {result.log_path}",
            ExitCode.INTERNAL,
        )
    code = int(result.outcome.get("exit_code") or 0)
    if code == 0:
        return None
    return PreftuneError(f"{result.outcome.get('outcome')}: {result.outcome.get('message')}", code)


def register(app: typer.Typer) -> None:
    """Add ``run``, ``compile`` and ``schedule`` to ``app`` (once, however often it is called)."""
    if getattr(app, "_preftune_pipeline_commands", False):
        return
    app._preftune_pipeline_commands = True  # type: ignore[attr-defined]

    @app.command("run")
    def run(
        config: Path = typer.Option(..., "--config", "-c", help="The run config (YAML)."),
        host: str | None = typer.Option(
            None, "--host", help="Kubeflow Pipelines API URL: submit there instead of running locally."
        ),
        experiment: str = typer.Option("preftune", "--experiment", help="Kubeflow experiment (with --host)."),
        namespace: str | None = typer.Option(
            None, "--namespace", envvar="KFP_NAMESPACE", help="Kubeflow profile namespace (multi-user Kubeflow)."
        ),
        run_name: str | None = typer.Option(None, "--run-name", help="Name of the Kubeflow run (default: run.name)."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Local run: show every task's log."),
        output_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON."),
    ) -> None:
        """Run the preference-retraining pipeline: locally (kfp's local runner) or on a cluster (--host).

        Exit code: 0 promoted or completed, 10 not fit, 11 reward gate failed, 13 evaluation or
        promotion rejected (champion unchanged), else the failing step's code.
        """
        from rich.console import Console

        from preftune.pipeline.preflight import preflight

        console = Console(stderr=output_json)
        cfg = _load(config)
        if host:
            from preftune.pipelines.client import submit_run

            preflight(cfg, local=False, check_tracking=False, check_storage=False)
            res = submit_run(cfg, host, experiment=experiment, run_name=run_name, namespace=namespace)
            if output_json:
                typer.echo(json.dumps(res, indent=2))
            else:
                console.print(f"submitted run {res['run_id']} to {host} (experiment {experiment}): {res['url']}")
            return
        result = run_local_with_progress(cfg, console, verbose=verbose)
        finish_local(console, result)
        if output_json and result.outcome is not None:
            typer.echo(json.dumps(result.outcome, indent=2, default=str))
        err = outcome_error(result)
        if err is not None:
            raise err

    @app.command("compile")
    def compile_(
        config: Path | None = typer.Option(None, "--config", "-c", help="Run config whose Kubernetes settings to use."),
        output: Path = typer.Option(
            Path("preference-retraining.yaml"), "--output", "-o", help="Where to write the pipeline YAML."
        ),
        components: Path | None = typer.Option(
            None, "--components", help="Also write each component's spec into this folder."
        ),
    ) -> None:
        """Compile the pipeline to Kubeflow YAML (the run config becomes the default of its `config` parameter)."""
        from preftune.pipelines.retraining import compile_pipeline

        cfg = _load(config)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".{output.stem}.tmp{output.suffix or '.yaml'}")
        try:
            compile_pipeline(cfg, str(tmp))
            tmp.replace(output)
        finally:
            tmp.unlink(missing_ok=True)
        typer.echo(f"wrote {output}")
        if components is not None:
            from preftune.components import compile_specs

            for p in compile_specs(components):
                typer.echo(f"wrote {p}")

    @app.command("schedule")
    def schedule(
        config: Path | None = typer.Option(None, "--config", "-c", help="The run config of every scheduled run."),
        cron: str | None = typer.Option(
            None, "--cron", help="When to run: 5-field cron (minute hour day month weekday), e.g. '0 3 * * 1'."
        ),
        host: str = typer.Option(..., "--host", envvar="KF_PIPELINES_ENDPOINT", help="Kubeflow Pipelines API URL."),
        name: str | None = typer.Option(
            None, "--name", help="Name of the recurring run (default: run.name of the config)."
        ),
        experiment: str = typer.Option("preftune", "--experiment", help="Kubeflow experiment of the recurring run."),
        namespace: str | None = typer.Option(
            None, "--namespace", envvar="KFP_NAMESPACE", help="Kubeflow profile namespace (multi-user Kubeflow)."
        ),
        disabled: bool = typer.Option(False, "--disabled", help="Create or update it paused."),
        list_: bool = typer.Option(False, "--list", help="List the experiment's recurring runs."),
        delete: bool = typer.Option(False, "--delete", help="Delete the recurring run called --name."),
        output_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Create or update (idempotently, by name) a Kubeflow recurring run of the pipeline; --list; --delete."""
        from preftune.pipelines import client

        if list_ and delete:
            raise ConfigError("--list and --delete: pick one")
        if list_:
            rows = client.list_schedules(host, experiment=experiment, namespace=namespace)
            if output_json:
                typer.echo(json.dumps(rows, indent=2))
                return
            if not rows:
                typer.echo(f"no recurring runs in experiment {experiment!r}")
            for r in rows:
                typer.echo(f"{r['name']}\t{r['cron']}\t{r['mode']}\t{r['recurring_run_id']}")
            return
        if delete:
            if not name:
                if config is None:
                    raise ConfigError("--delete: give --name (or --config, whose run.name is the default name)")
                name = _load(config).run.name
            deleted = client.delete_schedule(host, name, experiment=experiment, namespace=namespace)
            if output_json:
                typer.echo(json.dumps({"name": name, "deleted": deleted}, indent=2))
            elif deleted:
                typer.echo(f"deleted recurring run {name!r} ({', '.join(deleted)})")
            else:
                typer.echo(f"no recurring run named {name!r} in experiment {experiment!r}: nothing to delete")
            return
        if config is None or cron is None:
            raise ConfigError("schedule: give --config and --cron (or --list / --delete)")
        from preftune.pipeline.preflight import preflight

        cfg = _load(config)
        preflight(cfg, local=False, check_tracking=False, check_storage=False)
        res = client.schedule(
            cfg,
            host,
            cron=cron,
            name=name or cfg.run.name,
            experiment=experiment,
            namespace=namespace,
            enabled=not disabled,
        )
        if output_json:
            typer.echo(json.dumps(res, indent=2))
        else:
            typer.echo(
                f"{res['action']} recurring run {res['name']!r} ({res['recurring_run_id']}), "
                f"cron '{res['cron']}' (Kubeflow's 6-field form), experiment {experiment!r}"
            )


__all__ = ["finish_local", "outcome_error", "print_outcome", "register", "run_local_with_progress"]
