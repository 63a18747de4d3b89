"""The ``preftune`` command line.

Heavy libraries (torch, transformers, mlflow) are imported inside the commands, never at
module level, so that ``preftune --help`` answers at once. User errors
(:class:`~preftune.errors.PreftuneError`) print one line and exit with their code.
"""

from __future__ import annotations

import os
import sys

# Before torch is imported by any command: OpenMP threads that busy-wait make CPU training
# 10-20x slower on a busy machine or a CPU-limited pod.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer

from preftune import __version__
from preftune.cli import (
    audit_cmd,
    collect_cmd,
    config_cmd,
    demo_cmd,
    evaluate_cmd,
    judge_cmd,
    kube_cmd,
    observe_cmd,
    pilot_cmd,
    pipeline_cmd,
    ppo_cmd,
    reward_cmd,
    serve_cmd,
)
from preftune.errors import PreftuneError

app = typer.Typer(
    name="preftune",
    help="Change which behaviour a language model chooses, with human preferences and PPO.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"preftune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Change which behaviour a language model chooses, with human preferences and PPO.

    One retraining run: collect -> check-fit -> train-reward -> ppo -> evaluate -> promote.
    """


app.add_typer(config_cmd.app, name="config")
app.add_typer(audit_cmd.app, name="audit")
app.add_typer(kube_cmd.app, name="kube")
app.add_typer(observe_cmd.app, name="observe")
app.add_typer(judge_cmd.app, name="judge")
demo_cmd.register(app)
collect_cmd.register(app)
reward_cmd.register(app)
ppo_cmd.register(app)
evaluate_cmd.register(app)
pipeline_cmd.register(app)
pilot_cmd.register(app)
serve_cmd.register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning user errors into one line and an exit code."""
    try:
        app(args=argv, standalone_mode=False)
    except PreftuneError as err:
        typer.secho(f"error: {err.message}", fg=typer.colors.RED, err=True)
        sys.exit(err.exit_code)
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except typer.TyperException as err:  # usage errors (bad option, unknown command) in non-standalone mode
        show = getattr(err, "show", None)
        if show is not None:
            show()
        else:
            typer.echo(f"error: {err}", err=True)
        sys.exit(getattr(err, "exit_code", 2))
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
