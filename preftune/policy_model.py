"""The policy as an MLflow pyfunc model: the candidate ppo logs, evaluate scores and promote
registers -- one LoggedModel per candidate, found again by its content hash.

Why pyfunc around the policy folder rather than ``mlflow.transformers``: the transformers
flavour of a PEFT adapter records only the adapter plus the base model's *Hub* name, to be
downloaded at load time; our clusters may be air-gapped and our bases are local folders. The
pyfunc packs the exact folder that was evaluated (full model or adapter, plus, for an adapter,
its base) and loads it with the same code evaluate uses; serving it answers prompts with text.
Logging it needs no network and no model load (signature and requirements are given).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import mlflow
import yaml

from preftune.common.requirements import pip_requirements

ARTIFACT_KEY = "policy"
BASE_ARTIFACT_KEY = "policy_base"
TAG_MODEL_HASH = "preftune.model_hash"
# Bookkeeping files storage adds to a published or cached folder: not part of the model.
_NOT_CONTENT = {"_PREFTUNE_COMPLETE.json", ".preftune-source.json"}


def folder_hash(path: str | Path) -> str:
    """SHA-256 over the relative paths and bytes of every file of a model folder (16 hex digits).

    Storage's completion marker and cache stamp are left out, so a folder hashes the same as
    written, published and downloaded again."""
    root = Path(path)
    h = hashlib.sha256()
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.name not in _NOT_CONTENT
    )
    for p in files:
        rel = p.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0")
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()[:16]


class PolicyPyfunc(mlflow.pyfunc.PythonModel):
    """Generates a response per ``prompt`` row with the packaged policy folder."""

    def load_context(self, context):  # noqa: ANN001 (MLflow inspects type hints of these two)
        from preftune.generation.policy import load_policy

        folder = Path(context.artifacts[ARTIFACT_KEY])
        base = context.artifacts.get(BASE_ARTIFACT_KEY)
        if base:
            _point_adapter_at(folder, Path(base))
        self.policy = load_policy(folder)

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        import pandas as pd

        from preftune.generation.policy import sample

        params = params or {}
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        prompts = [str(x) for x in df["prompt"]]
        samples = sample(
            self.policy,
            prompts,
            n_samples=1,
            seed=int(params.get("seed", 0)),
            temperature=float(params.get("temperature", 1.0)),
            top_p=float(params.get("top_p", 1.0)),
            top_k=0,
            max_new_tokens=int(params.get("max_new_tokens", 64)),
            batch_size=32,
        )
        return pd.DataFrame({"response": [s.text for s in samples]})


def _point_adapter_at(folder: Path, base: Path) -> None:
    """Re-point a packaged adapter at the packaged base (paths differ after download).

    Handles a plain peft folder (``adapter_config.json``) and ``preftune ppo`` output
    (``ppo_policy.json`` with ``base_path``).
    """
    adapter_cfg = folder / "adapter_config.json"
    if adapter_cfg.is_file():
        cfg = json.loads(adapter_cfg.read_text(encoding="utf-8"))
        if cfg.get("base_model_name_or_path") != str(base):
            cfg["base_model_name_or_path"] = str(base)
            adapter_cfg.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        return
    meta_file = folder / "ppo_policy.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if meta.get("base_path") != str(base):
            meta["base_path"] = str(base)
            meta_file.write_text(json.dumps(meta, indent=2), encoding="utf-8")


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "response")]),
        params=ParamSchema(
            [
                ParamSpec("seed", "long", 0),
                ParamSpec("temperature", "double", 1.0),
                ParamSpec("top_p", "double", 1.0),
                ParamSpec("max_new_tokens", "long", 64),
            ]
        ),
    )


def log_policy_model(folder: Path, name: str, *, base: Path | None = None, tags: dict[str, str] | None = None) -> Any:
    """Log ``folder`` (and an adapter's local base) as a pyfunc model of the active run; returns ModelInfo."""
    artifacts = {ARTIFACT_KEY: str(folder)}
    if base is not None:
        artifacts[BASE_ARTIFACT_KEY] = str(base)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=PolicyPyfunc(),
        artifacts=artifacts,
        signature=signature(),
        pip_requirements=pip_requirements("peft"),
        tags=tags,
    )


def policy_folder_of(model_dir: Path) -> Path:
    """The policy folder inside a downloaded MLflow model directory (read from its MLmodel file).

    An adapter packaged with its base is re-pointed at the downloaded base, so the folder loads
    as it is.
    """
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text(encoding="utf-8"))
    arts = (mlmodel.get("flavors", {}).get("python_function", {}) or {}).get("artifacts", {}) or {}
    if ARTIFACT_KEY not in arts:
        raise KeyError(f"{model_dir}: not a preftune policy model (no '{ARTIFACT_KEY}' artifact in MLmodel)")
    folder = model_dir / arts[ARTIFACT_KEY]["path"]
    if BASE_ARTIFACT_KEY in arts:
        _point_adapter_at(folder, model_dir / arts[BASE_ARTIFACT_KEY]["path"])
    return folder


def find_logged_model(model_hash: str, experiment_id: str | None = None) -> Any | None:
    """The newest LoggedModel of the experiment whose content hash is ``model_hash`` (the one ppo
    logged for this candidate), or None."""
    exp_ids = [experiment_id] if experiment_id else None
    found = mlflow.search_logged_models(
        experiment_ids=exp_ids,
        filter_string=f"tags.`{TAG_MODEL_HASH}` = '{model_hash}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
        max_results=1,
        output_format="list",
    )
    return found[0] if found else None
