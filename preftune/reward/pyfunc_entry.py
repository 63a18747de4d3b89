"""MLflow "models from code" entry point of the reward-model pyfunc (see ``mlflow_model.py``)."""

from mlflow.models import set_model

from preftune.reward.mlflow_model import RewardModelPyfunc

set_model(RewardModelPyfunc())
