"""``preftune demo``: the product's main job on the embedded defaults (demo world, local MLflow)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    # The demo runs the pipeline: its commands (run, compile, schedule) come with it (registering is idempotent).
    from preftune.cli import pipeline_cmd

    pipeline_cmd.register(app)

    @app.command("demo")
    def demo(
        config: Path | None = typer.Option(
            None, "--config", "-c", help="Run config (default: the embedded demo config)."
        ),
        samples: int = typer.Option(8, "--samples", min=1, help="Samples per held-out prompt for the behaviour table."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Show every pipeline task's log."),
    ) -> None:
        """Run the whole preference-retraining pipeline locally on the demo world, and show what changed.

        Everything runs on this machine with kfp's local runner: the world (corpus, tokenizer, tiny
        policy) is built once and cached under the preftune home, results go to the local MLflow
        store, and a second demo reuses the step cache. Exits with the pipeline's code (0 promoted;
        10/11/13 a gate stopped it, champion unchanged).
        """
        from preftune.config import load_config
        from preftune.demo import run_demo

        result = run_demo(load_config(config), samples_per_prompt=samples, verbose=verbose)
        if result.get("error") is not None:
            raise result["error"]
