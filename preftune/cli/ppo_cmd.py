"""``preftune ppo``: PPO against a published reward model; resumable with the same command."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("ppo")
    def ppo_cmd(
        reward_model: str = typer.Option(
            ..., "--reward-model", "-r", help="Reward-model folder from `preftune train-reward` (path or s3:// URI)."
        ),
        output: str = typer.Option(..., "--output", "-o", help="Where to publish the trained policy (path or s3://)."),
        config: Path | None = typer.Option(None, "--config", "-c", help="Run config (default: built-in defaults)."),
        policy: str | None = typer.Option(
            None, "--policy", "-p", help="Policy to train (folder, s3:// URI or demo:policy; default: models.policy)."
        ),
        resume: bool = typer.Option(
            True,
            "--resume/--no-resume",
            help="Continue from the newest checkpoint of this output if there is one (default), or start over.",
        ),
        progress: bool | None = typer.Option(
            None, "--progress/--no-progress", help="Show the progress bar (default: ppo.progress)."
        ),
        dataset: str | None = typer.Option(
            None,
            "--dataset",
            "-d",
            help="Preference dataset (collect / check-fit output) whose written answers ppo.demonstration_coef "
            "trains on.",
        ),
    ) -> None:
        """Train the policy with PPO (KL-leashed to its reference) and publish it.

        Checkpoints go to ppo.checkpoint_dir (default: OUTPUT.checkpoints); after a kill, run the same
        command again to resume. Exit codes: 0 published; 2 bad config; 3 bad input; 12 training
        diverged (NaN/inf or KL past ppo.kl_hard_limit; the last good checkpoint is kept);
        143 stopped by SIGTERM after writing a checkpoint.
        """
        from preftune.config import load_config
        from preftune.ppo.step import run_ppo

        cfg = load_config(config)
        if progress is not None:
            cfg.ppo.progress = progress
        result = run_ppo(cfg, reward_model, output, policy, resume=resume, dataset=dataset)
        if result.process_rank != 0:  # data-parallel: process 0 speaks for the run
            return
        f, first = result.final, result.first
        resumed = f" (resumed at update {result.resumed_from})" if result.resumed_from else ""
        typer.echo(
            f"policy published to {result.output} after {result.updates} updates{resumed}: reward "
            f"{first.get('ppo/reward_mean', float('nan')):.3f} -> {f.get('ppo/reward_mean', float('nan')):.3f}, "
            f"KL {result.kl:.3f} nats (budget {result.kl_budget:g}: "
            f"{'within' if result.kl_within_budget else 'EXCEEDED'}); MLflow run {result.mlflow_run_id}"
        )
