"""The Kubeflow Trainer handoff: the TrainJob generated from the run config, checked against the real schemas.

The TrainJob is parsed with ``kubeflow-trainer-api`` (the Trainer's own pydantic models of its
CRDs) and must survive the round trip unchanged, so a misspelt or misplaced field fails; the pod
bits it carries (env, resources, tolerations, volumes) are loaded into the official Kubernetes
client models and a Pod made of them is validated strictly with ``kubernetes-validate``.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

import kubernetes.client as k8s_models
import kubernetes_validate
import pytest
import yaml
from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
from kubernetes.client import ApiClient
from support.podsecurity import restricted_problems

from preftune.cli import main
from preftune.config import RunConfig, parse_config
from preftune.errors import ConfigError, PreftuneError
from preftune.kube import trainjob as tj

FULL = {
    "run": {"name": "nightly run #7"},
    "ppo": {"batch_size": 64, "mini_batch_size": 16},
    "kubernetes": {
        "image": "registry.example.com/ml/preftune:0.1.0-cuda",
        "service_account": "preftune-train",
        "image_pull_secrets": ["regcred"],
        "model_cache": {"pvc": "preftune-cache"},
        "secrets": [
            {"secret_name": "s3-creds", "key": "access-key", "env": "AWS_ACCESS_KEY_ID"},
            {"secret_name": "s3-creds", "key": "secret-key", "env": "AWS_SECRET_ACCESS_KEY", "optional": True},
        ],
        "steps": {
            "ppo": {
                "gpus": 4,
                "cpu_limit": "16",
                "timeout_s": 7200,
                "node_selector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            }
        },
        "trainer": {"nodes": 2, "namespace": "ml-train"},
    },
}


def full_cfg(**trainer: Any) -> RunConfig:
    data = json.loads(json.dumps(FULL))
    data["kubernetes"]["trainer"].update(trainer)
    return RunConfig.model_validate(data)


def _drop_none(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _drop_none(v) for k, v in o.items() if v is not None}
    if isinstance(o, list):
        return [_drop_none(v) for v in o]
    return o


def schema_problems(manifest: dict[str, Any]) -> list[str]:
    """Parse with the Trainer's models; every key must survive (unknown keys are silently dropped)."""
    model = TrainerV1alpha1TrainJob.from_dict(manifest)
    back = _drop_none(model.to_dict())
    problems = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict):
            for k, v in a.items():
                if not isinstance(b, dict) or k not in b:
                    problems.append(f"{path}.{k} is not a TrainJob field")
                else:
                    walk(v, b[k], f"{path}.{k}")
        elif isinstance(a, list):
            for i, (x, y) in enumerate(zip(a, b, strict=False)):
                walk(x, y, f"{path}[{i}]")
        elif a != b:
            problems.append(f"{path}: {a!r} became {b!r}")

    walk(manifest, back, "")
    return problems


def node_pod(m: dict[str, Any]) -> dict[str, Any]:
    """The Pod a TrainJob node gets: the runtime's node container with the trainer's and the patch's fields."""
    trainer = m["spec"]["trainer"]
    patch = m["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod_patch = patch["template"]["spec"]["template"]["spec"]
    (patched,) = pod_patch["containers"]
    container = {
        "name": patched["name"],
        "image": trainer["image"],
        "command": trainer["command"],
        "env": trainer["env"],
        "resources": trainer["resourcesPerNode"],
        **{k: v for k, v in patched.items() if k != "name"},
    }
    pod_spec = {k: v for k, v in pod_patch.items() if k != "containers"}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "n"},
        "spec": {**pod_spec, "containers": [container]},
    }


