"""Moved to :mod:`preftune.policy_model`; kept so that registered versions whose pickled pyfunc
names ``preftune.evaluate.mlflow_model.PolicyPyfunc`` still load."""

from preftune.policy_model import *  # noqa: F401,F403
from preftune.policy_model import PolicyPyfunc, log_policy_model, policy_folder_of  # noqa: F401
