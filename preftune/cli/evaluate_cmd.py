"""``preftune evaluate``, ``promote``, ``rollback`` and ``models``: the promotion gate and the registry.

Heavy imports (torch, mlflow) happen inside the commands. A failed gate exits with code 13
(``ExitCode.GATE_FAILED``) after printing every reason, so a pipeline or a shell script can
branch on it; the report is written either way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from preftune.errors import ExitCode, PreftuneError


def _quiet_mlflow() -> None:
    """No per-file download bars in CLI output (they would bury the verdict)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _print_gates(console, gates) -> None:  # noqa: ANN001 (rich types imported lazily)
    from rich.table import Table

    table = Table(title="Gates")
    for col in ("gate", "verdict", "judged", "limit"):
        table.add_column(col)
    for g in gates:
        verdict = "[dim]n/a[/]" if g.passed is None else ("[green]pass[/]" if g.passed else "[red]FAIL[/]")
        judged = "n/a" if g.judged is None else f"{g.judged:.4g}"
        limit = "n/a" if g.limit is None else f"{g.limit:.4g}"
        table.add_row(g.name, verdict, judged, limit)
    console.print(table)


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_cmd(
        candidate: str = typer.Argument(
            ..., help="The candidate policy: a folder (PPO output), s3:// URI or models:/ URI."
        ),
        config: Path | None = typer.Option(None, "--config", "-c", help="Run config (default: the embedded defaults)."),
        champion: str | None = typer.Option(
            None, "--champion", help="Compare with: 'registry' (champion alias), 'none', or a model reference."
        ),
        suite: str | None = typer.Option(
            None, "--suite", help="Suite name (demo-v1) or YAML file; overrides the config."
        ),
        output: str | None = typer.Option(None, "--output", "-o", help="Report folder (local or s3://)."),
        reward_model: str | None = typer.Option(None, "--reward-model", help="Reward-model folder for the win rate."),
        fail_on_gate: bool = typer.Option(
            True,
            "--fail-on-gate/--no-fail-on-gate",
            help="Exit 13 when a gate fails (the report is written either way).",
        ),
    ) -> None:
        """Evaluate a candidate and the champion on the behaviour suite; gates, report and MLflow run."""
        from rich.console import Console

        from preftune.config import load_config
        from preftune.evaluate.step import REPORT_HTML, REPORT_MD, evaluate

        _quiet_mlflow()
        cfg = load_config(config)
        console = Console()
        res = evaluate(cfg, candidate, champion=champion, suite=suite, output=output, reward_model=reward_model)
        _print_gates(console, res.gates)
        if res.first_promotion:
            console.print("No champion yet: judged on the absolute gates alone (a first promotion).")
        console.print(f"report: {res.output}/{REPORT_MD} and {REPORT_HTML}; MLflow run {res.run_id}")
        if res.passed:
            console.print(f"[green]PASSED[/]: all {sum(g.passed is not None for g in res.gates)} gates")
        elif fail_on_gate:
            raise PreftuneError(f"{len(res.reasons)} gate(s) failed: " + "; ".join(res.reasons), ExitCode.GATE_FAILED)
        else:
            console.print(f"[red]FAILED[/]: {len(res.reasons)} gate(s): " + "; ".join(res.reasons))

    @app.command("promote")
    def promote_cmd(
        candidate: str = typer.Argument(..., help="The candidate policy that was evaluated."),
        config: Path | None = typer.Option(None, "--config", "-c", help="Run config (default: the embedded defaults)."),
        eval_run: str | None = typer.Option(
            None, "--eval-run", help="MLflow run id of its evaluation; without it, the candidate is evaluated now."
        ),
        dataset_hash: str | None = typer.Option(None, "--dataset-hash", help="Preference dataset hash (audit tag)."),
        reward_model_version: str | None = typer.Option(
            None, "--reward-model-version", help="Reward model version (audit tag); default: the reward folder's hash."
        ),
        user: str | None = typer.Option(None, "--user", help="Who promotes (default: $PREFTUNE_USER or the OS user)."),
    ) -> None:
        """Register the candidate and make it champion, only if every gate passed (else exit 13)."""
        from preftune.config import load_config
        from preftune.evaluate.promote import promote

        _quiet_mlflow()
        cfg = load_config(config)
        res = promote(
            cfg,
            candidate,
            eval_run_id=eval_run,
            dataset_hash=dataset_hash,
            reward_model_version=reward_model_version,
            user=user,
        )
        for note in res.notes:
            typer.echo(note)
        res.raise_for_status()
        prev = f" (previous champion v{res.previous} is now '{cfg.promotion.previous_alias}')" if res.previous else ""
        alias = cfg.promotion.champion_alias
        typer.echo(f"registered {res.registered_model} v{res.version}; '{alias}' -> v{res.version}{prev}")

    @app.command("rollback")
    def rollback_cmd(
        to: str = typer.Option(..., "--to", help="The version to make champion again."),
        reason: str = typer.Option(..., "--reason", help="Why (recorded on the version, the model and an MLflow run)."),
        config: Path | None = typer.Option(None, "--config", "-c", help="Run config (default: the embedded defaults)."),
        user: str | None = typer.Option(
            None, "--user", help="Who rolls back (default: $PREFTUNE_USER or the OS user)."
        ),
    ) -> None:
        """Move the champion alias back to an earlier version, recording who and why."""
        from preftune.config import load_config
        from preftune.registry import rollback

        _quiet_mlflow()
        cfg = load_config(config)
        rec = rollback(cfg, to, reason, user)
        typer.echo(
            f"{cfg.models.registered_model}: '{cfg.promotion.champion_alias}' v{rec['from']} -> v{rec['to']} "
            f"by {rec['by']}: {rec['reason']}"
        )

    @app.command("models")
    def models_cmd(
        config: Path | None = typer.Option(None, "--config", "-c", help="Run config (default: the embedded defaults)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """List the registered model's versions with their gate results, and which is champion."""
        from rich.console import Console
        from rich.table import Table

        from preftune.config import load_config
        from preftune.registry import list_versions

        cfg = load_config(config)
        info = list_versions(cfg)
        if as_json:
            typer.echo(json.dumps(info, indent=2))
            return
        console = Console()
        if not info["exists"]:
            console.print(f"registered model {info['name']!r} has no versions yet in {info['uri']}")
            return
        table = Table(title=f"{info['name']} ({info['uri']})")
        for col in ("version", "aliases", "gates", "pass/fail", "suite", "eval run", "dataset", "created", "note"):
            table.add_column(col)
        for v in info["versions"]:
            note = []
            if v["first_promotion"]:
                note.append("first promotion (absolute gates only)")
            if v["rollback"]:
                r = v["rollback"]
                note.append(f"rolled back to by {r['by']}: {r['reason']}")
            aliases = ", ".join(v["aliases"])
            if cfg.promotion.champion_alias in v["aliases"]:
                aliases = f"[bold green]{aliases}[/]"
            table.add_row(
                v["version"],
                aliases,
                v["gates"],
                f"{v['gates_passed']}/{v['gates_failed']}",
                v["suite"] or "",
                (v["eval_run_id"] or "")[:12],
                (v["dataset_hash"] or "")[:12],
                v["created"][:19],
                "; ".join(note),
            )
        console.print(table)
        champion = info.get("champion")
        console.print(f"champion: v{champion}" if champion else "no champion yet")
        if info.get("lock"):
            console.print(f"[yellow]promotion lock held[/]: {info['lock']}")
