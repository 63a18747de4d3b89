"""The trained policy as an MLflow pyfunc model: prompts in, sampled responses out.

Why pyfunc and not ``mlflow.transformers``: the transformers flavour records a Hub repository
for the base of a PEFT adapter (unusable on an air-gapped cluster) and re-validates against its
own list of supported versions. The pyfunc wraps the published policy folder (see
:mod:`preftune.ppo.artifacts`) and generates exactly the way PPO sampled: input column
``prompt`` (raw user text), output column ``response``; params ``max_new_tokens``,
``temperature`` and ``seed``. Logged "from code" (``pyfunc_entry.py``) so loading never unpickles.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

ARTIFACT_KEY = "policy"
DEFAULT_MAX_NEW_TOKENS = 48
DEFAULT_TEMPERATURE = 1.0
GENERATION_BATCH = 32


class PolicyPyfunc(mlflow.pyfunc.PythonModel):
    """Samples one response per prompt row with the packaged policy."""

    def load_context(self, context: Any) -> None:
        from preftune.ppo.artifacts import load_policy

        self.model, self.tokenizer = load_policy(context.artifacts[ARTIFACT_KEY])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from preftune.ppo.artifacts import generate

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        p = params or {}
        responses = generate(
            self.model,
            self.tokenizer,
            [str(x) for x in df["prompt"]],
            max_new_tokens=int(p.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
            temperature=float(p.get("temperature", DEFAULT_TEMPERATURE)),
            seed=int(p.get("seed", 0)),
            batch_size=GENERATION_BATCH,
        )
        return pd.DataFrame({"response": responses})


def signature(max_new_tokens: int, temperature: float) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "response")]),
        params=ParamSchema(
            [
                ParamSpec("max_new_tokens", "long", max_new_tokens),
                ParamSpec("temperature", "double", temperature),
                ParamSpec("seed", "long", 0),
            ]
        ),
    )


def pip_requirements() -> list[str]:
    """Pinned to what trained the policy; explicit so MLflow need not load the model to infer them."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("preftune", "torch", "transformers", "tokenizers", "safetensors", "peft", "pandas", "numpy"):
        try:
            v = version(name)
        except PackageNotFoundError:
            continue
        out.append(f"{name}=={v.split('+')[0]}")
    return out


def log_policy_model(folder: Path, *, max_new_tokens: int, temperature: float, name: str = "policy") -> Any:
    """Log ``folder`` (a published PPO policy folder) as a pyfunc model of the active run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example.*", category=UserWarning)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
            artifacts={ARTIFACT_KEY: str(folder)},
            signature=signature(max_new_tokens, temperature),
            pip_requirements=pip_requirements(),
        )
