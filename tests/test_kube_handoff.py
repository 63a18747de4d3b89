"""The pipeline's ppo step handed to Kubeflow Trainer (``kubernetes.trainer.enabled``).

The Kubernetes API is a fake that records the TrainJob it is given and, when asked for its state,
plays the TrainJob's nodes: it runs the ppo step exactly as a node's command would (the run config
from ``PREFTUNE_RUN_CONFIG``, the reward model and output from the TrainJob's environment), on
tiny models, against a real S3-compatible server (moto, own process) as ``storage.root``. The
handed-off step must then give the same outputs as the step trained in its own pod.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_kube_trainjob import schema_problems
from test_pipeline_spec import COMMITTED, gpu_config, k8s_executor, load_compiled, tasks_of

from preftune import pipeline
from preftune.config import RunConfig, parse_config
from preftune.errors import ConfigError, CredentialsError, ExitCode, PreftuneError
from preftune.kube import handoff
from preftune.kube import trainjob as tj
from preftune.storage import Storage

TIMING = ("ppo.rollout_seconds", "ppo.update_seconds", "ppo.tokens_per_s", "ppo.samples_per_s")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny policy, a tiny reward model and a prompt file (as in test_ppo_step)."""
    from preftune.ppo import toy

    root = tmp_path_factory.mktemp("handoff")
    policy = toy.build_policy(root / "policy", eos_boost=3.0, initializer_range=0.3)
    reward = toy.build_reward_model(
        root / "reward", reward_mean=0.1, reward_std=0.5, per_family={"safety": 0.9, "benign": 0.9}
    )
    prompts = root / "prompts.jsonl"
    texts = ["hi", "how do I bake bread", "pick a lock", "write a haiku", "help me", "is it going to rain"]
    with prompts.open("w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"p{i}", "family": ["safety", "benign"][i % 2], "prompt": text}) + "\n")
    return {"policy": Path(policy), "reward": Path(reward), "prompts": prompts}


def run_config(world: dict[str, Path], root: str | None, endpoint: str | None, *, enabled: bool) -> dict[str, Any]:
    return {
        "run": {"seed": 0, "name": "handoff-test"},
        "models": {"policy": str(world["policy"])},
        "ppo": {
            "prompts": str(world["prompts"]),
            "updates": 2,
            "batch_size": 4,
            "mini_batch_size": 2,
            "max_new_tokens": 6,
            "threads": 1,
            "checkpoint_every": 1,
            "samples_every": 2,
            "samples_per_table": 2,
            "progress": False,
            "log_model": False,
            "lr": 1e-2,
        },
        "storage": {"root": root, "s3_endpoint_url": endpoint},
        "kubernetes": {"trainer": {"enabled": enabled, "namespace": "ml-train", "poll_s": 1}},
    }


def env_of(manifest: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in manifest["spec"]["trainer"]["env"] if "value" in e}


class FakeTrainer:
    """kubernetes.client.CustomObjectsApi for one TrainJob: running, then the nodes' verdict.

    ``nodes`` plays the nodes when the TrainJob is first polled (None: they never publish).
    """

    def __init__(self, verdict: dict[str, Any], nodes: Any = None, create_error: Exception | None = None) -> None:
        self.verdict = verdict
        self.nodes = nodes
        self.create_error = create_error
        self.created: list[tuple[str, str, str, str, dict[str, Any]]] = []
        self.gets = 0

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        if self.create_error is not None:
            raise self.create_error
        self.created.append((group, version, namespace, plural, json.loads(json.dumps(body))))

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        assert [(c[2], c[4]["metadata"]["name"]) for c in self.created] == [(namespace, name)]
        self.gets += 1
        if self.gets == 1:
            if self.nodes is not None:
                self.nodes(self.created[0][4])
            return {"metadata": {"name": name}, "status": {"conditions": [{"type": "Created", "status": "True"}]}}
        return {"metadata": {"name": name}, "status": {"conditions": [self.verdict]}}


def run_nodes(manifest: dict[str, Any]) -> None:
    """What every node's command does (``preftune ppo --config $PREFTUNE_RUN_CONFIG ...``), on one process."""
    from preftune.ppo.step import run_ppo
    from preftune.tracking import ENV_PARENT_RUN_ID, ENV_PIPELINE_RUN_ID

    env = env_of(manifest)
    cfg = parse_config(json.loads(env[tj.ENV_RUN_CONFIG]), "node config")
    with pipeline.environ(
        **{
            ENV_PIPELINE_RUN_ID: env.get(ENV_PIPELINE_RUN_ID),
            ENV_PARENT_RUN_ID: env.get(ENV_PARENT_RUN_ID),
        }
    ):
        run_ppo(cfg, env[tj.ENV_REWARD_MODEL], env[tj.ENV_OUTPUT])


COMPLETE = {"type": "Complete", "status": "True", "reason": "JobSetCompleted", "message": "jobset completed"}


def test_the_handed_off_step_trains_in_one_trainjob_and_returns_what_the_in_pod_step_returns(
    world, s3_server, s3_bucket, tmp_path, monkeypatch
):
    root = f"s3://{s3_bucket}/preftune"
    in_pod = run_config(world, root, s3_server, enabled=False)
    monkeypatch.setenv("PREFTUNE_PIPELINE_RUN_ID", "run-in-pod")
    expected = pipeline.ppo(
        in_pod, str(world["reward"]), str(tmp_path / "in-pod"), snapshot="snap-1", dataset_hash="fit-1"
    )

    monkeypatch.setenv("PREFTUNE_PIPELINE_RUN_ID", "run-handoff")
    api = FakeTrainer(COMPLETE, nodes=run_nodes)
    out = tmp_path / "task-output" / "policy"
    got = pipeline.ppo(
        run_config(world, root, s3_server, enabled=True),
        str(world["reward"]),
        str(out),
        snapshot="snap-1",
        dataset_hash="fit-1",
        trainer_api=api,
    )

    # exactly one TrainJob, in the configured namespace, valid for the Trainer, with shared inputs
    assert len(api.created) == 1
    group, version, namespace, plural, manifest = api.created[0]
    assert (group, version, namespace, plural) == ("trainer.kubeflow.org", "v1alpha1", "ml-train", "trainjobs")
    assert schema_problems(manifest) == []
    assert manifest["metadata"]["namespace"] == "ml-train"
    env = env_of(manifest)
    prefix = f"{root}/trainer/handoff-test/run-handoff"
    assert env[tj.ENV_REWARD_MODEL] == f"{prefix}/reward-model"
    assert env[tj.ENV_OUTPUT] == f"{prefix}/policy"
    assert env["PREFTUNE_PIPELINE_RUN_ID"] == "run-handoff"
    node_cfg = json.loads(env[tj.ENV_RUN_CONFIG])
    assert node_cfg["ppo"]["checkpoint_dir"] == f"{root}/checkpoints/handoff-test/run-handoff/ppo"
    # the reward model the nodes read is the task's, file for file
    storage = Storage(s3_endpoint_url=s3_server)
    published = storage.get_dir(env[tj.ENV_REWARD_MODEL], tmp_path / "rm-copy")
    local = sorted(p.relative_to(world["reward"]).as_posix() for p in world["reward"].rglob("*") if p.is_file())
    assert sorted(p.relative_to(published).as_posix() for p in published.rglob("*") if p.is_file()) == local
    for rel in local:
        assert (published / rel).read_bytes() == (world["reward"] / rel).read_bytes(), rel

    # the task's output is the policy the nodes published; the figures are the in-pod step's
    assert got.status == "ok" and got.policy_dir == str(out)
    meta = json.loads((out / "ppo_policy.json").read_text())
    assert meta["reward_model"] == env[tj.ENV_REWARD_MODEL]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "in-pod").iterdir())
    for key in ("updates", "resumed_from", "kl_budget", "kl_within_budget", "input_dataset_hash"):
        assert getattr(got, key) == getattr(expected, key), key
    for key in ("kl", "reward_gain", "reward_first", "reward_final"):
        assert getattr(got, key) == pytest.approx(getattr(expected, key), rel=1e-4, abs=1e-6), key
    assert got.updates == 2 and got.resumed_from is None
    assert set(got.metrics) == set(expected.metrics)
    for key, value in expected.metrics.items():
        if key not in TIMING:
            assert got.metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert set(got.outputs()) - set(expected.outputs()) == {"trainjob", "trainjob_namespace", "policy_uri"}
    assert got.trainjob == manifest["metadata"]["name"] and got.trainjob_namespace == "ml-train"
    assert got.policy_uri == env[tj.ENV_OUTPUT]
    assert f"in TrainJob ml-train/{got.trainjob}" in got.report_md

    # MLflow: the step record points at the run the nodes logged, nested under the same pipeline run
    import mlflow

    run_id = got.mlflow_run_id
    assert run_id and run_id == meta["mlflow_run_id"] and run_id != expected.mlflow_run_id
    run = mlflow.tracking.MlflowClient().get_run(run_id)
    assert run.data.tags["preftune.step"] == "ppo"
    assert run.data.tags["preftune.pipeline_run_id"] == "run-handoff"
    assert run.data.tags["preftune.step_status"] == "ok"
    assert run.data.tags["preftune.input_dataset_hash"] == "fit-1"


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("jobset failed: node-0 reached the backoff limit", ExitCode.INTERNAL),
        ("node-1 exited with exit code 12 (training diverged)", ExitCode.TRAINING_DIVERGED),
    ],
)
def test_a_failed_trainjob_fails_the_step_and_publishes_nothing(
    world, s3_server, s3_bucket, tmp_path, monkeypatch, message, code
):
    monkeypatch.setenv("PREFTUNE_PIPELINE_RUN_ID", "run-failed")
    failed = {"type": "Failed", "status": "True", "reason": "JobSetFailed", "message": message}
    api = FakeTrainer(failed)
    out = tmp_path / "task-output" / "policy"
    cfg = run_config(world, f"s3://{s3_bucket}/preftune", s3_server, enabled=True)
    with pytest.raises(PreftuneError) as err:
        pipeline.ppo(cfg, str(world["reward"]), str(out), snapshot="snap-1", dataset_hash="fit-1", trainer_api=api)
    name = api.created[0][4]["metadata"]["name"]
    assert len(api.created) == 1
    text = err.value.message
    assert f"TrainJob ml-train/{name} failed: JobSetFailed: {message}" in text
    assert f"kubectl -n ml-train logs -l jobset.sigs.k8s.io/jobset-name={name}" in text
    assert err.value.exit_code == code
    assert not out.exists()


