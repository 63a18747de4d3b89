"""``preftune collect`` and ``preftune check-fit``: the preference dataset and its test of fit.

Contract (scripts and the pipeline rely on it):

- ``preftune collect --from-file PATH [--format auto|NAME] --output DIR [--strict]``
- ``preftune collect --config run.yaml --output DIR`` (generation plus judgement per ``data.judgements``)
- ``preftune collect --config run.yaml --candidates-only --output DIR`` (writes DIR/candidates.jsonl)
- ``preftune check-fit --dataset DIR [--config run.yaml] [--output DIR] [--audit EXPORT] [--accept-unaudited REASON]``

Exit codes: 0 only when a dataset was published (collect) or the run may go on (check-fit);
2 config or usage, 3 bad input (``--strict``: the first dropped or repaired record), 4/5 storage
or tracking unreachable / credentials, 10 check-fit says not fit (report written). On failure
the collect output holds no new dataset.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

# The names of preftune.data.formats.FORMATS (kept literal so that --help needs no import).
ImportFormat = Enum(  # type: ignore[misc]
    "ImportFormat",
    {
        n.replace("-", "_"): n
        for n in (
            "auto", "preftune", "best-of-n", "trl", "ultrafeedback-binarized", "ultrafeedback", "helpsteer",
            "nectar", "shp", "pku-saferlhf", "openai", "hh",
        )
    },
    type=str,
)


def register(app: typer.Typer) -> None:
    """Add the ``collect`` and ``check-fit`` commands to ``app``."""

    @app.command("collect")
    def collect(
        output: str = typer.Option(
            ..., "--output", "-o", help="Folder or s3:// prefix to publish the dataset to ({hash}: the content hash)."
        ),
        from_file: str | None = typer.Option(
            None, "--from-file", help="Import a preference file (JSONL or Parquet, local or s3://)."
        ),
        fmt: ImportFormat = typer.Option(
            ImportFormat.auto, "--format", help="Format of --from-file; auto detects it from the first record."
        ),
        config: Path | None = typer.Option(
            None, "--config", "-c", help="Run config: generation plus judgement (or settings for --from-file)."
        ),
        strict: bool = typer.Option(
            False, "--strict", help="Fail on any dropped or repaired record (the error names file:line and reason)."
        ),
        candidates_only: bool = typer.Option(
            False,
            "--candidates-only",
            help="With --config: only sample candidates and write OUTPUT/candidates.jsonl (for the feedback service).",
        ),
    ) -> None:
        """Build a preference dataset: import a file, or sample candidates and have them judged.

        Publishes train.jsonl / eval.jsonl (split by prompt), judgements.jsonl, validation.json/.md and
        dataset.json (content hash = version) atomically at --output; exit 0 only when it was published.
        """
        from rich.console import Console

        from preftune.config import load_config
        from preftune.errors import ConfigError

        console = Console(soft_wrap=True)  # long URIs and hashes stay on one line in logs
        if from_file is None and config is None:
            raise ConfigError("collect: give --from-file PATH (import) or --config run.yaml (generate and judge)")
        if from_file is not None and candidates_only:
            raise ConfigError(
                "collect: --candidates-only samples from the policy; it does not combine with --from-file"
            )
        if from_file is None and fmt != ImportFormat.auto:
            raise ConfigError("collect: --format applies to --from-file; for --config set data.format in the config")
        cfg = load_config(config)
        if strict:
            cfg.data.strict = True
        if candidates_only:
            from preftune.collect import generate_candidates

            res = generate_candidates(cfg, output)
            g = res.generation
            console.print(
                f"wrote {res.items} items x {g['n_candidates']} candidates to {res.uri} "
                f"({g['candidates_per_s']:.1f} candidates/s, {g['tokens_per_s']:.0f} tokens/s)"
            )
            return
        if from_file is not None:
            from preftune.collect import collect_from_file

            result = collect_from_file(from_file, output, fmt=fmt.value, strict=strict, cfg=cfg)
        else:
            from preftune.collect import collect_from_config

            result = collect_from_config(cfg, output)
        _print_collect(console, result)

    @app.command("check-fit")
    def check_fit(
        dataset: str = typer.Option(..., "--dataset", "-d", help="The dataset folder (or s3:// URI) to test."),
        config: Path | None = typer.Option(None, "--config", "-c", help="Run config (thresholds in its fit section)."),
        output: str | None = typer.Option(
            None,
            "--output",
            "-o",
            help="Publish the dataset passed on (unfit families excluded per fit.on_unfit) and the report here.",
        ),
        audit: str | None = typer.Option(
            None,
            "--audit",
            help="Feedback-service export of this dataset's agreement audit (`preftune audit create`): agreement "
            "and verdicts come from the re-raters (fit.audit.export).",
        ),
        accept_unaudited: str | None = typer.Option(
            None,
            "--accept-unaudited",
            metavar="REASON",
            help="Go on with single-rated data whose agreement was not measured, recording REASON "
            "(fit.accept_unaudited); later runs and the registered model are tagged preftune.fit=unaudited.",
        ),
    ) -> None:
        """Test of fit per family: rater agreement, coverage, data quality, verdict. Exit 10 when no family is fit."""
        from preftune.config import load_config, parse_config
        from preftune.errors import ConfigError
        from preftune.fit import NotFitError, run_check_fit

        cfg = load_config(config)
        if accept_unaudited is not None:
            if not accept_unaudited.strip():
                raise ConfigError('--accept-unaudited: give the reason, e.g. --accept-unaudited "published labels"')
            data = cfg.model_dump(mode="json")
            data["fit"].update(accept_unaudited=True, unaudited_reason=accept_unaudited.strip())
            cfg = parse_config(data, "--accept-unaudited")
        try:
            report = run_check_fit(dataset, cfg, output, audit=audit)
        except NotFitError as err:
            typer.echo(err.report.to_markdown())  # plain markdown: readable in a terminal and in pod logs
            raise
        typer.echo(report.to_markdown())


def _print_collect(console, result) -> None:  # noqa: ANN001 (rich Console, CollectResult; imported lazily)
    from rich.table import Table

    c = result.counts
    console.print(f"published dataset {result.uri}")
    console.print(f"  version (content hash) {result.hash}")
    console.print(
        f"  {c['train_pairs']} train / {c['eval_pairs']} eval pairs over {c['prompts']} prompts "
        f"({c['train_prompts']} / {c['eval_prompts']}), {c['judgements']} judgements; format {result.format}"
    )
    table = Table(title="families")
    for col in ("family", "train pairs", "eval pairs", "prompts", "judgements"):
        table.add_column(col, justify="left" if col == "family" else "right")
    for fam, f in result.families.items():
        table.add_row(fam, str(f["train_pairs"]), str(f["eval_pairs"]), str(f["prompts"]), str(f["judgements"]))
    console.print(table)
    console.print("  sources: " + ", ".join(f"{k}={v}" for k, v in result.sources.items()))
    v = result.validation
    dropped = ", ".join(f"{k}={n}" for k, n in v["dropped"].items()) or "none"
    repaired = ", ".join(f"{k}={n}" for k, n in v["repaired"].items()) or "none"
    console.print(
        f"  records read {v['records_read']}, kept {v['records_kept']}; dropped: {dropped}; repaired: {repaired}"
    )
    if result.generation:
        g = result.generation
        console.print(
            f"  candidates: {g['candidates']} in {g['seconds']:.1f}s on {g['device']} "
            f"({g['candidates_per_s']:.1f} candidates/s, {g['tokens_per_s']:.0f} tokens/s)"
        )
