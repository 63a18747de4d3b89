"""What a window is compared with: the champion's own evaluation, and the recent windows.

The champion's evaluation is the evaluate run behind the registry version that holds
``@champion`` (its ``preftune.eval_run_id`` tag): the behaviour of every sample the candidate --
now the champion -- wrote on the suite, read from that run's ``evaluation/samples.jsonl``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from preftune.errors import InputError

UNKNOWN = "unknown"


def champion_version(cfg: Any) -> tuple[Any, str | None, str | None]:
    """(client, champion version, previous-champion version) of the registered model."""
    from preftune import tracking
    from preftune.registry import alias_version, get_registered_model, mlflow_client

    tracking.configure(cfg)
    client = mlflow_client(tracking.resolve_tracking_uri(cfg.tracking))
    name = cfg.models.registered_model
    if get_registered_model(client, name) is None:
        return client, None, None
    return (
        client,
        alias_version(client, name, cfg.promotion.champion_alias),
        alias_version(client, name, cfg.promotion.previous_alias),
    )


def champion_eval_counts(client: Any, cfg: Any, version: str, workdir: Path) -> tuple[dict[str, Counter], str | None]:
    """Behaviour counts per family of the champion's own evaluation, and that evaluate run's id."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mv = client.get_model_version(cfg.models.registered_model, version)
    run_id = (mv.tags or {}).get("preftune.eval_run_id")
    if not run_id:
        return {}, None
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="evaluation/samples.jsonl", dst_path=str(workdir)
        )
    except (MlflowException, OSError) as err:
        raise InputError(f"evaluate run {run_id} (behind v{version}): no evaluation/samples.jsonl ({err})") from None
    counts: dict[str, Counter] = {}
    for line in Path(local).read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("model") != "candidate":  # the version promoted was that run's candidate
            continue
        counts.setdefault(rec["family"], Counter())[rec.get("behaviour") or UNKNOWN] += 1
    return counts, run_id


def recent_counts(history: list[dict[str, Any]], version: str | None, n: int) -> dict[str, Counter]:
    """Pooled behaviour counts per family of the last ``n`` windows that observed ``version``."""
    same = [h for h in history if h.get("model_version") == version][-n:]
    pooled: dict[str, Counter] = {}
    for h in same:
        for fam, c in h.get("counts", {}).items():
            pooled.setdefault(fam, Counter()).update({b: int(v) for b, v in c.items()})
    return pooled


def champion_training_data(client: Any, cfg: Any, version: str) -> str | None:
    """URI of the preference dataset the registered ``version`` was trained on, or None when unknown.

    Lineage by content hash, in the same tracking store: the version's ``preftune.dataset_hash`` names
    either a collected dataset (the collect run that published it carries ``preftune.dataset_uri``) or
    check-fit's filtered copy of one (``preftune.fit_dataset_hash`` on the check-fit run, whose
    ``preftune.dataset_hash`` is the collected parent). The collected dataset is returned, families
    check-fit left out included: a retraining run's check-fit judges them again with the new data.
    """
    from preftune.registry import TAG_DATASET_HASH

    mv = client.get_model_version(cfg.models.registered_model, version)
    digest = (mv.tags or {}).get(TAG_DATASET_HASH)
    if not digest or digest == "unknown":
        return None
    experiments = [e.experiment_id for e in client.search_experiments()]

    def one(step: str, tag: str, value: str) -> Any:
        runs = client.search_runs(
            experiments, f"tags.`preftune.step` = '{step}' and tags.`{tag}` = '{value}'", max_results=1
        )
        return runs[0] if runs else None

    collect = one("collect", "preftune.dataset_hash", digest)
    if collect is None:
        fit = one("check-fit", "preftune.fit_dataset_hash", digest)
        if fit is None:
            return None
        collect = one("collect", "preftune.dataset_hash", fit.data.tags.get("preftune.dataset_hash", ""))
        if collect is None:
            return fit.data.tags.get("preftune.fit_dataset_uri")
    return collect.data.tags.get("preftune.dataset_uri")