def test_full_manifest_matches_the_trainer_schema():
    m = tj.trainjob_manifest(full_cfg(), "s3://models/rm", "s3://models/policy", pipeline_run_id="run-1")
    assert schema_problems(m) == []
    model = TrainerV1alpha1TrainJob.from_dict(m)
    assert model.api_version == "trainer.kubeflow.org/v1alpha1" and model.kind == "TrainJob"
    assert model.spec.runtime_ref.name == "torch-distributed"
    assert model.spec.runtime_ref.kind == "ClusterTrainingRuntime"
    t = model.spec.trainer
    assert t.num_nodes == 2 and t.num_proc_per_node == 4  # one process per GPU by default
    assert t.image == "registry.example.com/ml/preftune:0.1.0-cuda"
    limits = {k: q.actual_instance for k, q in t.resources_per_node.limits.items()}
    assert limits == {"memory": "16Gi", "cpu": "16", "nvidia.com/gpu": "4"}
    assert {k: q.actual_instance for k, q in t.resources_per_node.requests.items()} == {"cpu": "4", "memory": "16Gi"}
    assert model.spec.active_deadline_seconds == 7200
    assert model.metadata.namespace == "ml-train"
    assert model.metadata.labels["preftune.io/run"] == "nightly-run-7"
    pod = model.spec.runtime_patches[0].training_runtime_spec.template.spec.replicated_jobs[0]
    assert pod.name == "node"
    spec = pod.template.spec.template.spec
    assert spec.node_selector == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert spec.service_account_name == "preftune-train"
    assert spec.containers[0].name == "node"
    assert "/var/lib/preftune" in {mt.mount_path for mt in spec.containers[0].volume_mounts}


def test_the_schema_check_catches_a_misspelt_field():
    m = tj.trainjob_manifest(full_cfg(), "s3://models/rm", "s3://models/policy")
    m["spec"]["trainer"]["numNode"] = m["spec"]["trainer"].pop("numNodes")
    m["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"][
        "template"
    ]["spec"]["nodeSelecter"] = {"a": "b"}
    problems = schema_problems(m)
    assert any("numNode" in p for p in problems) and any("nodeSelecter" in p for p in problems)


