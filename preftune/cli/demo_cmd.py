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
        observe: bool = typer.Option(
            False,
            "--observe",
            help="Then simulate a week of production for the promoted champion: a new jailbreak style on day 4, "
            "observe flags it and the hard cases go through a retraining run (table and plot of the shares per day).",
        ),
        days: int = typer.Option(7, "--days", min=2, max=31, help="With --observe: days of production traffic."),
        per_day: int = typer.Option(240, "--per-day", min=40, help="With --observe: production answers a day."),
    ) -> None:
        """Run the whole preference-retraining pipeline locally on the demo world, and show what changed.

        Everything runs on this machine with kfp's local runner: the world (corpus, tokenizer, tiny
        policy) is built once and cached under the preftune home, results go to the local MLflow
        store, and a second demo reuses the step cache. Exits with the pipeline's code (0 promoted;
        10/11/13 a gate stopped it, champion unchanged). With --observe, exits 0 once the week ran
        and the retrained champion took over (docs/observe.md, "The demo's loop").
        """
        from preftune.config import load_config
        from preftune.demo import run_demo, run_demo_observe

        cfg = load_config(config)
        if observe:
            from preftune.observe.demo_loop import ObserveDemoSettings

            settings = ObserveDemoSettings(days=days, per_day=per_day)
            result = run_demo_observe(cfg, settings, samples_per_prompt=samples, verbose=verbose)
        else:
            result = run_demo(cfg, samples_per_prompt=samples, verbose=verbose)
        if result.get("error") is not None:
            raise result["error"]
