"""``preftune kube``: Kubernetes manifests generated from the run config."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Kubernetes manifests generated from the run config.", no_args_is_help=True)


@app.command("trainjob")
def trainjob(
    reward_model: str = typer.Option(
        ..., "--reward-model", "-r", help="Reward-model folder every node can read (s3:// URI or shared-volume path)."
    ),
    output: str = typer.Option(..., "--output", "-o", help="Where the nodes publish the policy (s3:// URI)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Run config (default: built-in defaults)."),
    name: str | None = typer.Option(
        None, "--name", help="TrainJob name (default: kubernetes.trainer.name_prefix-hash)."
    ),
    namespace: str | None = typer.Option(None, "--namespace", "-n", help="Namespace (default: kubernetes.trainer)."),
    file: Path | None = typer.Option(None, "--file", "-f", help="Write the manifest here instead of to stdout."),
) -> None:
    """Print the Kubeflow Trainer TrainJob that runs `preftune ppo` across nodes (for `kubectl apply -f -`).

    Nodes, processes per node and the runtime come from kubernetes.trainer; image and per-node
    resources from kubernetes.image and kubernetes.steps.ppo. Exit code 2 when the config cannot be
    split over the processes or an input is a path the nodes cannot see.
    """
    import yaml

    from preftune.config import load_config
    from preftune.kube.trainjob import trainjob_manifest
    from preftune.storage import atomic_write_text

    cfg = load_config(config)
    manifest = trainjob_manifest(cfg, reward_model, output, name=name, namespace=namespace)
    text = yaml.safe_dump(manifest, sort_keys=False, width=120)
    if file is None:
        typer.echo(text, nl=False)
    else:
        atomic_write_text(file, text)
        typer.echo(f"wrote {file} (TrainJob {manifest['metadata']['name']})")


@app.command("doctor")
def doctor(
    config: Path | None = typer.Option(None, "--config", "-c", help="Run config (default: built-in defaults)."),
    namespace: str | None = typer.Option(
        None, "--namespace", "-n", help="Namespace of a namespaced TrainingRuntime (default: kubernetes.trainer)."
    ),
) -> None:
    """Check the cluster (kubeconfig or in-cluster) for Kubeflow Trainer >= v2.2 and the configured runtime.

    Exit code 2 when a check fails (Trainer missing or too old, runtime absent), 4 when the API server
    cannot be reached.
    """
    from preftune.config import load_config
    from preftune.kube import doctor as doc
    from preftune.kube.trainjob import current_namespace

    cfg = load_config(config)
    apiext, custom = doc.clients()
    ns = namespace or cfg.kubernetes.trainer.namespace or current_namespace()
    checks = doc.check_cluster(cfg, apiext=apiext, custom=custom, namespace=ns)
    for c in checks:
        typer.echo(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    doc.require_ready(checks)
