"""``preftune observe run``: one observation window of the champion in production.

Exit codes: 0 ok (or no new data), 20 drift, 21 regression (a forbidden share over its gate), and
the usual 2-5 for config, input, reachability and credentials. A CronJob that runs it every window
alerts on 20/21; the figures are in MLflow and on the Pushgateway either way.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Observe the champion's behaviour in production.", no_args_is_help=True)


@app.command("run")
def run_cmd(
    config: Path | None = typer.Option(None, "--config", "-c", help="Run config (the observe section)."),
    source: str | None = typer.Option(
        None, "--source", help="Logs to read (file, folder or s3:// prefix); overrides observe.source.path."
    ),
    output: str | None = typer.Option(None, "--output", "-o", help="Also write the window's files here."),
    to_service: str | None = typer.Option(
        None, "--to-service", help="Feedback service URL: hard cases become rating tasks ($PREFTUNE_ADMIN_TOKEN)."
    ),
    policy: str | None = typer.Option(
        None, "--policy", help="Where fresh candidates for the hard cases come from (default: the champion)."
    ),
    on_regression: str | None = typer.Option(
        None, "--on-regression", help="'report' or 'rollback' (overrides observe.on_regression)."
    ),
) -> None:
    """Read the new production answers, judge them, test for drift and regression, act."""
    from rich.console import Console
    from rich.table import Table

    from preftune.config import load_config
    from preftune.errors import ConfigError, PreftuneError
    from preftune.observe import observe_window

    if on_regression not in (None, "report", "rollback"):
        raise ConfigError(f"--on-regression {on_regression!r}: expected report or rollback")
    cfg = load_config(config)
    res = observe_window(
        cfg, source=source, output=output, to_service=to_service, policy=policy, on_regression=on_regression
    )
    console = Console()
    table = Table(title=f"observe {res.window['window']}: {len(res.records)} answers")
    for col in ("family", "behaviour", "share", "interval"):
        table.add_column(col)
    for fam, versions in sorted(res.shares.items()):
        for version, shares in sorted(versions.items()):
            for b, s in shares.items():
                if s.k:
                    table.add_row(f"{fam} (v{version})", b, f"{s.share:.3f}", f"[{s.low:.3f}, {s.high:.3f}]")
    console.print(table)
    console.print(
        f"new prompt types: {res.new_prompt_share:.1%}; judge failures: {res.judge_errors}; "
        f"hard cases: {len(res.hard_cases)}; MLflow run {res.mlflow_run_id}"
    )
    for reason in res.reasons():
        console.print(f"  - {reason}")
    for action in res.actions:
        console.print(f"  action: {action.get('action')}: {'done' if action.get('done', True) else action.get('why')}")
    colour = {"ok": "green", "no_data": "green", "drift": "yellow", "regression": "red"}[res.verdict]
    console.print(f"verdict: [{colour}]{res.verdict}[/]")
    if res.exit_code:
        raise PreftuneError(
            f"observe {res.window['window']}: {res.verdict}: " + "; ".join(res.reasons()), res.exit_code
        )