def test_pod_bits_load_into_kubernetes_models_and_validate_strictly():
    m = tj.trainjob_manifest(full_cfg(), "s3://models/rm", "s3://models/policy")
    trainer = m["spec"]["trainer"]
    patch = m["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod_patch = patch["template"]["spec"]["template"]["spec"]
    api = ApiClient()
    for obj, model in [
        (trainer["resourcesPerNode"], "V1ResourceRequirements"),
        *[(e, "V1EnvVar") for e in trainer["env"]],
        *[(t, "V1Toleration") for t in pod_patch["tolerations"]],
        *[(v, "V1Volume") for v in pod_patch["volumes"]],
        *[(v, "V1VolumeMount") for v in pod_patch["containers"][0]["volumeMounts"]],
        *[(s, "V1LocalObjectReference") for s in pod_patch["imagePullSecrets"]],
    ]:
        loaded = api._ApiClient__deserialize(obj, model)  # the client's own deserialiser
        assert isinstance(loaded, getattr(k8s_models, model))
        assert _drop_none(api.sanitize_for_serialization(loaded)) == obj, model
    # the pod a node gets (runtime template + trainer + patch), validated strictly
    pod = node_pod(m)
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    bad = json.loads(json.dumps(pod))
    bad["spec"]["containers"][0]["env"][0]["valeu"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def test_nodes_run_the_ppo_command_under_torchrun_with_the_same_config():
    cfg = full_cfg()
    m = tj.trainjob_manifest(cfg, "s3://models/rm", "s3://models/policy", pipeline_run_id="p-1", parent_run_id="r-9")
    trainer = m["spec"]["trainer"]
    assert trainer["command"][:2] == ["/bin/sh", "-c"]
    words = shlex.split(trainer["command"][2])
    run = words[words.index("exec") + 1 :]
    assert run[:4] == ["torchrun", "-m", "preftune.cli", "ppo"]
    assert "--nnodes" not in run and "--nproc-per-node" not in run  # torchrun reads the Trainer's PET_* variables
    assert run[run.index("--config") + 1] == tj.CONFIG_FILE
    assert run[run.index("--reward-model") + 1] == "$PREFTUNE_REWARD_MODEL"
    env = {e["name"]: e for e in trainer["env"]}
    assert env["PREFTUNE_REWARD_MODEL"]["value"] == "s3://models/rm"
    assert env["PREFTUNE_OUTPUT"]["value"] == "s3://models/policy"
    assert env["PREFTUNE_PIPELINE_RUN_ID"]["value"] == "p-1"
    assert env["PREFTUNE_PARENT_RUN_ID"]["value"] == "r-9"
    assert env["PREFTUNE_HOME"]["value"] == "/var/lib/preftune"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-creds",
        "key": "secret-key",
        "optional": True,
    }
    # the config the nodes read back is the same config (as YAML, which JSON is)
    again = parse_config(yaml.safe_load(env["PREFTUNE_RUN_CONFIG"]["value"]))
    assert again.config_hash() == cfg.config_hash()


def test_defaults_give_a_minimal_valid_trainjob():
    m = tj.trainjob_manifest(RunConfig(), "s3://b/rm", "s3://b/out")
    assert schema_problems(m) == []
    assert "activeDeadlineSeconds" not in m["spec"]  # runtimePatches: always (the pod security context)
    assert m["spec"]["trainer"]["numNodes"] == 1 and m["spec"]["trainer"]["numProcPerNode"] == 1
    assert "nvidia.com/gpu" not in m["spec"]["trainer"]["resourcesPerNode"]["limits"]
    assert "namespace" not in m["metadata"]
    # same run and inputs, same name (a retried task finds its TrainJob); other output, other name
    assert m["metadata"]["name"] == tj.trainjob_manifest(RunConfig(), "s3://b/rm", "s3://b/out")["metadata"]["name"]
    assert m["metadata"]["name"] != tj.trainjob_manifest(RunConfig(), "s3://b/rm", "s3://b/o2")["metadata"]["name"]
    assert m["metadata"]["name"].startswith("preftune-ppo-") and len(m["metadata"]["name"]) == 21


def test_processes_per_node_override_and_batch_split_check():
    cfg = full_cfg(processes_per_node=2, nodes=4)
    assert tj.trainjob_manifest(cfg, "s3://b/rm", "s3://b/out")["spec"]["trainer"]["numProcPerNode"] == 2
    with pytest.raises(ConfigError, match=r"ppo.batch_size \(64\) must be a multiple .*\(3 nodes x 4 per node = 12\)"):
        tj.trainjob_manifest(full_cfg(nodes=3), "s3://b/rm", "s3://b/out")
    small_mini = full_cfg(nodes=4)
    small_mini.ppo.mini_batch_size = 8
    with pytest.raises(ConfigError, match=r"ppo.mini_batch_size \(8\) must be a multiple .* = 16"):
        tj.trainjob_manifest(small_mini, "s3://b/rm", "s3://b/out")


def test_inputs_must_be_visible_to_every_node():
    with pytest.raises(ConfigError, match="reward model '/tmp/rm' is a local path"):
        tj.trainjob_manifest(full_cfg(), "/tmp/rm", "s3://b/out")
    no_pvc = RunConfig()
    with pytest.raises(ConfigError, match="output '/var/lib/preftune/out'"):
        tj.trainjob_manifest(no_pvc, "s3://b/rm", "/var/lib/preftune/out")
    # on the shared model-cache claim, a path is fine
    tj.trainjob_manifest(full_cfg(), "/var/lib/preftune/rm", "s3://b/out")


@pytest.mark.parametrize(
    "trainer, msg",
    [
        ({"nodes": 0}, "nodes"),
        ({"runtime": "Torch_Distributed"}, "not a valid Kubernetes name"),
        ({"name_prefix": "x" * 32}, "at most 31"),
        ({"name_prefix": "9ppo"}, "DNS-1035"),  # the CRD wants a letter first
        ({"name_prefix": "ppo-"}, "DNS-1035"),
        ({"container": "Node"}, "DNS-1123"),
        ({"namespace": "ML_Train"}, "DNS-1123"),
        ({"runtime_kind": "PyTorchJob"}, "runtime_kind"),
    ],
)
def test_trainer_section_rejects_bad_values(trainer: dict[str, Any], msg: str):
    with pytest.raises(ConfigError, match=msg):
        parse_config({"kubernetes": {"trainer": trainer}})


class FakeApi:
    """Stands in for kubernetes.client.CustomObjectsApi: a TrainJob that goes through given states."""

    def __init__(self, states: list[dict[str, Any]], exists: bool = False) -> None:
        self.states = states
        self.exists = exists
        self.created: list[tuple[Any, ...]] = []
        self.gets = 0

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        if self.exists:
            err = Exception("AlreadyExists")
            err.status = 409  # type: ignore[attr-defined]
            raise err
        self.created.append((group, version, namespace, plural, body["metadata"]["name"]))

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        state = self.states[min(self.gets, len(self.states) - 1)]
        self.gets += 1
        return {"metadata": {"name": name}, "status": state}


def cond(kind: str, status: str = "True", **kw: str) -> dict[str, Any]:
    return {"conditions": [{"type": kind, "status": status, **kw}]}


def test_submit_and_wait_until_complete():
    m = tj.trainjob_manifest(RunConfig(), "s3://b/rm", "s3://b/out")
    api = FakeApi([{}, cond("Created"), cond("Complete", "False"), cond("Complete")])
    sleeps: list[float] = []
    obj = tj.submit_and_wait(m, namespace="ns", poll_s=7, api=api, sleep=sleeps.append)
    assert tj.trainjob_state(obj) == "complete"
    assert api.created == [("trainer.kubeflow.org", "v1alpha1", "ns", "trainjobs", m["metadata"]["name"])]
    assert sleeps == [7, 7, 7]


def test_submit_and_wait_reuses_an_existing_trainjob_and_reports_failure():
    m = tj.trainjob_manifest(RunConfig(), "s3://b/rm", "s3://b/out")
    api = FakeApi([cond("Failed", reason="BackoffLimitExceeded", message="node-0 exited 12")], exists=True)
    with pytest.raises(PreftuneError, match="failed: BackoffLimitExceeded: node-0 exited 12"):
        tj.submit_and_wait(m, namespace="ns", poll_s=1, api=api, sleep=lambda s: None)
    assert api.created == []


def test_submit_and_wait_gives_up_after_the_timeout():
    m = tj.trainjob_manifest(RunConfig(), "s3://b/rm", "s3://b/out")
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    with pytest.raises(PreftuneError, match="still running after 60 s"):
        tj.submit_and_wait(
            m, namespace="ns", poll_s=25, timeout_s=60, api=FakeApi([{}]), sleep=sleep, clock=lambda: now[0]
        )


def test_cli_writes_the_manifest(tmp_path, capsys):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(FULL))
    out = tmp_path / "trainjob.yaml"
    with pytest.raises(SystemExit) as ex:
        main(["kube", "trainjob", "-c", str(cfg_file), "-r", "s3://b/rm", "-o", "s3://b/out", "-f", str(out)])
    assert ex.value.code == 0
    written = yaml.safe_load(out.read_text())
    assert written == tj.trainjob_manifest(full_cfg(), "s3://b/rm", "s3://b/out")
    with pytest.raises(SystemExit) as ex:
        main(["kube", "trainjob", "-c", str(cfg_file), "-r", "relative/rm", "-o", "s3://b/out"])
    assert ex.value.code == 2
    assert "local path" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Issue 16: restricted Pod Security, Kubernetes versions, names, the Trainer version


