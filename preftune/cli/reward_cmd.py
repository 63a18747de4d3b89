"""``preftune train-reward``: train, gate and publish the pairwise reward model."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("train-reward")
    def train_reward_cmd(
        dataset: str = typer.Option(
            ..., "--dataset", "-d", help="Preference dataset folder (local path or s3:// URI)."
        ),
        output: str = typer.Option(
            ..., "--output", "-o", help="Where to publish the reward model (path or s3:// URI)."
        ),
        config: Path | None = typer.Option(None, "--config", "-c", help="Run config (default: built-in defaults)."),
        device: str | None = typer.Option(
            None, "--device", help="Torch device, e.g. cpu or cuda:0 (default: GPU if any)."
        ),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar with ETA."),
    ) -> None:
        """Train a Bradley-Terry reward model on a preference dataset and publish it if it passes the gate.

        Exit codes: 0 published; 3 bad input; 11 held-out accuracy below reward.min_accuracy
        (nothing published); 12 the loss diverged.
        """
        from preftune.config import load_config
        from preftune.reward.step import train_reward

        result = train_reward(load_config(config), dataset, output, progress=progress, device=device)
        fams = ", ".join(f"{f} {a:.3f}" for f, a in result.per_family.items())
        typer.echo(
            f"reward model published to {result.output}: held-out accuracy {result.eval_accuracy:.3f} ({fams}); "
            f"reward mean {result.metadata.reward_mean:.3f}, std {result.metadata.reward_std:.3f}; "
            f"MLflow run {result.mlflow_run_id}"
        )
