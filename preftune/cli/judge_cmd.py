"""``preftune judge check SUITE``: score the suite's judges against its human labels, nothing else.

What evaluate does first, on its own: load the suite and its judges, run every judge a family
uses on that family's labelled responses (the suite's ``calibration`` section), print accuracy,
Cohen's kappa with its interval and each family's verdict. Exit 0 when every family's judge
reaches its kappa floor, 2 (``ConfigError``) when one does not or the suite has no labels.
Nothing is generated and nothing is logged to MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from preftune.errors import ConfigError

app = typer.Typer(help="Check a suite's judges against human labels.", no_args_is_help=True)


@app.command("check")
def check(
    suite: str = typer.Argument(..., help="Suite name (demo-v1) or YAML file (local path or s3:// URI)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Run config (reward model, device, confidence)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Also write the figures as JSON here."),
    show_confusion: bool = typer.Option(False, "--confusion", help="Print each judge's confusion matrix."),
) -> None:
    """Score every judge on the suite's labelled responses; exit 2 if a family's judge is below its kappa floor."""
    from preftune.behaviour.calibration import render_table, require_calibrated
    from preftune.behaviour.judges import load_judges
    from preftune.behaviour.suite import load_suite
    from preftune.common.device import select_device
    from preftune.config import load_config
    from preftune.evaluate.step import run_calibration, torch_threads

    cfg = load_config(config)
    ev = cfg.evaluation
    the_suite = load_suite(suite, reward_model=ev.reward_model, world=cfg.world)
    if the_suite.calibration is None:
        raise ConfigError(f"{the_suite.source}: the suite has no calibration section (human-labelled responses)")
    device = select_device(ev.device, setting="evaluation.device")
    judges = load_judges(the_suite, reward_model=ev.reward_model, device=device)
    with torch_threads(ev.threads):
        report = run_calibration(the_suite, judges, cfg)
    typer.echo(f"judge calibration of {the_suite.id} (sha256 {the_suite.sha256[:16]}):")
    typer.echo(render_table(report))
    if show_confusion:
        for e in report.entries:
            typer.echo(f"\n{e.family} / {e.judge}: rows = people's label, columns = the judge's")
            width = max(len(b) for b in e.labels)
            typer.echo(" " * (width + 2) + "  ".join(b.rjust(width) for b in e.labels))
            for b, row in zip(e.labels, e.confusion, strict=True):
                typer.echo(b.rjust(width) + "  " + "  ".join(str(c).rjust(width) for c in row))
    if output is not None:
        output.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    require_calibrated(report, the_suite)
    typer.echo("every family's judge reaches its kappa floor")
