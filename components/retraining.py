"""The Kubeflow components of the retraining run: one per step, plus the first and last task.

Each is a lightweight kfp v2 component on the preftune image (which has kfp and preftune
installed, so ``install_kfp_package=False``): its body only passes artifact paths to the step's
adapter in :mod:`preftune.pipeline.adapters` and copies the typed result's attributes to its outputs. No ML logic
lives here.

Gates are outputs: check-fit, train-reward, evaluate and promote *return* a boolean (their
single return value, named ``Output``), and the pipeline continues with ``dsl.If`` on it. A
step that fails for a real reason exits with the contract's exit code (``preftune.errors``).

Every step that reads data has the data snapshot (``snapshot``) and, after collect, the dataset
hash among its inputs: Kubeflow's cache key is made of the inputs, so a scheduled run with new
data never gets an old run's outputs.

(No ``from __future__ import annotations`` here: kfp reads the real annotation objects.)
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output, OutputPath

from preftune.kube.config import DEFAULT_IMAGE

IMAGE = DEFAULT_IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def open_run(config: dict, pipeline_run_id: str, kubernetes_hash: str, parent_run_id: OutputPath(str)) -> str:
    """Check the run config and its inputs, fingerprint the data, open the pipeline's MLflow run.

    Returns the data snapshot id (an input of every cacheable step); writes the parent MLflow run id.
    """
    import time

    started = time.time()
    from preftune.components import runtime

    from preftune.pipeline.lifecycle import open_pipeline_run

    res = runtime.call(
        open_pipeline_run,
        config=config,
        pipeline_run_id=pipeline_run_id,
        kubernetes_hash=kubernetes_hash,
        started_at=started,
    )
    runtime.write_param(parent_run_id, res.parent_run_id)
    return res.snapshot


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def collect(
    config: dict,
    snapshot: str,
    dataset: Output[Dataset],
    report: Output[Markdown],
    metrics: Output[Metrics],
) -> str:
    """Sample candidates with the policy, have them judged, and publish the preference dataset.

    Returns the dataset's content hash.
    """
    import time

    started = time.time()
    from preftune.components import runtime

    from preftune.pipeline.adapters import collect

    res = runtime.call(collect, config=config, output=dataset.path, snapshot=snapshot, started_at=started)
    dataset.metadata["hash"] = res.dataset_hash
    dataset.metadata["counts"] = res.counts
    runtime.write_text(report.path, res.report_md)
    runtime.write_metrics(metrics, res.metrics)
    return res.dataset_hash


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def check_fit(
    config: dict,
    snapshot: str,
    dataset: Input[Dataset],
    dataset_hash: str,
    fit_dataset: Output[Dataset],
    report: Output[Markdown],
    metrics: Output[Metrics],
    fit_dataset_hash: OutputPath(str),
) -> bool:
    """Test of fit: rater agreement and coverage per behaviour family.

    Returns whether the run goes on (False: no family is fit; the report says why). Writes the
    dataset of the fit families and its hash.
    """
    import time

    started = time.time()
    from preftune.components import runtime

    from preftune.pipeline.adapters import check_fit

    res = runtime.call(
        check_fit,
        config=config,
        dataset=dataset.path,
        output=fit_dataset.path,
        snapshot=snapshot,
        dataset_hash=dataset_hash,
        started_at=started,
    )
    fit_dataset.metadata["hash"] = res.dataset_hash
    fit_dataset.metadata["fit_families"] = res.fit_families
    runtime.write_text(report.path, res.report_md)
    runtime.write_metrics(metrics, res.metrics)
    runtime.write_param(fit_dataset_hash, res.dataset_hash)
    return bool(res.fit)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_reward(
    config: dict,
    snapshot: str,
    dataset: Input[Dataset],
    dataset_hash: str,
    reward_model: Output[Model],
    report: Output[Markdown],
    metrics: Output[Metrics],
) -> bool:
    """Train the pairwise reward model and gate it on held-out accuracy.

    Returns whether the gate passed (False: nothing is published; the report has the figures).
    """
    import time

    started = time.time()
    from preftune.components import runtime

    from preftune.pipeline.adapters import train_reward

    res = runtime.call(
        train_reward,
        config=config,
        dataset=dataset.path,
        output=reward_model.path,
        snapshot=snapshot,
        dataset_hash=dataset_hash,
        started_at=started,
    )
    reward_model.metadata["accuracy"] = res.accuracy
    reward_model.metadata["gate_passed"] = res.gate_passed
    runtime.write_text(report.path, res.report_md)
    runtime.write_metrics(metrics, res.metrics)
    return bool(res.gate_passed)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ppo(
    config: dict,
    snapshot: str,
    dataset_hash: str,
    fit_dataset: Input[Dataset],
    reward_model: Input[Model],
    policy: Output[Model],
    report: Output[Markdown],
    metrics: Output[Metrics],
) -> float:
    """PPO against the reward model with a KL leash to the reference; publishes the trained policy.

    ``fit_dataset`` supplies the raters' written answers for ``ppo.demonstration_coef``.
    Returns the final KL to the reference (nats per response).
    """
    import time

    started = time.time()
    from preftune.components import runtime

    from preftune.pipeline.adapters import ppo

    res = runtime.call(
        ppo,
        config=config,
        reward_model=reward_model.path,
        output=policy.path,
        snapshot=snapshot,
        dataset_hash=dataset_hash,
        dataset=fit_dataset.path,
        started_at=started,
    )
    policy.metadata["updates"] = res.updates
    policy.metadata["kl"] = res.kl
    runtime.write_text(report.path, res.report_md)
    runtime.write_metrics(metrics, res.metrics)
    return float(res.kl)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    config: dict,
    dataset_hash: str,
    policy: Input[Model],
    reward_model: Input[Model],
    evaluation: Output[Artifact],
    report: Output[HTML],
    summary: Output[Markdown],
    metrics: Output[Metrics],
    eval_run_id: OutputPath(str),
) -> bool:
    """The candidate and the champion on the behaviour suite, with gates on confidence bounds.

    Returns whether every gate passed. Writes the report (HTML and Markdown) and the evaluate run id.
    """
    import time

    started = time.time()
    from preftune.components import runtime

    from preftune.pipeline.adapters import evaluate
    from preftune.pipeline.artifacts import copy_file

    res = runtime.call(
        evaluate,
        config=config,
        policy=policy.path,
        reward_model=reward_model.path,
        output=evaluation.path,
        dataset_hash=dataset_hash,
        started_at=started,
    )
    if not copy_file(f"{evaluation.path}/report.html", report.path):
        runtime.write_text(report.path, "<p>no report</p>")
    runtime.write_text(summary.path, res.report_md or "# evaluate\n")
    runtime.write_metrics(metrics, res.metrics)
    runtime.write_param(eval_run_id, res.eval_run_id)
    return bool(res.passed)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(
    config: dict,
    dataset_hash: str,
    eval_run_id: str,
    policy: Input[Model],
    reward_model: Input[Model],
    report: Output[Markdown],
    version: OutputPath(str),
) -> bool:
    """Register the evaluated candidate and move the champion alias, under the promotion lock.

    Returns whether it was promoted (False: rejected, nothing registered, champion unchanged).
    """
    import time

    started = time.time()
    from preftune.components import runtime

    from preftune.pipeline.adapters import promote

    res = runtime.call(
        promote,
        config=config,
        policy=policy.path,
        eval_run_id=eval_run_id,
        reward_model=reward_model.path,
        dataset_hash=dataset_hash,
        started_at=started,
    )
    runtime.write_text(report.path, res.report_md)
    runtime.write_param(version, res.version or "")
    return bool(res.promoted)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def pilot_report(
    full_config: dict,
    fit_dataset: Input[Dataset],
    reward_model: Input[Model],
    policy: Input[Model],
    evaluation: Input[Artifact],
    pilot: Output[Artifact],
    report: Output[HTML],
    summary: Output[Markdown],
    metrics: Output[Metrics],
) -> str:
    """The pilot's go / no-go report from the steps' outputs (the ``preference-pilot`` pipeline's last step).

    ``full_config`` is the user's run config (the full run the cost estimate is about). Returns the
    overall verdict ('go' or 'no-go'); writes pilot.json/.md/.html to ``pilot``.
    """
    from preftune.components import runtime

    from preftune.pilot.run import build_report
    from preftune.pipeline.artifacts import copy_file

    res = runtime.call(
        build_report,
        config=full_config,
        fit_dir=fit_dataset.path,
        reward_dir=reward_model.path,
        policy_dir=policy.path,
        eval_dir=evaluation.path,
        output=pilot.path,
    )
    copy_file(f"{pilot.path}/pilot.html", report.path)
    copy_file(f"{pilot.path}/pilot.md", summary.path)
    pilot.metadata["verdict"] = res["verdict"]
    pilot.metadata["go_families"] = res["go_families"]
    runtime.write_metrics(
        metrics, {f"pilot.{f}.go": 1.0 if r["verdict"] == "go" else 0.0 for f, r in res["families"].items()}
    )
    return str(res["verdict"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def close_run(config: dict, pipeline_run_id: str, status: dsl.PipelineTaskFinalStatus):
    """End the pipeline's MLflow run with the run's outcome (the exit handler: runs after failures too)."""
    from preftune.components import runtime

    from preftune.pipeline.lifecycle import close_pipeline_run

    runtime.call(
        close_pipeline_run,
        config=config,
        pipeline_run_id=pipeline_run_id,
        state=str(status.state or ""),
        error=status.error_message or None,
    )


STEP_COMPONENTS = {
    "collect": collect,
    "check-fit": check_fit,
    "train-reward": train_reward,
    "ppo": ppo,
    "evaluate": evaluate,
    "promote": promote,
}
"""The six steps by name (their compiled specs are published in ``components/specs``)."""

ALL_COMPONENTS = {"open-run": open_run, **STEP_COMPONENTS, "close-run": close_run}
