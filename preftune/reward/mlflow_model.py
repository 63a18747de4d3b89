"""The reward model as an MLflow pyfunc model.

Why pyfunc and not ``mlflow.transformers``: the transformers flavour serves pipelines, and a
one-label "text-classification" pipeline squashes the score through a sigmoid, which is not
a reward; it also re-validates the model against its own list of supported transformers
versions. The pyfunc wraps :class:`~preftune.scoring.model.RewardScorer` over the same folder
that train-reward publishes, so MLflow serving returns exactly the rewards PPO sees:
input columns ``prompt`` and ``response``, output column ``reward`` (param ``normalize``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from preftune.common.requirements import pip_requirements
from preftune.scoring.metadata import ARTIFACT_KEY


class RewardModelPyfunc(mlflow.pyfunc.PythonModel):
    """Scores prompt/response rows with the packaged reward-model folder."""

    def load_context(self, context: Any) -> None:
        from preftune.scoring.model import RewardScorer

        self.scorer = RewardScorer.load(context.artifacts[ARTIFACT_KEY])

    # pd.DataFrame: a type hint MLflow accepts without deriving a schema (the signature is explicit)
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        normalize = bool((params or {}).get("normalize", False))
        rewards = self.scorer.score(
            [str(x) for x in df["prompt"]], [str(x) for x in df["response"]], normalize=normalize
        )
        return pd.DataFrame({"reward": rewards.numpy().astype("float64")})


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "response")]),
        outputs=Schema([ColSpec("double", "reward")]),
        params=ParamSchema([ParamSpec("normalize", "boolean", False)]),
    )


def log_reward_model(folder: Path, name: str = "reward_model") -> Any:
    """Log ``folder`` (a published reward-model folder) as a pyfunc model of the active run.

    Logged "from code" (``pyfunc_entry.py``, MLflow's recommended way) rather than as a
    cloudpickled object, so loading it never unpickles code. No input example: that would
    make MLflow load and run the model once more just to log it.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example.*", category=UserWarning)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
            artifacts={ARTIFACT_KEY: str(folder)},
            signature=signature(),
            pip_requirements=pip_requirements(),
        )