KUBE_VERSIONS = [f"1.{minor}.0" for minor in range(28, 35)]


@pytest.mark.parametrize(
    "cfg",
    [
        pytest.param(lambda: full_cfg(), id="full"),
        pytest.param(lambda: RunConfig(), id="defaults"),
        pytest.param(lambda: RunConfig.model_validate({"kubernetes": {"run_as_user": None}}), id="platform-uid"),
    ],
)
def test_trainjob_nodes_meet_the_restricted_pod_security_standard(cfg):
    """The same checker as the chart's pods (tests/support/podsecurity.py), and strict schemas 1.28-1.34."""
    m = tj.trainjob_manifest(cfg(), "s3://b/rm", "s3://b/out")
    assert schema_problems(m) == []
    pod = node_pod(m)
    assert restricted_problems("TrainJob node", pod["spec"]) == []
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)
    # the node script writes the run config under /tmp: a writable emptyDir on a read-only root
    assert tj.CONFIG_FILE.startswith("/tmp/")
    mounts = {mt["mountPath"] for mt in pod["spec"]["containers"][0]["volumeMounts"]}
    assert {"/tmp", "/dev/shm", "/var/lib/preftune"} <= mounts


def test_the_restricted_checker_flags_a_node_without_a_security_context():
    pod = node_pod(tj.trainjob_manifest(RunConfig(), "s3://b/rm", "s3://b/out"))
    del pod["spec"]["securityContext"]
    del pod["spec"]["containers"][0]["securityContext"]
    problems = "\n".join(restricted_problems("node", pod["spec"]))
    for fragment in ("runAsNonRoot", "allowPrivilegeEscalation", "drop ALL", "seccompProfile", "root filesystem"):
        assert fragment in problems


def test_cli_rejects_a_trainjob_name_that_is_not_a_dns_1035_label(capsys):
    with pytest.raises(SystemExit) as ex:
        main(["kube", "trainjob", "-r", "s3://b/rm", "-o", "s3://b/out", "--name", "Bad_Name.1"])
    assert ex.value.code == 2
    assert "DNS-1035" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        tj.trainjob_manifest(RunConfig(), "s3://b/rm", "s3://b/out", name="9-lives")
    assert tj.trainjob_manifest(RunConfig(), "s3://b/rm", "s3://b/out", name="ppo-7")["metadata"]["name"] == "ppo-7"


