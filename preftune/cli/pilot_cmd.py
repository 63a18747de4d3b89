"""``preftune pilot``: a cheap go / no-go experiment on a slice of the data before committing to PPO."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("pilot")
    def pilot_cmd(
        config: Path | None = typer.Option(None, "--config", "-c", help="Run config (default: built-in defaults)."),
        output: str | None = typer.Option(
            None, "--output", "-o", help="Folder for the report and the steps' outputs (default: <home>/pilots/<id>)."
        ),
        reward_model: str | None = typer.Option(
            None, "--reward-model", "-r", help="Pilot this reward-model folder instead of training one on the slice."
        ),
        compile_to: Path | None = typer.Option(
            None,
            "--compile",
            help="Do not run: compile the preference-pilot Kubeflow pipeline for this config to this YAML file.",
        ),
    ) -> None:
        """Run collect, check-fit, train-reward, a short PPO and evaluate on a slice (pilot.fraction) and print a
        one-page go / no-go report per behaviour family, with red flags and the cost of the full run.

        Writes pilot.md, pilot.html and pilot.json to OUTPUT and logs them to MLflow (a 'pilot' run). Exit codes:
        0 at least one family is 'go'; 10 no family is fit; 11 the reward model is near chance; 13 no-go otherwise;
        2 and 3 bad config or input.
        """
        import time

        from rich.console import Console
        from rich.table import Table

        from preftune.config import load_config
        from preftune.errors import PreftuneError
        from preftune.home import preftune_home
        from preftune.pilot.run import run_pilot

        cfg = load_config(config)
        if compile_to is not None:
            from preftune.pipelines.pilot import compile_pilot_pipeline

            typer.echo(f"compiled preference-pilot to {compile_pilot_pipeline(cfg, str(compile_to))}")
            return
        out = output or str(preftune_home() / "pilots" / time.strftime("%Y%m%d-%H%M%S"))
        console = Console()
        console.rule(
            f"[bold]preftune pilot: {cfg.pilot.fraction:.0%} of the prompts, {cfg.pilot.ppo_updates} PPO updates"
        )
        report = run_pilot(cfg, out, reward_model=reward_model, progress=lambda step: console.print(f"  {step} ..."))
        table = Table(title="Pilot verdict per family (preferred share with CIs)")
        for col in ("family", "verdict", "fit", "RM acc", "before", "after", "change", "trend"):
            table.add_column(col)
        colour = {"go": "green", "no-go": "red", "needs data": "yellow"}

        def show(e: dict | None, signed: bool = False) -> str:
            if not e:
                return "-"
            fmt = "+.2f" if signed else ".2f"
            return f"{e['value']:{fmt}} [{e['ci_low']:{fmt}}, {e['ci_high']:{fmt}}]"

        for f, r in report["families"].items():
            ps, acc = r["preferred_share"], r["reward_accuracy"]
            table.add_row(
                f,
                f"[{colour[r['verdict']]}]{r['verdict']}[/]",
                r["fit_verdict"],
                f"{acc:.3f}" if acc is not None else "-",
                show(ps["before"]),
                show(ps["after"]),
                show(ps["change"], True),
                r["trend"],
            )
        console.print(table)
        for f, r in report["families"].items():
            console.print(f"[{colour[r['verdict']]}]{f}: {r['verdict']}[/] - {r['reason']}")
        for fl in report["red_flags"]:
            where = f" ({fl['family']})" if fl["family"] else ""
            console.print(f"[bold red]red flag[/] {fl['flag']}{where}: {fl['meaning']} {fl['detail']}.")
        full = report["cost"]["full_run"]
        price = f", about {full['cost']:.2f} {full['currency']}" if full.get("cost") is not None else ""
        console.print(
            f"Full run estimate: {full['hours']:.2f} h on {full['hardware']}{price} (assumptions in the report)"
        )
        console.print(f"Report: {out}/pilot.html (and pilot.md, pilot.json); MLflow run {report.get('mlflow_run_id')}")
        console.print(f"Pilot finished in {report['seconds']:.0f} s.")
        if report["exit_code"]:
            reasons = "; ".join(f"{f}: {r['reason']}" for f, r in report["families"].items())
            raise PreftuneError(f"pilot says no-go for every family: {reasons}", report["exit_code"])
