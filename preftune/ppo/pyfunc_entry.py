"""MLflow "models from code" entry point of the PPO policy pyfunc (see ``mlflow_model.py``)."""

from mlflow.models import set_model

from preftune.ppo.mlflow_model import PolicyPyfunc

set_model(PolicyPyfunc())