def test_every_generated_trainjob_name_is_a_dns_1035_label():
    from preftune.kube.names import DNS1035_LABEL

    for prefix in ("a", "preftune-ppo", "p" * 31):
        cfg = RunConfig.model_validate({"kubernetes": {"trainer": {"name_prefix": prefix}}})
        name = tj.trainjob_manifest(cfg, "s3://b/rm", "s3://b/out")["metadata"]["name"]
        assert DNS1035_LABEL.match(name) and len(name) <= 63


class FakeApiext:
    def __init__(self, crd: dict[str, Any] | None, status: int = 404) -> None:
        self.crd, self.status = crd, status

    def read_custom_resource_definition(self, name: str) -> dict[str, Any]:
        assert name == "trainjobs.trainer.kubeflow.org"
        if self.crd is None:
            err = Exception("not found")
            err.status = self.status  # type: ignore[attr-defined]
            raise err
        return self.crd


class FakeCustom:
    def __init__(self, runtimes: set[str]) -> None:
        self.runtimes = runtimes

    def get_cluster_custom_object(self, group, version, plural, name):
        assert (group, plural) == ("trainer.kubeflow.org", "clustertrainingruntimes")
        if name not in self.runtimes:
            err = Exception("not found")
            err.status = 404  # type: ignore[attr-defined]
            raise err
        return {"metadata": {"name": name}}


def crd(fields: list[str], version_label: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "trainjobs.trainer.kubeflow.org"}
    if version_label:
        meta["labels"] = {"app.kubernetes.io/version": version_label}
    props = {f: {"type": "object"} for f in fields}
    return {
        "metadata": meta,
        "spec": {
            "versions": [
                {
                    "name": "v1alpha1",
                    "served": True,
                    "schema": {"openAPIV3Schema": {"properties": {"spec": {"properties": props}}}},
                }
            ]
        },
    }


V22_FIELDS = ["runtimeRef", "trainer", "initializer", "runtimePatches", "activeDeadlineSeconds", "suspend"]
V21_FIELDS = ["runtimeRef", "trainer", "initializer", "podSpecOverrides", "suspend"]


def test_doctor_accepts_trainer_2_2_and_names_what_an_older_or_absent_trainer_lacks():
    from preftune.kube import doctor

    cfg = RunConfig()
    ok = doctor.check_cluster(
        cfg, apiext=FakeApiext(crd(V22_FIELDS, "v2.2.0")), custom=FakeCustom({"torch-distributed"}), namespace="ns"
    )
    assert all(c.ok for c in ok), ok
    doctor.require_ready(ok)
    old = doctor.check_cluster(
        cfg, apiext=FakeApiext(crd(V21_FIELDS, "v2.1.0")), custom=FakeCustom({"torch-distributed"}), namespace="ns"
    )
    with pytest.raises(ConfigError, match=r"activeDeadlineSeconds.*runtimePatches.*older than v2.2"):
        doctor.require_ready(old)
    assert any(c.name == "Trainer release" and not c.ok for c in old)
    absent = doctor.check_cluster(cfg, apiext=FakeApiext(None), custom=FakeCustom(set()), namespace="ns")
    with pytest.raises(ConfigError, match="not installed: install Kubeflow Trainer >= v2.2"):
        doctor.require_ready(absent)
    no_runtime = doctor.check_cluster(cfg, apiext=FakeApiext(crd(V22_FIELDS)), custom=FakeCustom(set()), namespace="ns")
    with pytest.raises(ConfigError, match="ClusterTrainingRuntime torch-distributed does not exist"):
        doctor.require_ready(no_runtime)


def test_submitting_to_a_cluster_without_the_trainer_says_which_version_to_install():
    class NoTrainer(FakeApi):
        def create_namespaced_custom_object(self, *args):
            err = Exception("the server could not find the requested resource")
            err.status = 404  # type: ignore[attr-defined]
            raise err

    m = tj.trainjob_manifest(RunConfig(), "s3://b/rm", "s3://b/out")
    with pytest.raises(ConfigError, match=r"Kubeflow Trainer >= v2.2"):
        tj.submit_and_wait(m, namespace="ns", poll_s=1, api=NoTrainer([{}]), sleep=lambda s: None)