def test_a_trainjob_that_completes_without_a_policy_is_an_error(world, s3_server, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_PIPELINE_RUN_ID", "run-empty")
    cfg = run_config(world, f"s3://{s3_bucket}/preftune", s3_server, enabled=True)
    out = tmp_path / "policy"
    with pytest.raises(PreftuneError, match="completed but published no policy at s3://"):
        pipeline.ppo(
            cfg, str(world["reward"]), str(out), snapshot="s", dataset_hash="h", trainer_api=FakeTrainer(COMPLETE)
        )
    assert not out.exists()


def test_storage_root_must_be_shared_before_anything_is_submitted(world, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_PIPELINE_RUN_ID", "run-local")
    api = FakeTrainer(COMPLETE)
    for root in (None, str(tmp_path / "artifacts")):
        cfg = run_config(world, root, None, enabled=True)
        with pytest.raises(ConfigError, match="storage.root") as err:
            pipeline.ppo(
                cfg, str(world["reward"]), str(tmp_path / "o"), snapshot="s", dataset_hash="h", trainer_api=api
            )
        assert err.value.exit_code == ExitCode.CONFIG
        with pytest.raises(ConfigError, match="storage.root"):
            pipeline.preflight(parse_config(cfg), local=False, check_tracking=False, check_storage=False)
    assert api.created == []
    # the demonstration term needs the dataset's written answers, which a TrainJob does not receive yet
    cfg = run_config(world, "s3://bucket/preftune", None, enabled=True)
    cfg["ppo"] = {**cfg.get("ppo", {}), "demonstration_coef": 0.1}
    with pytest.raises(ConfigError, match="ppo.demonstration_coef is not supported with kubernetes.trainer"):
        pipeline.ppo(cfg, str(world["reward"]), str(tmp_path / "o"), snapshot="s", dataset_hash="h", trainer_api=api)
    with pytest.raises(ConfigError, match="ppo.demonstration_coef"):
        pipeline.preflight(parse_config(cfg), local=False, check_tracking=False, check_storage=False)
    assert api.created == []
    # a root on the shared model-cache claim is fine: every node mounts it
    cfg = parse_config(
        {"storage": {"root": "/var/lib/preftune/artifacts"}, "kubernetes": {"trainer": {"enabled": True}}}
    )
    with pytest.raises(ConfigError):
        handoff.shared_root(cfg)
    cfg = parse_config(
        {
            "storage": {"root": "/var/lib/preftune/artifacts"},
            "kubernetes": {"trainer": {"enabled": True}, "model_cache": {"pvc": "models"}},
        }
    )
    assert handoff.shared_root(cfg) == "/var/lib/preftune/artifacts"
    assert handoff.run_prefix(cfg, "r1") == f"/var/lib/preftune/artifacts/trainer/{cfg.run.name}/r1"


def test_a_refused_trainjob_names_the_rbac_it_needs(world, s3_server, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_PIPELINE_RUN_ID", "run-rbac")
    forbidden = Exception("Forbidden")
    forbidden.status, forbidden.reason = 403, "Forbidden"  # type: ignore[attr-defined]
    cfg = run_config(world, f"s3://{s3_bucket}/preftune", s3_server, enabled=True)
    with pytest.raises(
        CredentialsError, match="create and get on trainjobs.trainer.kubeflow.org in namespace ml-train"
    ):
        pipeline.ppo(
            cfg,
            str(world["reward"]),
            str(tmp_path / "o"),
            snapshot="s",
            dataset_hash="h",
            trainer_api=FakeTrainer(COMPLETE, create_error=forbidden),
        )


def test_a_shared_reward_model_is_passed_on_as_it_is(s3_server, s3_bucket):
    cfg = parse_config({"storage": {"root": f"s3://{s3_bucket}/p"}, "kubernetes": {"trainer": {"enabled": True}}})
    storage = Storage(s3_endpoint_url=s3_server)
    uri = f"s3://{s3_bucket}/models/rm"
    assert handoff.publish_reward_model(cfg, uri, f"s3://{s3_bucket}/p/x", storage) == uri
    assert storage.list(f"s3://{s3_bucket}/p") == []


def test_the_compiled_ppo_task_is_a_small_waiting_pod_when_the_trainer_takes_over(tmp_path):
    from preftune.pipelines.retraining import compile_pipeline

    cfg = gpu_config(trainer={"enabled": True, "nodes": 2})
    assert cfg.kubernetes.steps.ppo.gpus > 0
    path = tmp_path / "handoff.yaml"
    compile_pipeline(cfg, str(path))
    component = load_compiled(path)
    tasks = tasks_of(component)
    assert set(tasks) >= {"collect", "check-fit", "train-reward", "ppo", "evaluate", "promote"}
    ppo = tasks["ppo"]
    res, k8s = ppo["executor"]["container"]["resources"], k8s_executor(component, ppo)
    small = cfg.kubernetes.steps.tracking
    assert "accelerator" not in res and "nodeSelector" not in k8s and "tolerations" not in k8s
    assert (res["resourceCpuRequest"], res["resourceMemoryRequest"]) == (small.cpu, small.memory)
    assert "activeDeadlineSeconds" not in k8s
    # the same component as in the committed pipeline: the library decides by the config switch
    committed = tasks_of(load_compiled(COMMITTED))["ppo"]["executor"]["container"]
    assert ppo["executor"]["container"]["command"] == committed["command"]
    assert ppo["executor"]["container"]["args"] == committed["args"]
    # the TrainJob gets steps.ppo's GPUs per node instead
    m = tj.trainjob_manifest(cfg, "s3://b/rm", "s3://b/policy")
    assert m["spec"]["trainer"]["numNodes"] == 2
    assert m["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == str(cfg.kubernetes.steps.ppo.gpus)
    # and the default config's ppo task keeps its own resources
    assert RunConfig().kubernetes.trainer.enabled is False
