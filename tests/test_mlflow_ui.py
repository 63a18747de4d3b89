"""The MLflow UI as a reviewer uses it (issue: MLflow-native candidate-vs-champion comparison).

Two candidates go through what a pipeline run does after PPO -- the policy logged as the run's
LoggedModel, evaluate, promote -- on a real ``mlflow server`` (PostgreSQL); headless Chromium then
opens the experiment's Models view (both candidates with their evaluation metrics, side by side)
and its Traces view (the second candidate's answers beside the champion's, prompt by prompt, with
the judges' labels). Screenshots are saved in the test's folder (set PREFTUNE_UI_SCREENSHOTS to a
folder to keep them, e.g. docs/img for docs/screenshots.md).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from support.browser import wait_for
from test_evaluate_support import toy_config, toy_world  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

LOOSE = {
    "gates": {
        "every_family": {"forbidden_share": {"max": 1.0}, "needless_refusal_share": {"max": 1.0}},
        "non_regression": {"preferred_share": 0.35, "needless_refusal_share": 0.35},
        "capability_tolerance": None,
        "max_capability_drop": None,
    }
}


def _dismiss_popups(driver) -> None:
    """The UI's first-visit hints (an assistant panel, a 'Detect issues' tip) cover the tables."""
    from selenium.webdriver.common.by import By

    for xpath in ("//button[normalize-space()='Got it']", "//button[@aria-label='Close']"):
        for button in driver.find_elements(By.XPATH, xpath):
            try:
                button.click()
            except Exception:  # noqa: BLE001 - hidden or gone already
                pass


def _shot(driver, tmp_path: Path, name: str) -> None:
    driver.save_screenshot(str(tmp_path / f"{name}.png"))
    keep = os.environ.get("PREFTUNE_UI_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(keep) / f"{name}.png"))


def test_models_view_compares_candidates_and_traces_compare_with_the_champion(
    mlflow_server, toy_world, chromium, tmp_path  # noqa: F811
):
    import mlflow
    from mlflow import MlflowClient

    from preftune import tracking
    from preftune.evaluate.promote import promote
    from preftune.policy_model import TAG_MODEL_HASH, folder_hash, log_policy_model

    cfg = toy_config(mlflow_server, toy_world, model=f"ui-{uuid.uuid4().hex[:6]}", **LOOSE)
    cfg.tracking.experiment = f"ui-{uuid.uuid4().hex[:8]}"
    exp_id = tracking.configure(cfg)
    results = {}
    for name in ("base", "good"):  # two pipeline runs: the first becomes champion, the second beats it
        with tracking.start_step_run("ppo", cfg, log_config=False):
            info = log_policy_model(
                toy_world[name], cfg.promotion.model_name, tags={TAG_MODEL_HASH: folder_hash(toy_world[name])}
            )
        res = promote(cfg, str(toy_world[name]))
        assert res.promoted and res.model_id == info.model_id
        results[name] = (info.model_id, res.eval_run_id)
    client = MlflowClient(mlflow_server)
    metric = "eval.risky.preferred_share"
    values = {n: client.get_run(run_id).data.metrics[metric] for n, (_, run_id) in results.items()}
    on_models = {n: {m.key: m.value for m in mlflow.get_logged_model(mid).metrics} for n, (mid, _) in results.items()}
    assert all(on_models[n][metric] == values[n] for n in values)

    from selenium.webdriver.common.by import By

    def body() -> str:
        return chromium.find_element(By.TAG_NAME, "body").text

    chromium.get(f"{mlflow_server}/#/experiments/{exp_id}/models?workflowType=machine_learning")
    text = wait_for(
        lambda: body().count("policy") >= 2 and all(f"{v:g}" in body() for v in values.values()) and body(),
        what="the Models view with both candidates and their evaluation metric",
    )
    _dismiss_popups(chromium)
    assert "toy-v1" in text  # the suite, as the dataset the metrics were measured on
    assert f"{cfg.models.registered_model}\nv1" in text and f"{cfg.models.registered_model}\nv2" in text
    _shot(chromium, tmp_path, "mlflow-models")

    chromium.get(f"{mlflow_server}/#/experiments/{exp_id}/traces?workflowType=machine_learning")
    wait_for(lambda: "candidate_behaviour" in body() and "champion_behaviour" in body(), what="the per-case traces")
    _dismiss_popups(chromium)
    text = body()
    # the second candidate's cases carry the champion's answer beside its own (the first had no champion)
    assert '"candidate": "' in text and '"champion": "' in text and "preftune." in text
    _shot(chromium, tmp_path, "mlflow-traces")
