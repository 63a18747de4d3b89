"""``preftune config``: write, publish the schema of, and check run configs."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from preftune.errors import ConfigError

app = typer.Typer(help="Write an example run config, print its JSON schema, or validate a file.", no_args_is_help=True)


@app.command("init")
def init(
    path: Path = typer.Argument(Path("run.yaml"), help="Where to write the example config."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a commented run config with every field at its default."""
    from preftune.config import example_yaml
    from preftune.storage import atomic_write_text

    if path.exists() and not force:
        raise ConfigError(f"{path}: already exists (use --force to overwrite)")
    atomic_write_text(path, example_yaml())
    typer.echo(f"wrote {path}")


@app.command("schema")
def schema(
    output: Path | None = typer.Option(None, "--output", "-o", help="Write to a file instead of stdout."),
) -> None:
    """Print the JSON schema of the run config."""
    from preftune.config import json_schema
    from preftune.storage import atomic_write_text

    text = json.dumps(json_schema(), indent=2, sort_keys=False) + "\n"
    if output is None:
        typer.echo(text, nl=False)
    else:
        atomic_write_text(output, text)
        typer.echo(f"wrote {output}")


@app.command("validate")
def validate(path: Path = typer.Argument(..., help="The run config to check.")) -> None:
    """Check a run config; prints its hash when valid."""
    from preftune.config import load_config

    cfg = load_config(path)
    typer.echo(f"{path}: valid (config hash {cfg.config_hash()})")
