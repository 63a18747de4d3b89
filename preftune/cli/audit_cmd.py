"""``preftune audit``: measure rater agreement on single-rated data with a re-rated sample.

- ``preftune audit create --dataset D --output DIR [--import | --service-url URL]``: a stratified
  sample per family becomes feedback-service tasks (``DIR/tasks.jsonl``, original choice hidden,
  order randomised) and a plan (``DIR/audit.json``); ``--import`` puts the tasks in the feedback
  database (``PREFTUNE_DATABASE_URL``), ``--service-url`` through the admin API.
- ``preftune audit status --audit DIR [--export FILE | --service-url URL]``: per family, sampled
  items with judgements and with K of them (from the database by default).
- ``preftune audit simulate --dataset D --audit DIR --output EXPORT``: the demo world's simulated
  re-raters judge the tasks and write a service-style export (tests, demos).

Then ``preftune check-fit --dataset D --audit EXPORT`` gives per-family verdicts from the audit.
See :mod:`preftune.fit.audit`.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(name="audit", no_args_is_help=True, help="Agreement audit of single-rated data (re-rated sample).")

_TOKEN_HELP = "Admin token of the feedback service (default $PREFTUNE_ADMIN_TOKEN)."


def _load(config: Path | None):  # noqa: ANN202 - (RunConfig, Storage)
    from preftune.config import load_config
    from preftune.storage import Storage

    cfg = load_config(config)
    return cfg, Storage.from_config(cfg.storage)


@app.command("create")
def create(
    dataset: str = typer.Option(..., "--dataset", "-d", help="The imported dataset (folder or s3:// URI)."),
    output: str = typer.Option(..., "--output", "-o", help="Folder (or s3:// prefix) for audit.json and tasks.jsonl."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Run config (fit.audit: per_family, raters)."),
    per_family: int | None = typer.Option(None, "--per-family", min=2, help="Pairs per family (fit.audit.per_family)."),
    raters: int | None = typer.Option(None, "--raters", min=2, max=20, help="Raters per pair, K (fit.audit.raters)."),
    do_import: bool = typer.Option(
        False, "--import", help="Import the tasks into the feedback database (PREFTUNE_DATABASE_URL)."
    ),
    service_url: str | None = typer.Option(
        None, "--service-url", help="Import the tasks through a running feedback service's admin API."
    ),
    token: str | None = typer.Option(None, "--token", envvar="PREFTUNE_ADMIN_TOKEN", help=_TOKEN_HELP),
) -> None:
    """Sample pairs per family as rating tasks for K raters (original choice hidden, order randomised)."""
    from preftune.data.dataset import load_dataset
    from preftune.errors import ConfigError
    from preftune.fit.audit import import_tasks_over_http, import_tasks_to_database, plan_audit, write_plan

    if do_import and service_url:
        raise ConfigError("--import and --service-url: choose one way to hand the tasks to the service")
    cfg, storage = _load(config)
    k = raters or cfg.fit.audit.raters
    plan = plan_audit(
        load_dataset(dataset, storage), per_family=per_family or cfg.fit.audit.per_family, raters=k, seed=cfg.run.seed
    )
    uris = write_plan(plan, output, storage)
    fams = ", ".join(f"{f} {n}" for f, n in plan.families.items())
    typer.echo(f"audit of {dataset}: {len(plan.tasks)} pairs ({fams}), {k} raters each")
    typer.echo(f"  plan {uris['manifest']}")
    typer.echo(f"  tasks {uris['tasks']} (preftune.candidates v1)")
    result = None
    if do_import:
        result = import_tasks_to_database(plan.tasks_jsonl(), source=uris["tasks"])
    elif service_url:
        result = import_tasks_over_http(plan.tasks_jsonl(), service_url, token)
    if result is not None:
        typer.echo(f"  imported {result['imported']} task(s) ({result['unchanged']} already present)")
        have = result.get("ratings_per_task")
        if have is not None and int(have) < k:
            typer.secho(
                f"warning: the service hands each task to {have} rater(s) (PREFTUNE_RATINGS_PER_TASK); the audit "
                f"wants {k}: set PREFTUNE_RATINGS_PER_TASK={k} on the service",
                fg=typer.colors.YELLOW,
                err=True,
            )
    else:
        typer.echo(f"  hand them to the service: preftune serve import-tasks {uris['tasks']}")
    typer.echo(
        f"next: raters judge them; `preftune audit status --audit {output}`; then `preftune serve export -o "
        f"EXPORT` and `preftune check-fit --dataset {dataset} --audit EXPORT`"
    )


@app.command("status")
def status(
    audit: str = typer.Option(..., "--audit", "-a", help="The audit folder (or its audit.json)."),
    export: str | None = typer.Option(None, "--export", help="Read judgements from this service export instead."),
    service_url: str | None = typer.Option(None, "--service-url", help="Read them through the service's admin API."),
    token: str | None = typer.Option(None, "--token", envvar="PREFTUNE_ADMIN_TOKEN", help=_TOKEN_HELP),
    config: Path | None = typer.Option(None, "--config", "-c", help="Run config (storage settings)."),
) -> None:
    """Per family: sampled items, items with judgements, items with K judgements."""
    from rich.console import Console
    from rich.table import Table

    from preftune.fit.audit import (
        audit_status,
        export_from_database,
        export_over_http,
        read_export,
        read_manifest,
    )

    _cfg, storage = _load(config)
    manifest = read_manifest(audit, storage)
    if export:
        records = read_export(export, storage)
    elif service_url:
        records = export_over_http(service_url, token)
    else:
        records = export_from_database()
    st = audit_status(manifest, records)
    table = Table(title=f"audit of {manifest['dataset']['uri']} ({st['raters']} raters per pair)")
    for col in ("family", "pairs", "with a judgement", f"with {st['raters']}", "judgements"):
        table.add_column(col, justify="left" if col == "family" else "right")
    for fam, f in st["families"].items():
        table.add_row(fam, str(f["items"]), str(f["started"]), str(f["complete"]), str(f["judgements"]))
    console = Console()
    console.print(table)
    if st["done"]:
        console.print("complete: export the judgements and run check-fit --audit EXPORT")
    else:
        console.print(f"{st['complete']} of {st['items']} pairs have {st['raters']} judgements")


@app.command("simulate")
def simulate(
    dataset: str = typer.Option(..., "--dataset", "-d", help="The audited dataset."),
    audit: str = typer.Option(..., "--audit", "-a", help="The audit folder written by `audit create`."),
    output: str = typer.Option(..., "--output", "-o", help="The export to write (preftune.judgement v1 JSONL)."),
    accuracy: float = typer.Option(0.9, "--accuracy", min=0.0, max=1.0, help="Chance a rater picks the original."),
    family_accuracy: list[str] = typer.Option(
        [], "--family-accuracy", help="FAMILY=ACCURACY, per family (repeatable)."
    ),
    config: Path | None = typer.Option(None, "--config", "-c", help="Run config (seed, storage)."),
) -> None:
    """The demo world's simulated re-raters judge the audit's tasks (for tests and demos; no service)."""
    import json

    from preftune.data.dataset import load_dataset
    from preftune.errors import ConfigError
    from preftune.fit.audit import read_manifest, simulate_audit

    per_family: dict[str, float] = {}
    for item in family_accuracy:
        name, sep, value = item.rpartition("=")
        try:
            per_family[name] = float(value)
        except ValueError:
            name = ""
        if not sep or not name:
            raise ConfigError(f"--family-accuracy {item!r}: expected FAMILY=ACCURACY, e.g. tone=0.6")
    cfg, storage = _load(config)
    manifest = read_manifest(audit, storage)
    tasks_uri = (audit.rsplit("/", 1)[0] if audit.endswith(".json") else audit.rstrip("/")) + "/tasks.jsonl"
    tasks = [json.loads(line) for line in storage.read_text(tasks_uri).splitlines() if line.strip()]
    records = simulate_audit(
        load_dataset(dataset, storage),
        manifest,
        tasks,
        accuracy=accuracy,
        family_accuracy=per_family,
        seed=cfg.run.seed,
    )
    storage.write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    typer.echo(f"wrote {len(records)} simulated judgement(s) of {len(tasks)} task(s) to {output}")
