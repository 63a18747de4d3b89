"""The compiled ``preference-retraining`` pipeline, read back with kfp's own loader.

The committed YAML must be what the source compiles to today; its graph must have the six
steps behind the three gates, the caching rules that keep scheduled runs from stale results,
retries with back-off, and (for a GPU run config such as the Helm chart's) the GPU request and
placement on ppo only, CPU and memory on every step, Secrets as environment variables and the
model-cache claim. Fast: compiling takes about a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from preftune.config import RunConfig, parse_config

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "pipelines" / "preference-retraining.yaml"
STEPS = ("collect", "check-fit", "train-reward", "ppo", "evaluate", "promote")
GPU_VALUES = REPO / "charts" / "preftune" / "ci" / "gpu-schedule-values.yaml"


def gpu_config(**extra_kubernetes: Any) -> RunConfig:
    data = yaml.safe_load(GPU_VALUES.read_text())["schedule"]["runConfig"]
    data["kubernetes"].update(extra_kubernetes)
    return parse_config(data)


def load_compiled(path: Path) -> Any:
    from kfp.components import load_component_from_file

    return load_component_from_file(str(path))


def tasks_of(component: Any) -> dict[str, dict[str, Any]]:
    """Every task of the pipeline (nested DAGs flattened): its spec and the conditions it sits under."""
    from google.protobuf import json_format

    spec = component.pipeline_spec
    executors = json_format.MessageToDict(spec.deployment_spec)["executors"]
    out: dict[str, dict[str, Any]] = {}

    def walk(dag: Any, conditions: tuple[str, ...], groups: tuple[str, ...]) -> None:
        for name, task in dag.tasks.items():
            comp = spec.components[task.component_ref.name]
            conds = conditions + ((task.trigger_policy.condition,) if task.trigger_policy.condition else ())
            if comp.WhichOneof("implementation") == "dag":
                walk(comp.dag, conds, groups + (task.task_info.name,))
            else:
                out[name] = {
                    "task": task,
                    "component": comp,
                    "conditions": conds,
                    "groups": groups,
                    "executor": executors[comp.executor_label],
                }

    walk(spec.root.dag, (), ())
    return out


def source(inp: Any) -> str:
    """Where a task input comes from, as ``<task>-<output>`` (directly, or through a condition's inputs)."""
    kind = inp.WhichOneof("kind")
    if kind == "task_output_parameter":
        return f"{inp.task_output_parameter.producer_task}-{inp.task_output_parameter.output_parameter_key}"
    if kind == "task_output_artifact":
        return f"{inp.task_output_artifact.producer_task}-{inp.task_output_artifact.output_artifact_key}"
    return str(getattr(inp, kind)).removeprefix("pipelinechannel--")


def k8s_executor(component: Any, task: dict[str, Any]) -> dict[str, Any]:
    from google.protobuf import json_format

    platform = json_format.MessageToDict(component.platform_spec)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return executors[task["component"].executor_label]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    from preftune.pipelines.retraining import compile_pipeline

    path = tmp_path_factory.mktemp("compiled") / "preference-retraining.yaml"
    compile_pipeline(None, str(path))
    return path


@pytest.fixture(scope="module")
def gpu_compiled(tmp_path_factory) -> Any:
    from preftune.pipelines.retraining import compile_pipeline

    cfg = gpu_config(
        secrets=[
            {"secret_name": "s3-credentials", "key": "access-key", "env": "AWS_ACCESS_KEY_ID"},
            {"secret_name": "s3-credentials", "key": "secret-key", "env": "AWS_SECRET_ACCESS_KEY"},
            {"secret_name": "mlflow-auth", "key": "token", "env": "MLFLOW_TRACKING_TOKEN"},
        ],
        model_cache={"pvc": "preftune-models"},
        image_pull_secrets=["registry-creds"],
    )
    path = tmp_path_factory.mktemp("gpu") / "gpu.yaml"
    compile_pipeline(cfg, str(path))
    return cfg, path, load_compiled(path)


def test_committed_pipeline_yaml_is_what_the_source_compiles_to(compiled):
    assert COMMITTED.is_file(), "run `preftune compile -o pipelines/preference-retraining.yaml`"
    assert COMMITTED.read_text() == compiled.read_text(), (
        "pipelines/preference-retraining.yaml is out of date: run "
        "`preftune compile -o pipelines/preference-retraining.yaml --components components/specs`"
    )


def test_the_committed_spec_has_six_steps_behind_three_gates():
    component = load_compiled(COMMITTED)
    spec = component.pipeline_spec
    assert spec.pipeline_info.name == "preference-retraining"
    # one structured parameter: the run config
    from kfp.pipeline_spec import pipeline_spec_pb2

    types = pipeline_spec_pb2.ParameterType
    params = dict(spec.root.input_definitions.parameters)
    assert list(params) == ["config"] and params["config"].parameter_type == types.STRUCT
    tasks = tasks_of(component)
    assert set(tasks) == {*STEPS, "open-run", "close-run"}
    gate = {
        "check-fit": "inputs.parameter_values['pipelinechannel--check-fit-Output'] == true",
        "train-reward": "inputs.parameter_values['pipelinechannel--train-reward-Output'] == true",
        "evaluate": "inputs.parameter_values['pipelinechannel--evaluate-Output'] == true",
    }
    expected_conditions = {
        "open-run": (),
        "collect": (),
        "check-fit": (),
        "train-reward": (gate["check-fit"],),
        "ppo": (gate["check-fit"], gate["train-reward"]),
        "evaluate": (gate["check-fit"], gate["train-reward"]),
        "promote": (gate["check-fit"], gate["train-reward"], gate["evaluate"]),
        "close-run": (),
    }
    assert {name: t["conditions"] for name, t in tasks.items()} == expected_conditions
    assert tasks["promote"]["groups"] == ("retraining", "fit-for-ppo", "reward-gate-passed", "evaluation-passed")
    # the gates are boolean outputs of their steps (a stopped run succeeds; it does not fail)
    for step in ("check-fit", "train-reward", "evaluate", "promote"):
        out = tasks[step]["component"].output_definitions.parameters["Output"]
        assert out.parameter_type == types.BOOLEAN
    # close-run is the exit handler: it runs whatever happened, and sees the final status
    close = tasks["close-run"]["task"]
    assert close.trigger_policy.strategy == close.trigger_policy.ALL_UPSTREAM_TASKS_COMPLETED
    assert "status" in tasks["close-run"]["component"].input_definitions.parameters
    # data flows step to step as typed artifacts
    artifact_inputs = {n: {k: source(v) for k, v in t["task"].inputs.artifacts.items()} for n, t in tasks.items()}
    assert artifact_inputs["check-fit"] == {"dataset": "collect-dataset"}
    assert artifact_inputs["train-reward"] == {"dataset": "check-fit-fit_dataset"}
    assert artifact_inputs["ppo"] == {  # the fit dataset: its written answers (ppo.demonstration_coef)
        "fit_dataset": "check-fit-fit_dataset",
        "reward_model": "train-reward-reward_model",
    }
    assert artifact_inputs["evaluate"] == {"policy": "ppo-policy", "reward_model": "train-reward-reward_model"}
    assert artifact_inputs["promote"] == {"policy": "ppo-policy", "reward_model": "train-reward-reward_model"}


def test_caching_never_serves_a_scheduled_run_stale_results():
    component = load_compiled(COMMITTED)
    tasks = tasks_of(component)
    caching = {n: t["task"].caching_options.enable_cache for n, t in tasks.items()}
    assert caching == {
        "open-run": False,
        "collect": True,
        "check-fit": True,
        "train-reward": True,
        "ppo": True,
        "evaluate": False,
        "promote": False,
        "close-run": False,
    }
    params = {n: dict(t["task"].inputs.parameters) for n, t in tasks.items()}
    for step in ("collect", "check-fit", "train-reward", "ppo"):
        # the data snapshot (fingerprint of prompts, judgements and models) is an input of every cached step
        assert source(params[step]["snapshot"]) == "open-run-Output", step
    # ... and the content hash of the dataset each step after collect reads
    assert source(params["check-fit"]["dataset_hash"]) == "collect-Output"
    for step in ("train-reward", "ppo", "evaluate", "promote"):
        assert source(params[step]["dataset_hash"]) == "check-fit-fit_dataset_hash", step
    # open-run computes the snapshot on every run (never cached) from the run id placeholder
    assert caching["open-run"] is False
    assert "pipeline_job_uuid" in str(params["open-run"]["pipeline_run_id"])
    # nothing run-specific is an input of a cached step (it would miss the cache on every run)
    for step in ("collect", "check-fit", "train-reward", "ppo"):
        assert not any("pipeline_job" in str(p) for p in params[step].values()), step


def test_retries_with_back_off_on_every_task():
    tasks = tasks_of(load_compiled(COMMITTED))
    for name, t in tasks.items():
        r = t["task"].retry_policy
        assert r.max_retry_count == 2 and r.backoff_duration.seconds == 60 and r.backoff_factor == 2.0, name
        assert r.backoff_max_duration.seconds == 3600, name


def test_default_spec_requests_cpu_and_memory_everywhere_and_no_gpu():
    component = load_compiled(COMMITTED)
    for name, t in tasks_of(component).items():
        c = t["executor"]["container"]
        assert c["image"] == f"preftune:{__import__('preftune').__version__}", name
        res = c["resources"]
        assert res["resourceCpuRequest"] and res["resourceMemoryRequest"] and res["resourceMemoryLimit"], name
        assert "accelerator" not in res, name
        # the pipeline run id reaches every step from the pod's label, not as a (cache-breaking) input
        env = k8s_executor(component, t)["fieldPathAsEnv"]
        assert {"name": "PREFTUNE_PIPELINE_RUN_ID", "fieldPath": "metadata.labels['pipeline/runid']"} in env


def test_gpu_run_config_asks_for_gpus_on_ppo_only(gpu_compiled):
    cfg, _, component = gpu_compiled
    tasks = tasks_of(component)
    for name, t in tasks.items():
        c = t["executor"]["container"]
        assert c["image"] == "registry.example.com/ml/preftune:0.1.0-cuda", name
        res, k8s = c["resources"], k8s_executor(component, t)
        if name == "ppo":
            assert res["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert res["accelerator"]["resourceCount"] == "4"
            assert (res["resourceCpuRequest"], res["resourceMemoryRequest"]) == ("16", "128Gi")
            assert k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
            assert k8s["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        else:
            assert "accelerator" not in res and "nodeSelector" not in k8s and "tolerations" not in k8s, name
            step = cfg.kubernetes.steps.for_step({"open-run": "tracking", "close-run": "tracking"}.get(name, name))
            assert (res["resourceCpuRequest"], res["resourceMemoryRequest"]) == (step.cpu, step.memory), name


def test_secrets_are_env_from_secret_refs_and_never_parameters(gpu_compiled):
    cfg, path, component = gpu_compiled
    for name, t in tasks_of(component).items():
        k8s = k8s_executor(component, t)
        got = {(s["secretName"], m["secretKey"], m["envVar"]) for s in k8s["secretAsEnv"] for m in s["keyToEnv"]}
        assert got == {
            ("s3-credentials", "access-key", "AWS_ACCESS_KEY_ID"),
            ("s3-credentials", "secret-key", "AWS_SECRET_ACCESS_KEY"),
            ("mlflow-auth", "token", "MLFLOW_TRACKING_TOKEN"),
        }, name
        assert [(m["mountPath"], m["pvcNameParameter"]["runtimeValue"]["constant"]) for m in k8s["pvcMount"]] == [
            ("/var/lib/preftune", "preftune-models")
        ], name
        env = {e["name"]: e["value"] for e in t["executor"]["container"].get("env", [])}
        assert env.get("PREFTUNE_HOME") == "/var/lib/preftune", name
        assert [s["secretName"] for s in k8s["imagePullSecret"]] == ["registry-creds"], name
    # the only parameter is the config, which names Secrets but holds no credential
    root = component.pipeline_spec.root.input_definitions.parameters
    assert list(root) == ["config"]
    from google.protobuf import json_format

    default = json_format.MessageToDict(root["config"].default_value)
    assert "secret_name" in json.dumps(default) and "password" not in path.read_text().lower()


def test_a_config_with_another_kubernetes_section_is_refused_at_run_time():
    from preftune.errors import ConfigError
    from preftune.pipeline import config_parameter, open_pipeline_run

    compiled_hash = RunConfig().kubernetes.platform_hash()
    other = gpu_config()
    with pytest.raises(ConfigError, match="kubernetes section differs"):
        open_pipeline_run(config_parameter(other), "run-1", kubernetes_hash=compiled_hash)


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"run": {"name": "x", "seed": 3}, "ppo": {"reward_clip": None, "approx_kl_stop": None}},
        {
            "evaluation": {
                "gates": {
                    "non_regression": {},
                    "capability_tolerance": None,
                    "thresholds": {"safety": {"forbidden_share": {"max": 0.02}}},
                }
            }
        },
        {
            "kubernetes": {
                "steps": {
                    "collect": {"cpu": "1"},
                    "ppo": {"gpus": 2, "tolerations": [{"key": "gpu", "value": "a100", "effect": "NoSchedule"}]},
                },
                "secrets": [{"secret_name": "s3", "key": "k", "env": "AWS_ACCESS_KEY_ID"}],
            }
        },
        yaml.safe_load(GPU_VALUES.read_text())["schedule"]["runConfig"],
    ],
)
def test_the_config_parameter_carries_a_run_config_exactly(data):
    """Kubeflow parameters (and the local runner) hold no nulls: they travel as null_fields and come back."""
    from preftune.pipeline import config_parameter, load

    cfg = parse_config(data)
    param = config_parameter(cfg)
    text = json.dumps(param)
    assert ": null" not in text and "null," not in text and "null]" not in text
    back = load(json.loads(text))
    assert back == cfg and back.config_hash() == cfg.config_hash()
    assert back.kubernetes.platform_hash() == cfg.kubernetes.platform_hash()


def test_compile_command_writes_the_pipeline_and_component_specs(tmp_path):
    from preftune.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"kubernetes": {"image": "reg.example.com/preftune:1.2.3"}}))
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "compile",
                "--config",
                str(cfg),
                "-o",
                str(tmp_path / "out" / "p.yaml"),
                "--components",
                str(tmp_path / "specs"),
            ]
        )
    assert exc.value.code == 0
    component = load_compiled(tmp_path / "out" / "p.yaml")
    images = {t["executor"]["container"]["image"] for t in tasks_of(component).values()}
    assert images == {"reg.example.com/preftune:1.2.3"}
    assert sorted(p.name for p in (tmp_path / "specs").iterdir()) == sorted(
        f"{n}.yaml" for n in (*STEPS, "open-run", "close-run")
    )
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left behind
