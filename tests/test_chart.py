"""The Helm chart, rendered by a real Helm engine and checked offline, as a cluster's admission would.

For the default values and every value set in ``charts/preftune/ci/*-values.yaml``:

- ``helm lint --strict`` passes and ``helm template`` renders;
- every object is valid against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown
  fields are errors) of the chart's oldest supported Kubernetes, of the version Helm was built
  against, and of the newest version kubernetes-validate ships; CRD kinds (ServiceMonitor) are
  checked field by field instead;
- every object loads into the official Kubernetes Python client's models and serialises back
  unchanged (nothing dropped as unknown);
- every Pod spec meets the restricted Pod Security Standard and our policy: probes, resources,
  pinned image, secrets only by reference;
- the commands the containers run parse with the real CLIs (mlflow, preftune), and the run config
  the schedule Job registers parses with preftune's RunConfig.

``values.schema.json`` must reject wrong values: a test feeds it some.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes.client as k8s_models
import kubernetes_validate
import pytest
import yaml
from kubernetes.client import ApiClient
from support.helm import REPO, Helm, HelmError, in_ci, require_helm, unavailable
from support.podsecurity import restricted_problems

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

CHART = REPO / "charts" / "preftune"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
VALUE_SETS: dict[str, list[Path]] = {"default": []} | {p.name.removesuffix("-values.yaml"): [p] for p in CI_VALUES}
RELEASE = "rel"
NAMESPACE = "preftune"

#: Kinds Kubernetes itself does not define: kubernetes-validate has no schema for them.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
#: Workloads that run until stopped: they need liveness and readiness probes.
LONG_RUNNING = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"}
#: Env names that carry credentials and so must come from a Secret.
SECRET_ENV = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY|PRIVATE_KEY|CREDENTIAL|DATABASE_URL|STORE_URI)")
#: ... unless they only name where a credential is (a path), not the credential.
SECRET_ENV_EXEMPT = re.compile(r"(_PATH|_FILE)$")
#: Values that look like credentials wherever they appear.
CREDENTIAL_VALUE = re.compile(r"(://[^/\s:@]+:[^/\s@]+@|AKIA[0-9A-Z]{16}|-----BEGIN|[A-Fa-f0-9]{40,})")


# ---------------------------------------------------------------------------------------------
# Rendering (once per value set per session)


@pytest.fixture(scope="session")
def helm() -> Helm:
    return require_helm()


_RENDERED: dict[str, list[dict[str, Any]]] = {}


def render(helm: Helm, value_set: str) -> list[dict[str, Any]]:
    if value_set not in _RENDERED:
        _RENDERED[value_set] = helm.template(
            CHART, release=RELEASE, namespace=NAMESPACE, values_files=VALUE_SETS[value_set]
        )
    return _RENDERED[value_set]


def values_of(value_set: str) -> dict[str, Any]:
    """The merged values of a value set (chart defaults overlaid by the ci file), for expectations."""
    merged = yaml.safe_load((CHART / "values.yaml").read_text())
    for path in VALUE_SETS[value_set]:
        merged = _merge(merged, yaml.safe_load(path.read_text()) or {})
    return merged


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base.get(k), v) if k in base else v
        return out
    return over


def find(objs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]


def one(objs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = find(objs, kind, name_suffix)
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_specs(objs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(object, pod template metadata, pod spec) of every object that makes pods."""
    for o in objs:
        if o["kind"] == "Pod":
            yield o, o["metadata"], o["spec"]
        elif o["kind"] in LONG_RUNNING | {"Job"}:
            yield o, o["spec"]["template"]["metadata"], o["spec"]["template"]["spec"]
        elif o["kind"] == "CronJob":
            t = o["spec"]["jobTemplate"]["spec"]["template"]
            yield o, t["metadata"], t["spec"]


def container(objs: list[dict[str, Any]], kind: str, suffix: str, name: str) -> dict[str, Any]:
    obj = one(objs, kind, suffix)
    spec = obj["spec"] if kind == "Pod" else obj["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def chart_meta() -> dict[str, Any]:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


def kube_versions() -> list[str]:
    """Oldest supported (Chart.yaml kubeVersion), Helm 4.1's client (1.35) and the newest schema shipped."""
    floor = re.search(r">=\s*v?(\d+\.\d+)", chart_meta()["kubeVersion"])
    assert floor, "Chart.yaml kubeVersion must state a lower bound"
    versions = {f"{floor.group(1)}.0", "1.35.0", kubernetes_validate.latest_version()}
    return sorted(versions, key=lambda v: tuple(int(x) for x in v.split(".")))


value_sets = pytest.mark.parametrize("value_set", list(VALUE_SETS))


# ---------------------------------------------------------------------------------------------
# Chart metadata


def test_chart_version_and_app_version_follow_the_package_version():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    meta = chart_meta()
    assert meta["apiVersion"] == "v2"
    assert str(meta["version"]) == project["version"]
    assert str(meta["appVersion"]) == project["version"]


def test_the_issue_value_sets_exist():
    names = set(VALUE_SETS)
    for wanted in ("all-enabled", "external-postgres-s3", "no-mlflow", "gpu-schedule"):
        assert wanted in names, f"charts/preftune/ci/{wanted}-values.yaml is missing"


# ---------------------------------------------------------------------------------------------
# Lint, render, schema-validate, load into the client's models


@value_sets
def test_helm_lint_strict(helm: Helm, value_set: str):
    proc = helm.lint(CHART, values_files=VALUE_SETS[value_set])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[ERROR]" not in proc.stdout and "[WARNING]" not in proc.stdout, proc.stdout


def validate_objects(objs: list[dict[str, Any]], versions: list[str]) -> list[str]:
    """Every non-CRD object against the strict OpenAPI schemas; returns the problems."""
    problems = []
    for o in objs:
        if (o.get("apiVersion"), o.get("kind")) in CRD_KINDS:
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                problems.append(f"{o.get('kind')}/{o.get('metadata', {}).get('name')} on {version}: {err.message}")
            except kubernetes_validate.SchemaNotFoundError as err:
                problems.append(f"{o.get('kind')} has no schema on {version}: {err}")
    return problems


@value_sets
def test_rendered_objects_are_valid_kubernetes(helm: Helm, value_set: str):
    objs = render(helm, value_set)
    assert objs, "helm template rendered nothing"
    problems = validate_objects(objs, kube_versions())
    assert not problems, "\n".join(problems)


def _model_name(obj: dict[str, Any]) -> str:
    version = obj["apiVersion"].split("/")[-1]
    return version[0].upper() + version[1:] + obj["kind"]


def _drop_none(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _drop_none(v) for k, v in o.items() if v is not None}
    if isinstance(o, list):
        return [_drop_none(v) for v in o]
    return o


def load_into_models(objs: list[dict[str, Any]]) -> list[str]:
    """Deserialise each object into the client's model and back; returns the differences."""
    api = ApiClient()
    problems = []
    for o in objs:
        if (o["apiVersion"], o["kind"]) in CRD_KINDS:
            continue
        name = _model_name(o)
        if not hasattr(k8s_models, name):
            problems.append(f"the kubernetes client has no model {name}")
            continue
        model = api._ApiClient__deserialize(o, name)  # the client's own deserialiser
        assert isinstance(model, getattr(k8s_models, name))
        back = _drop_none(api.sanitize_for_serialization(model))
        if back != o:
            problems.append(f"{o['kind']}/{o['metadata']['name']} does not survive the {name} model round trip")
    return problems


@value_sets
def test_rendered_objects_load_into_the_kubernetes_client_models(helm: Helm, value_set: str):
    problems = load_into_models(render(helm, value_set))
    assert not problems, "\n".join(problems)


def test_the_validators_catch_a_broken_object(helm: Helm):
    """The two checks above can fail: a misspelled field and a wrong type are caught by both."""
    dep = next(o for o in render(helm, "default") if o["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(dep))
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"httpGet": {"path": "/", "port": 1}}
    assert validate_objects([broken], ["1.35.0"])
    assert load_into_models([broken])
    broken = yaml.safe_load(yaml.safe_dump(dep))
    broken["spec"]["replicas"] = "two"
    assert validate_objects([broken], ["1.35.0"])


# ---------------------------------------------------------------------------------------------
# Policy on every Pod spec


def _pod_problems(obj: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    p: list[str] = restricted_problems(where, spec)
    for c in spec.get("initContainers", []) + spec["containers"]:
        cw = f"{where} container {c['name']}"
        # resources
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(part, {}):
                    p.append(f"{cw}: no {part}.{r}")
        # probes on long-running containers (init containers run to completion first)
        if obj["kind"] in LONG_RUNNING and c in spec["containers"]:
            for probe in ("livenessProbe", "readinessProbe"):
                if probe not in c:
                    p.append(f"{cw}: no {probe}")
            ports = {port.get("name") for port in c.get("ports", [])} | {
                port["containerPort"] for port in c.get("ports", [])
            }
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                get = c.get(probe, {}).get("httpGet")
                if get and get["port"] not in ports:
                    p.append(f"{cw}: {probe} port {get['port']} is not a container port")
        # image
        image = c["image"]
        if "@sha256:" not in image:
            tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else ""
            if not tag:
                p.append(f"{cw}: image {image} has no tag")
            elif tag.lower() == "latest":
                p.append(f"{cw}: image {image} uses latest")
        if c.get("imagePullPolicy") != "IfNotPresent":
            p.append(f"{cw}: imagePullPolicy is {c.get('imagePullPolicy')}")
        # secrets only by reference
        for e in c.get("env", []):
            if "value" in e and SECRET_ENV.search(e["name"]) and not SECRET_ENV_EXEMPT.search(e["name"]):
                p.append(f"{cw}: {e['name']} is a literal value, not a secretKeyRef")
            if "value" in e and CREDENTIAL_VALUE.search(str(e["value"])):
                p.append(f"{cw}: {e['name']} looks like it holds a credential")
            vf = e.get("valueFrom", {})
            if SECRET_ENV.search(e["name"]) and not SECRET_ENV_EXEMPT.search(e["name"]) and "secretKeyRef" not in vf:
                p.append(f"{cw}: {e['name']} must come from a secretKeyRef")
        for ef in c.get("envFrom", []):
            if set(ef) - {"secretRef", "configMapRef", "prefix"}:
                p.append(f"{cw}: envFrom {ef}")
        for arg in c.get("args", []) + c.get("command", []):
            if CREDENTIAL_VALUE.search(str(arg)):
                p.append(f"{cw}: argument looks like a credential: {arg[:40]}")
    return p


@value_sets
def test_every_pod_spec_follows_the_restricted_standard_and_our_policy(helm: Helm, value_set: str):
    specs = list(pod_specs(render(helm, value_set)))
    assert specs, "no pod specs rendered"
    problems = [p for obj, _meta, spec in specs for p in _pod_problems(obj, spec)]
    assert not problems, "\n".join(problems)


def test_the_policy_check_can_fail(helm: Helm):
    objs = render(helm, "default")
    obj, _meta, spec = next(pod_specs([o for o in objs if o["kind"] == "Deployment"]))
    bad = yaml.safe_load(yaml.safe_dump(spec))
    c = bad["containers"][0]
    c["image"] = "preftune:latest"
    c["securityContext"]["allowPrivilegeEscalation"] = True
    c["env"].append({"name": "PREFTUNE_ADMIN_TOKEN", "value": "hunter2"})
    del c["readinessProbe"]
    del c["resources"]["limits"]
    problems = "\n".join(_pod_problems(obj, bad))
    for fragment in ("latest", "allowPrivilegeEscalation", "PREFTUNE_ADMIN_TOKEN", "readinessProbe", "limits.cpu"):
        assert fragment in problems


@value_sets
def test_no_secret_objects_and_only_the_configured_secrets_are_referenced(helm: Helm, value_set: str):
    objs = render(helm, value_set)
    assert not [o for o in objs if o["kind"] == "Secret"], "the chart must not create Secrets"
    referenced: set[str] = set()
    for _obj, _meta, spec in pod_specs(objs):
        for c in spec["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced.add(ref["name"])
            for ef in c.get("envFrom", []):
                if "secretRef" in ef:
                    referenced.add(ef["secretRef"]["name"])
        for v in spec.get("volumes", []):
            if "secret" in v:
                referenced.add(v["secret"]["secretName"])
    v = values_of(value_set)
    configured = {
        v["feedback"]["database"]["existingSecret"] if v["feedback"]["enabled"] else "",
        v["feedback"]["adminToken"]["existingSecret"] if v["feedback"]["enabled"] else "",
        v["mlflow"]["backendStore"]["existingSecret"] if v["mlflow"]["enabled"] else "",
        v["mlflow"]["artifacts"]["s3"]["existingSecret"] if v["mlflow"]["enabled"] else "",
        v["tracking"]["existingSecret"] if v["schedule"]["enabled"] else "",
        *(v["feedback"]["extraEnvFromSecrets"] if v["feedback"]["enabled"] else []),
        *(v["schedule"]["extraEnvFromSecrets"] if v["schedule"]["enabled"] else []),
        *(v["observe"]["extraEnvFromSecrets"] if v["observe"]["enabled"] else []),
        v["mlflow"]["auth"]["existingSecret"] if v["mlflow"]["enabled"] and v["mlflow"]["auth"]["enabled"] else "",
    } - {""}
    for component in ("feedback", "mlflow", "schedule", "observe"):
        c = v[component]
        if c["enabled"]:
            configured |= {ef["secretRef"]["name"] for ef in c["extraEnvFrom"] if "secretRef" in ef}
            configured |= {vol["secret"]["secretName"] for vol in c["extraVolumes"] if "secret" in vol}
    assert referenced == configured


# ---------------------------------------------------------------------------------------------
# Labels, selectors and wiring between objects


@value_sets
def test_standard_labels_and_selectors_that_match(helm: Helm, value_set: str):
    objs = render(helm, value_set)
    app_version = str(chart_meta()["appVersion"])
    for o in objs:
        labels = o["metadata"].get("labels", {})
        for key in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/component",
            "app.kubernetes.io/part-of",
            "helm.sh/chart",
        ):
            assert key in labels, f"{o['kind']}/{o['metadata']['name']} lacks label {key}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == app_version
    pod_labels = [meta.get("labels", {}) for _o, meta, _s in pod_specs(objs)]

    def selects(selector: dict[str, str]) -> bool:
        return any(selector.items() <= lbl.items() for lbl in pod_labels)

    for o in objs:
        if o["kind"] in LONG_RUNNING:
            sel = o["spec"]["selector"]["matchLabels"]
            assert sel.items() <= o["spec"]["template"]["metadata"]["labels"].items()
        if o["kind"] == "Service":
            assert selects(o["spec"]["selector"]), f"Service {o['metadata']['name']} selects no pod"
            target = [
                d
                for d in objs
                if d["kind"] == "Deployment"
                and o["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
            ]
            ports = {
                p["name"]
                for d in target
                for c in d["spec"]["template"]["spec"]["containers"]
                for p in c.get("ports", [])
            }
            for port in o["spec"]["ports"]:
                assert port["targetPort"] in ports, f"{o['metadata']['name']}: targetPort {port['targetPort']}"
        if o["kind"] in ("PodDisruptionBudget", "NetworkPolicy"):
            sel = o["spec"]["podSelector" if o["kind"] == "NetworkPolicy" else "selector"]["matchLabels"]
            if o["metadata"]["name"].endswith("-training"):
                # the pipeline's pods: Kubeflow creates them, selected by the configured selector
                assert o["spec"]["podSelector"] == values_of(value_set)["networkPolicy"]["training"]["podSelector"]
                continue
            assert selects(sel), f"{o['kind']} {o['metadata']['name']} selects no pod"
        if o["kind"] == "HorizontalPodAutoscaler":
            ref = o["spec"]["scaleTargetRef"]
            assert one(objs, ref["kind"], ref["name"])["metadata"]["name"] == ref["name"]
        if o["kind"] == "Ingress":
            services = {s["metadata"]["name"]: s for s in find(objs, "Service")}
            for rule in o["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    backend = path["backend"]["service"]
                    assert backend["name"] in services
                    assert backend["port"]["name"] in {p["name"] for p in services[backend["name"]]["spec"]["ports"]}
    for _o, _meta, spec in pod_specs(objs):
        sa = spec.get("serviceAccountName")
        if sa and values_of(value_set)["serviceAccount"]["create"]:
            assert one(objs, "ServiceAccount", sa)


def test_image_defaults_to_the_app_version_and_can_be_pinned_by_digest(helm: Helm):
    app_version = str(chart_meta()["appVersion"])
    images = {c["image"] for _o, _m, s in pod_specs(render(helm, "default")) for c in s["containers"]}
    assert images == {f"preftune:{app_version}"}
    digest = "sha256:" + "a" * 64
    objs = helm.template(CHART, set_values=[f"image.digest={digest}", "image.registry=reg.example.com"])
    images = {c["image"] for _o, _m, s in pod_specs(objs) for c in s["containers"]}
    assert images == {f"reg.example.com/preftune@{digest}"}


# ---------------------------------------------------------------------------------------------
# The feedback service: settings contract with preftune/serve/settings.py


@value_sets
def test_feedback_env_is_the_service_settings_contract(helm: Helm, value_set: str, monkeypatch):
    objs = render(helm, value_set)
    if not values_of(value_set)["feedback"]["enabled"]:
        assert not find(objs, "Deployment", "-feedback")
        return
    from preftune.serve import settings as settings_mod

    fields = set(settings_mod.ServeSettings.model_fields)
    c = container(objs, "Deployment", "-feedback", "feedback")
    env = env_of(c)
    assert c["args"] == ["serve", "--host", "0.0.0.0", "--port", "8080"]
    assert env["PREFTUNE_HOME"]["value"] == "/var/lib/preftune"
    for name in env:
        if name.startswith("PREFTUNE_") and name != "PREFTUNE_HOME":
            assert name.removeprefix("PREFTUNE_").lower() in fields, f"{name} is not a ServeSettings field"
    # the plain values are valid settings
    for name in list(os.environ):
        if name.startswith("PREFTUNE_") and name != "PREFTUNE_HOME":
            monkeypatch.delenv(name)
    for name, e in env.items():
        if "value" in e:
            monkeypatch.setenv(name, e["value"])
    settings = settings_mod.load_settings()
    assert settings.ratings_per_task == values_of(value_set)["feedback"]["settings"]["ratingsPerTask"]
    v = values_of(value_set)["feedback"]
    if v["database"]["existingSecret"]:
        assert env["PREFTUNE_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": v["database"]["existingSecret"],
            "key": v["database"]["urlKey"],
        }
        dep = one(objs, "Deployment", "-feedback")
        assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    else:
        assert "PREFTUNE_DATABASE_URL" not in env  # the service's SQLite default under PREFTUNE_HOME
        home = next(
            vol
            for vol in one(objs, "Deployment", "-feedback")["spec"]["template"]["spec"]["volumes"]
            if vol["name"] == "home"
        )
        assert "persistentVolumeClaim" in home, "SQLite must live on a volume, not an emptyDir"
    spec = one(objs, "Deployment", "-feedback")["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > v["settings"]["shutdownTimeoutSeconds"]


def test_more_than_one_feedback_replica_needs_an_external_database(helm: Helm):
    proc = helm.template_text(CHART, set_values=["feedback.replicaCount=2"], check=False)
    assert proc.returncode != 0 and "feedback.database.existingSecret" in proc.stderr
    proc = helm.template_text(CHART, set_values=["feedback.autoscaling.enabled=true"], check=False)
    assert proc.returncode != 0 and "external database" in proc.stderr


# ---------------------------------------------------------------------------------------------
# MLflow server


@value_sets
def test_mlflow_server_command_parses_with_the_real_mlflow_cli(helm: Helm, value_set: str, monkeypatch):
    objs = render(helm, value_set)
    v = values_of(value_set)["mlflow"]
    if not values_of(value_set)["mlflow"]["enabled"]:
        assert not find(objs, "Deployment", "-mlflow") and not find(objs, "Service", "-mlflow")
        return
    from mlflow.cli import server as mlflow_server_cmd

    c = container(objs, "Deployment", "-mlflow", "mlflow")
    env = env_of(c)
    assert c["command"] == ["mlflow"] and c["args"][0] == "server"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    # secretKeyRef values arrive as environment variables in the pod; stand-ins here
    for name, e in env.items():
        monkeypatch.setenv(name, e.get("value", f"from-secret-{name}"))
    ctx = mlflow_server_cmd.make_context("server", list(c["args"][1:]))
    params = ctx.params
    assert params["host"] == "0.0.0.0" and params["port"] == v["port"]
    assert params["serve_artifacts"] is True
    if v["backendStore"]["existingSecret"]:
        assert (
            env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == v["backendStore"]["existingSecret"]
        )
        assert params["backend_store_uri"] == "from-secret-MLFLOW_BACKEND_STORE_URI"  # read from the env by mlflow
    else:
        assert params["backend_store_uri"].startswith("sqlite:////var/lib/mlflow/")
    if v["artifacts"]["destination"]:
        assert params["artifacts_destination"] == v["artifacts"]["destination"]
    else:
        assert params["artifacts_destination"].startswith("/var/lib/mlflow/")
    if v["artifacts"]["s3"]["endpointUrl"]:
        assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == v["artifacts"]["s3"]["endpointUrl"]
    if v["artifacts"]["s3"]["existingSecret"]:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[name]["valueFrom"]["secretKeyRef"]["name"] == v["artifacts"]["s3"]["existingSecret"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    # SQLite backend, local artifacts, or basic auth's user store
    needs_volume = not (v["backendStore"]["existingSecret"] and v["artifacts"]["destination"]) or v["auth"]["enabled"]
    assert ("/var/lib/mlflow" in mounts) == needs_volume
    assert bool(find(objs, "PersistentVolumeClaim", "-mlflow")) == (needs_volume and v["persistence"]["enabled"])


@value_sets
def test_mlflow_accepts_the_host_pipeline_steps_use(helm: Helm, value_set: str):
    """MLflow rejects unknown Host headers (DNS-rebinding guard): the tracking URI in the run
    config must be one it accepts, checked with MLflow's own matcher."""
    objs = render(helm, value_set)
    if not values_of(value_set)["mlflow"]["enabled"]:
        return
    from mlflow.server.security_utils import is_allowed_host_header

    args = container(objs, "Deployment", "-mlflow", "mlflow")["args"]
    allowed = args[args.index("--allowed-hosts") + 1].split(",")
    svc = f"{RELEASE}-preftune-mlflow"
    uri = f"http://{svc}.{NAMESPACE}.svc:5000"
    if values_of(value_set)["schedule"]["enabled"]:
        uri = yaml.safe_load(one(objs, "ConfigMap", "-schedule")["data"]["run.yaml"])["tracking"]["uri"]
    netloc = urlparse(uri).netloc
    for host in (netloc, f"{svc}:5000", f"{svc}.{NAMESPACE}.svc.cluster.local:5000", "localhost:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "attacker.example.com")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("value_set", ["default", "external-postgres-s3"])
def test_the_charts_mlflow_command_really_serves_and_guards_hosts(helm: Helm, value_set: str, tmp_path: Path):
    """Run the MLflow container's command and env as rendered (paths moved under tmp) with the pinned
    mlflow: /health answers, the API answers for the in-cluster Service host and refuses a foreign
    Host. With an external database the backend store URI arrives only through the environment (as
    from the Secret), and the server must create its tables there, not in a default SQLite file."""
    c = container(render(helm, value_set), "Deployment", "-mlflow", "mlflow")
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    if not mlflow_bin.exists():
        pytest.skip("the mlflow command is not installed beside the test interpreter")
    port = _free_port()
    args = [a.replace("/var/lib/mlflow", str(tmp_path / "mlflow")) for a in c["args"]]
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(port)
    args[args.index("--workers") + 1] = "1"
    (tmp_path / "mlflow").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update({e["name"]: e["value"] for e in c["env"] if "value" in e})
    env["HOME"] = str(tmp_path)
    drop = None
    secret_env = {e["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    if "MLFLOW_BACKEND_STORE_URI" in secret_env:
        from support.postgres import fresh_postgres_db

        env["MLFLOW_BACKEND_STORE_URI"], drop = fresh_postgres_db("preftune_chart_mlflow")
        env.update({"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret"})
    log = tmp_path / "mlflow.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [str(mlflow_bin), *args], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"

    def get(path: str, host: str | None = None) -> int:
        req = urllib.request.Request(base + path, headers={"Host": host} if host else {})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            return err.code

    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"mlflow server exited:\n{log.read_text()[-3000:]}"
            try:
                if get("/health") == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"mlflow not healthy:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        assert get(search, f"{RELEASE}-preftune-mlflow.{NAMESPACE}.svc:5000") == 200
        assert get(search, "attacker.example.com") == 403
        if drop is not None:
            import sqlalchemy

            engine = sqlalchemy.create_engine(env["MLFLOW_BACKEND_STORE_URI"])
            with engine.connect() as conn:
                tables = set(sqlalchemy.inspect(conn).get_table_names())
            engine.dispose()
            assert {"experiments", "runs", "alembic_version"} <= tables
            assert not list(tmp_path.rglob("*.db")), "mlflow fell back to a local SQLite file"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        if drop is not None:
            drop()


# ---------------------------------------------------------------------------------------------
# The schedule hook Job, its run config, ServiceAccount and RBAC


@value_sets
def test_schedule_hook_job_runs_preftune_schedule_with_the_run_config(helm: Helm, value_set: str):
    objs = render(helm, value_set)
    v = values_of(value_set)["schedule"]
    if not v["enabled"]:
        assert not find(objs, "Job")
        return
    job = one(objs, "Job", "-schedule")
    hooks = set(job["metadata"]["annotations"]["helm.sh/hook"].split(","))
    assert hooks == {"post-install", "post-upgrade"}
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec.get("automountServiceAccountToken") is False
    c = spec["containers"][0]
    assert c["args"][:9] == [
        "schedule",
        "--config",
        "/etc/preftune/run.yaml",
        "--cron",
        v["cron"],
        "--host",
        v["kfpHost"],
        "--name",
        v["name"],
    ]
    assert c["args"][9:] == v["extraArgs"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/preftune")
    volume = next(vol for vol in spec["volumes"] if vol["name"] == mount["name"])
    cm = one(objs, "ConfigMap", volume["configMap"]["name"])
    assert "run.yaml" in cm["data"]
    tokens = [vol for vol in spec["volumes"] if "projected" in vol]
    if v["kfpAuth"]["projectedToken"]:
        (tok,) = tokens
        source = tok["projected"]["sources"][0]["serviceAccountToken"]
        assert source["audience"] == "pipelines.kubeflow.org"
        path = env_of(c)["KF_PIPELINES_SA_TOKEN_PATH"]["value"]
        mount = next(m for m in c["volumeMounts"] if m["name"] == tok["name"])
        assert path == f"{mount['mountPath']}/{source['path']}"
    else:
        assert not tokens
    namespace = env_of(c).get("KFP_NAMESPACE")
    if v.get("kfpNamespace"):
        assert namespace == {"name": "KFP_NAMESPACE", "value": v["kfpNamespace"]}
    elif v["kfpAuth"]["projectedToken"]:  # multi-user: the profile namespace is the release's own
        assert namespace["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    else:
        assert namespace is None
    for key in ("nodeSelector", "tolerations"):
        assert spec.get(key) == (v[key] or None)


@value_sets
def test_schedule_rbac_is_minimal_and_bound_to_the_jobs_service_account(helm: Helm, value_set: str):
    objs = render(helm, value_set)
    v = values_of(value_set)["schedule"]
    assert not find(objs, "ClusterRole") and not find(objs, "ClusterRoleBinding")
    if not (v["enabled"] and v["rbac"]["create"]):
        assert not find(objs, "Role", "-schedule") and not find(objs, "RoleBinding", "-schedule")
        return
    role = one(objs, "Role", "-schedule")
    for rule in role["rules"]:
        assert rule["apiGroups"] == ["pipelines.kubeflow.org"], "the Job needs nothing from the Kubernetes API"
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
    # exactly what `preftune schedule` calls (pipelines/client.py): no pipeline upload, no enable/disable
    granted = {(res, verb) for r in role["rules"] for res in r["resources"] for verb in r["verbs"]}
    assert granted == {
        ("experiments", "get"),
        ("experiments", "list"),
        ("experiments", "create"),
        ("jobs", "list"),
        ("jobs", "create"),
        ("jobs", "delete"),
    }
    binding = one(objs, "RoleBinding", "-schedule")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    job_sa = one(objs, "Job", "-schedule")["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": job_sa, "namespace": NAMESPACE}]


@value_sets
def test_the_configmap_run_config_is_the_values_run_config_with_the_tracking_uri(helm: Helm, value_set: str):
    objs = render(helm, value_set)
    values = values_of(value_set)
    if not values["schedule"]["enabled"]:
        return
    run_cfg = yaml.safe_load(one(objs, "ConfigMap", "-schedule")["data"]["run.yaml"])
    expected = yaml.safe_load(yaml.safe_dump(values["schedule"]["runConfig"] or {}))
    if values["tracking"]["uri"]:
        uri = values["tracking"]["uri"]
    elif values["mlflow"]["enabled"]:
        uri = f"http://{RELEASE}-preftune-mlflow.{NAMESPACE}.svc:{values['mlflow']['port']}"
    else:
        uri = None
    if uri and not (expected.get("tracking") or {}).get("uri"):
        expected.setdefault("tracking", {})["uri"] = uri
    if values["serviceAccount"]["create"] and not (expected.get("kubernetes") or {}).get("service_account"):
        # the pipeline's pods run as the chart's training ServiceAccount (issue 16)
        expected.setdefault("kubernetes", {})["service_account"] = f"{RELEASE}-preftune-training"
    assert run_cfg == expected
    job_env = env_of(one(objs, "Job", "-schedule")["spec"]["template"]["spec"]["containers"][0])
    if uri:
        assert job_env["MLFLOW_TRACKING_URI"]["value"] == uri


@value_sets
def test_the_run_config_parses_with_preftunes_run_config(helm: Helm, value_set: str):
    from preftune.config import RunConfig, parse_config

    objs = render(helm, value_set)
    if not values_of(value_set)["schedule"]["enabled"]:
        return
    run_cfg = yaml.safe_load(one(objs, "ConfigMap", "-schedule")["data"]["run.yaml"])
    unknown = sorted(set(run_cfg) - set(RunConfig.model_fields))
    known = {k: v for k, v in run_cfg.items() if k not in unknown}
    cfg = parse_config(known, f"charts/preftune/ci/{value_set}-values.yaml: schedule.runConfig")
    assert cfg.tracking.uri == run_cfg.get("tracking", {}).get("uri")
    if unknown:
        pytest.skip(
            f"RunConfig has no section {unknown} yet (the pipelines issue adds the Kubernetes settings); "
            "the other sections are valid"
        )


def test_the_gpu_value_set_asks_for_gpus_on_the_ppo_step_and_keeps_the_job_on_system_nodes(helm: Helm):
    objs = render(helm, "gpu-schedule")
    run_cfg = yaml.safe_load(one(objs, "ConfigMap", "-schedule")["data"]["run.yaml"])
    ppo = run_cfg["kubernetes"]["steps"]["ppo"]
    assert ppo["gpus"] >= 1 and ppo["tolerations"] and ppo["node_selector"]
    assert run_cfg["kubernetes"]["image"].endswith("-cuda")
    spec = one(objs, "Job", "-schedule")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"node-role.example.com/system": "true"}
    assert "nvidia.com/gpu" not in spec["containers"][0]["resources"].get("limits", {})


def test_preftune_commands_in_the_chart_parse_with_the_preftune_cli(helm: Helm, tmp_path: Path):
    """`preftune serve ...` and `preftune schedule ...`, as the chart runs them, parse with the CLI."""
    import typer

    from preftune.cli import app

    group = typer.main.get_command(app)  # a click group (typer ships its own copy of click)
    root = group.context_class(group, info_name="preftune")
    objs = render(helm, "all-enabled")
    # the run config is mounted from the ConfigMap in the pod; here it is a local copy
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(one(objs, "ConfigMap", "-schedule")["data"]["run.yaml"])
    runs = [
        container(objs, "Deployment", "-feedback", "feedback")["args"],
        [
            a.replace("/etc/preftune/run.yaml", str(run_yaml))
            for a in one(objs, "Job", "-schedule")["spec"]["template"]["spec"]["containers"][0]["args"]
        ],
    ]
    missing = []
    for args in runs:
        name, rest = args[0], list(args[1:])
        cmd = group.get_command(root, name)
        if cmd is None:
            missing.append(name)
            continue
        options = {opt for param in cmd.params for opt in (*param.opts, *getattr(param, "secondary_opts", []))}
        for a in rest:
            if a.startswith("--"):
                assert a.split("=")[0] in options, f"`preftune {name}` has no option {a}"
        ctx = cmd.make_context(name, rest)  # parses and converts every value, runs nothing
        assert ctx.params
    if missing:
        msg = f"the preftune CLI has no command {missing} yet (the feedback service and pipelines issues add them)"
        if in_ci():
            pytest.fail(msg)
        pytest.skip(msg)


# ---------------------------------------------------------------------------------------------
# ServiceMonitor (a CRD: checked by hand), NetworkPolicy, helm test hook


def test_service_monitor_fields(helm: Helm):
    objs = render(helm, "all-enabled")
    sm = one(objs, "ServiceMonitor", "-feedback")
    values = values_of("all-enabled")["metrics"]["serviceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    assert values["labels"].items() <= sm["metadata"]["labels"].items()
    spec = sm["spec"]
    assert set(spec) <= {"namespaceSelector", "selector", "endpoints", "jobLabel", "targetLabels"}
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    svc = one(objs, "Service", "-feedback")
    assert spec["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = spec["endpoints"]
    assert set(endpoint) <= {
        "port",
        "path",
        "scheme",
        "interval",
        "scrapeTimeout",
        "tlsConfig",
        "relabelings",
        "metricRelabelings",
    }
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["path"] == "/metrics" and endpoint["scheme"] == "http"
    duration = re.compile(r"^([0-9]+(ms|s|m|h))+$")
    assert duration.match(endpoint["interval"]) and duration.match(endpoint["scrapeTimeout"])
    assert not find(render(helm, "default"), "ServiceMonitor")


def _in_release_egress(values: dict[str, Any], component: str) -> list[dict[str, Any]]:
    """The egress rules to the chart's own servers a component calls (MLflow; the feedback service for training)."""
    rules = []
    targets = []
    if values["mlflow"]["enabled"] and component in ("schedule", "observe", "training"):
        targets.append(("mlflow", values["mlflow"]["port"]))
    if values["feedback"]["enabled"] and component == "training":
        targets.append(("feedback", 8080))
    for target, port in targets:
        labels = {
            "app.kubernetes.io/name": "preftune",
            "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": target,
        }
        rules.append({"to": [{"podSelector": {"matchLabels": labels}}], "ports": [{"port": port, "protocol": "TCP"}]})
    return rules


def test_network_policies_with_restricted_egress(helm: Helm):
    objs = render(helm, "all-enabled")
    values = values_of("all-enabled")
    policies = {p["metadata"]["name"].rsplit("-", 1)[-1]: p for p in find(objs, "NetworkPolicy")}
    # one per component (issue 16: training and observe had none)
    assert set(policies) == {"feedback", "mlflow", "schedule", "observe", "training"}
    for p in policies.values():
        assert set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        dns = p["spec"]["egress"][0]
        assert {(x["port"], x["protocol"]) for x in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    extra = values["networkPolicy"]["egress"]["extra"]
    for component, p in policies.items():
        # each component gets DNS, the chart's servers it calls and only its own extra rules (issue 16: shared)
        assert p["spec"]["egress"][1:] == _in_release_egress(values, component) + extra[component], component
    assert extra["schedule"] != extra["feedback"] and extra["training"] != extra["observe"]
    for component in ("schedule", "observe"):
        assert "ingress" not in policies[component]["spec"], component  # Jobs serve nothing
    # the pipeline's pods: the configured selector; only their peers (the TrainJob's nodes) reach them
    training = policies["training"]["spec"]
    selector = values["networkPolicy"]["training"]["podSelector"]
    assert training["podSelector"] == selector
    assert training["ingress"] == [{"from": [{"podSelector": selector}]}]
    # the ingress controller reaches the feedback service, never MLflow (it has no Ingress here)
    ingress_peers = values["networkPolicy"]["ingressFrom"]
    assert any(peer in rule["from"] for rule in policies["feedback"]["spec"]["ingress"] for peer in ingress_peers)
    for rule in policies["mlflow"]["spec"]["ingress"]:
        assert rule["from"] == [{"podSelector": {}}], rule
    feedback_ingress = policies["feedback"]["spec"]["ingress"]
    assert any(
        peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name") == "monitoring"
        for rule in feedback_ingress
        for peer in rule["from"]
    )
    assert not find(render(helm, "default"), "NetworkPolicy")
    # with MLflow's own Ingress (behind its basic auth) the ingress controller may reach it
    exposed = one(render(helm, "mlflow-auth-ingress"), "NetworkPolicy", "-mlflow")
    peers = [peer for rule in exposed["spec"]["ingress"] for peer in rule["from"]]
    assert values_of("mlflow-auth-ingress")["networkPolicy"]["ingressFrom"][0] in peers


def test_each_component_runs_as_its_own_service_account_with_its_own_annotations(helm: Helm):
    """Issue 16: one ServiceAccount for every component, so a cloud role meant for training reached the
    Ingress-exposed feedback pods."""
    objs = render(helm, "all-enabled")
    values = values_of("all-enabled")["serviceAccount"]
    accounts = {sa["metadata"]["name"]: sa for sa in find(objs, "ServiceAccount")}
    expected = {f"{RELEASE}-preftune-{c}" for c in ("feedback", "mlflow", "schedule", "observe", "training")}
    assert set(accounts) == expected
    pods = {
        "feedback": one(objs, "Deployment", "-feedback")["spec"]["template"]["spec"],
        "mlflow": one(objs, "Deployment", "-mlflow")["spec"]["template"]["spec"],
        "schedule": one(objs, "Job", "-schedule")["spec"]["template"]["spec"],
        "observe": one(objs, "CronJob", "-observe")["spec"]["jobTemplate"]["spec"]["template"]["spec"],
    }
    for component, spec in pods.items():
        assert spec["serviceAccountName"] == f"{RELEASE}-preftune-{component}", component
        assert spec["automountServiceAccountToken"] is False
    role = "eks.amazonaws.com/role-arn"
    training = accounts[f"{RELEASE}-preftune-training"]["metadata"]["annotations"]
    assert training[role] == values["training"]["annotations"][role]
    assert role not in accounts[f"{RELEASE}-preftune-feedback"]["metadata"].get("annotations", {})
    assert role not in accounts[f"{RELEASE}-preftune-mlflow"]["metadata"].get("annotations", {})
    assert accounts[f"{RELEASE}-preftune-observe"]["metadata"]["annotations"][role].endswith("chat-logs-reader")
    for sa in accounts.values():  # the shared annotations reach every one
        assert values["annotations"].items() <= sa["metadata"]["annotations"].items()
    # the pipeline's pods run as the training account: the schedule's run config says so
    run_cfg = yaml.safe_load(one(objs, "ConfigMap", "-schedule")["data"]["run.yaml"])
    assert run_cfg["kubernetes"]["service_account"] == f"{RELEASE}-preftune-training"
    assert accounts[f"{RELEASE}-preftune-training"]["automountServiceAccountToken"] is True
    # least privilege: the training Role creates and reads TrainJobs, nothing else, bound to training only
    role_obj = one(objs, "Role", "-training")
    assert role_obj["rules"] == [
        {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"], "verbs": ["create", "get"]}
    ]
    binding = one(objs, "RoleBinding", "-training")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": f"{RELEASE}-preftune-training", "namespace": NAMESPACE}
    ]
    # an explicit name is used as it is; disabled components get no account
    other = render(helm, "mlflow-auth-ingress")
    names = {sa["metadata"]["name"] for sa in find(other, "ServiceAccount")}
    assert names == {f"{RELEASE}-preftune-mlflow", "chat-logs-reader"}
    observe = one(other, "CronJob", "-observe")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert observe["serviceAccountName"] == "chat-logs-reader"


def test_common_annotations_registry_and_pod_extension_points(helm: Helm):
    objs = render(helm, "all-enabled")
    values = values_of("all-enabled")
    for o in objs:
        annotations = o["metadata"].get("annotations", {})
        assert values["commonAnnotations"].items() <= annotations.items(), f"{o['kind']}/{o['metadata']['name']}"
    feedback = one(objs, "Deployment", "-feedback")["spec"]["template"]["spec"]
    f = values["feedback"]
    assert f["extraVolumes"][0] in feedback["volumes"]
    main = feedback["containers"][0]
    assert f["extraVolumeMounts"][0] in main["volumeMounts"]
    assert main["envFrom"] == [{"secretRef": {"name": "preftune-extra"}}] + f["extraEnvFrom"]
    mlflow = one(objs, "Deployment", "-mlflow")["spec"]["template"]["spec"]
    assert mlflow["initContainers"] == values["mlflow"]["initContainers"]
    hpa = one(objs, "HorizontalPodAutoscaler", "-feedback")
    assert hpa["spec"]["behavior"] == f["autoscaling"]["behavior"]
    # global.imageRegistry (a mirror) wins over image.registry
    images = {c["image"] for _o, _m, s in pod_specs(render(helm, "mlflow-auth-ingress")) for c in s["containers"]}
    assert images == {"mirror.example.com/ml/preftune:0.1.0"}
    # a sidecar joins the main container and is checked like every container: a bare one fails the checks
    objs = helm.template(
        CHART,
        release=RELEASE,
        namespace=NAMESPACE,
        set_values=["feedback.sidecars[0].name=proxy", "feedback.sidecars[0].image=registry.example.com/proxy:v7"],
    )
    deployment = one(objs, "Deployment", "-feedback")
    spec = deployment["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["feedback", "proxy"]
    problems = _pod_problems(deployment, spec)
    where = f"Deployment/{RELEASE}-preftune-feedback container proxy"
    assert f"{where}: allowPrivilegeEscalation must be false" in problems
    assert f"{where}: no livenessProbe" in problems
    assert not [p for p in problems if "container feedback" in p]


def test_service_monitor_relabelings_and_tls(helm: Helm):
    sm = one(render(helm, "all-enabled"), "ServiceMonitor", "-feedback")
    values = values_of("all-enabled")["metrics"]["serviceMonitor"]
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["relabelings"] == values["relabelings"]
    assert endpoint["metricRelabelings"] == values["metricRelabelings"]
    objs = helm.template(
        CHART,
        release=RELEASE,
        namespace=NAMESPACE,
        set_values=[
            "metrics.serviceMonitor.enabled=true",
            "metrics.serviceMonitor.scheme=https",
            "metrics.serviceMonitor.tlsConfig.serverName=preftune.example.com",
        ],
    )
    (endpoint,) = one(objs, "ServiceMonitor", "-feedback")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"] == {"serverName": "preftune.example.com"}


def test_mlflow_basic_auth_and_its_ingress(helm: Helm, monkeypatch):
    objs = render(helm, "mlflow-auth-ingress")
    values = values_of("mlflow-auth-ingress")["mlflow"]
    c = container(objs, "Deployment", "-mlflow", "mlflow")
    args = c["args"]
    assert args[args.index("--app-name") + 1] == "basic-auth"
    env = env_of(c)
    for name, key in (("MLFLOW_AUTH_ADMIN_USERNAME", "usernameKey"), ("MLFLOW_AUTH_ADMIN_PASSWORD", "passwordKey")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {
            "name": values["auth"]["existingSecret"],
            "key": values["auth"][key],
        }
    ini = one(objs, "ConfigMap", "-mlflow-auth")["data"]["basic_auth.ini"]
    # the real MLflow reads it: the permission, the user store on the volume, no password in it. (Loaded
    # from its file: importing the mlflow.server.auth package builds its Flask app.)
    import configparser
    import importlib.util

    import mlflow.server

    auth_config = Path(mlflow.server.__file__).parent / "auth" / "config.py"
    spec = importlib.util.spec_from_file_location("mlflow_auth_config", auth_config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    read_auth_config = module.read_auth_config

    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"preftune-basic-auth-{os.getpid()}.ini"
    path.write_text(ini)
    try:
        monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
        monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "from-the-secret")
        cfg = read_auth_config()
    finally:
        path.unlink()
    assert cfg.default_permission == values["auth"]["defaultPermission"]
    assert cfg.database_uri == "sqlite:////var/lib/mlflow/basic_auth.db"
    parsed = configparser.ConfigParser()
    parsed.read_string(ini)
    assert "admin_password" not in parsed["mlflow"]  # the password comes from the Secret only
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/var/lib/mlflow" in mounts  # the user store persists
    ingress = one(objs, "Ingress", "-mlflow")
    assert ingress["spec"]["rules"][0]["host"] == "mlflow.example.com"
    hosts = args[args.index("--allowed-hosts") + 1].split(",")
    assert "mlflow.example.com" in hosts  # MLflow's DNS-rebinding check accepts the Ingress host
    # an Ingress without auth is refused unless an auth proxy is declared
    proc = helm.template_text(CHART, set_values=["mlflow.ingress.enabled=true"], check=False)
    assert proc.returncode != 0 and "mlflow.auth.enabled" in proc.stderr
    proxied = helm.template(
        CHART,
        release=RELEASE,
        namespace=NAMESPACE,
        set_values=["mlflow.ingress.enabled=true", "mlflow.ingress.allowWithoutAuth=true"],
    )
    assert one(proxied, "Ingress", "-mlflow")
    proc = helm.template_text(CHART, set_values=["mlflow.auth.enabled=true"], check=False)
    assert proc.returncode != 0 and "mlflow.auth.existingSecret" in proc.stderr


def test_the_locked_image_dependencies_carry_mlflows_basic_auth():
    """mlflow.auth.enabled runs `mlflow server --app-name basic-auth`, which needs Flask-WTF (mlflow[auth])."""
    import importlib.util

    from packaging.utils import canonicalize_name

    assert importlib.util.find_spec("flask_wtf") is not None  # installed from the lock here too

    pins = {
        canonicalize_name(line.split("==")[0].split("[")[0])
        for line in (REPO / "requirements" / "cpu.lock").read_text().splitlines()
        if "==" in line and not line.startswith((" ", "#"))
    }
    assert "flask-wtf" in pins


# ---------------------------------------------------------------------------------------------
# helm test: one Pod per enabled component


def _test_pods(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    pods = [o for o in objs if o["kind"] == "Pod" and o["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    return {p["metadata"]["name"].rsplit("-test-", 1)[1]: p for p in pods}


def test_helm_test_has_a_pod_for_every_enabled_component(helm: Helm):
    """Issue 16: `helm test` did nothing when the feedback service was disabled."""
    pods = _test_pods(render(helm, "all-enabled"))
    assert set(pods) == {"feedback", "mlflow", "schedule", "observe"}
    for name, pod in pods.items():
        problems = [p for o, _m, spec in pod_specs([pod]) for p in _pod_problems(o, spec)]
        assert not problems, problems
        command = pod["spec"]["containers"][0]["command"]
        script = command[2] if command[0] == "python" else command[3]
        compile(script, f"helm-test-{name}", "exec")  # the script is valid Python
    feedback = pods["feedback"]["spec"]["containers"][0]["command"]
    assert feedback[3:] == [f"http://{RELEASE}-preftune-feedback:8080/healthz=200"]
    mlflow = pods["mlflow"]["spec"]["containers"][0]
    api = f"http://{RELEASE}-preftune-mlflow:5000/api/2.0/mlflow/experiments/search?max_results=1"
    assert mlflow["command"][3:] == [
        f"http://{RELEASE}-preftune-mlflow:5000/health=200",
        f"{api}=401",
        f"auth:{api}=200",
    ]
    assert env_of(mlflow)["TEST_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-admin"
    schedule = pods["schedule"]["spec"]["containers"][0]["command"]
    assert schedule[:2] == ["/bin/sh", "-c"] and "preftune config validate /etc/preftune/run.yaml" in schedule[2]
    assert schedule[4:] == ["https://kubeflow.example.com/pipeline/apis/v2beta1/healthz=any"]
    volumes = {v["name"]: v for v in pods["schedule"]["spec"]["volumes"]}
    assert volumes["run-config"]["configMap"]["name"] == f"{RELEASE}-preftune-schedule"
    observe = pods["observe"]["spec"]["containers"][0]["command"]
    assert observe[4:] == [f"http://{RELEASE}-preftune-mlflow:5000/health=200"]
    # without the feedback service, MLflow and observe are still tested
    assert set(_test_pods(render(helm, "mlflow-auth-ingress"))) == {"mlflow", "observe"}
    only = helm.template(
        CHART, release=RELEASE, namespace=NAMESPACE, set_values=["feedback.enabled=false", "mlflow.enabled=false"]
    )
    assert set(_test_pods(only)) == {"schedule"}


def test_the_helm_test_script_really_checks_status_and_basic_auth(helm: Helm):
    """The script the test Pods run, against a local server: right status passes, wrong status fails."""
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    good = "Basic " + base64.b64encode(b"admin:s3cret").decode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/health":
                status = 200
            else:
                status = 200 if self.headers.get("Authorization") == good else 401
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    script = _test_pods(render(helm, "all-enabled"))["mlflow"]["spec"]["containers"][0]["command"][2]
    env = {**os.environ, "TEST_USERNAME": "admin", "TEST_PASSWORD": "s3cret"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=60
        )

    try:
        ok = run(f"{base}/health=200", f"{base}/api=401", f"auth:{base}/api=200", f"{base}/api=any")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        wrong = run(f"{base}/api=200")  # anonymous is refused: the check must fail
        assert wrong.returncode != 0 and "HTTP 401, expected 200" in wrong.stderr
        bad_password = subprocess.run(
            [sys.executable, "-c", script, f"auth:{base}/api=200"],
            env={**env, "TEST_PASSWORD": "wrong"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad_password.returncode != 0
    finally:
        server.shutdown()


def test_schedule_job_ttl_comment_says_what_the_ttl_does():
    text = (CHART / "templates" / "schedule-job.yaml").read_text()
    assert "stays for `kubectl logs` until the next upgrade replaces it.\n" not in text  # the old, wrong claim
    comment = text.split("helm.sh/hook-delete-policy")[0].rsplit("helm.sh/hook-weight", 1)[-1]
    assert "ttlSecondsAfterFinished" in comment  # a failed Job goes when the TTL runs out


@pytest.mark.parametrize(
    "value_set,kinds",
    [
        (
            "all-enabled",
            {
                "CronJob",
                "PrometheusRule",
                "Deployment",
                "Service",
                "Ingress",
                "HorizontalPodAutoscaler",
                "PodDisruptionBudget",
                "ServiceMonitor",
                "NetworkPolicy",
                "Job",
                "ConfigMap",
                "ServiceAccount",
                "PersistentVolumeClaim",  # MLflow basic auth's user store
                "Role",
                "RoleBinding",
                "Pod",
            },
        ),
        (
            "external-postgres-s3",
            {
                "Deployment",
                "Service",
                "PodDisruptionBudget",
                "Job",
                "ConfigMap",
                "ServiceAccount",
                "Role",
                "RoleBinding",
                "Pod",
            },
        ),
        (
            "no-mlflow",
            {
                "Deployment",
                "Service",
                "PodDisruptionBudget",
                "Job",
                "ConfigMap",
                "ServiceAccount",
                "Role",
                "RoleBinding",
                "Pod",
            },
        ),
        (
            "default",
            {
                "Deployment",
                "Service",
                "PodDisruptionBudget",
                "PersistentVolumeClaim",
                "Job",
                "ConfigMap",
                "ServiceAccount",
                "Role",
                "RoleBinding",
                "Pod",
            },
        ),
    ],
)
def test_each_value_set_renders_what_it_is_for(helm: Helm, value_set: str, kinds: set[str]):
    assert {o["kind"] for o in render(helm, value_set)} == kinds


# ---------------------------------------------------------------------------------------------
# values.schema.json rejects bad values


@pytest.mark.parametrize(
    "set_value,error",
    [
        ("feedback.replicaCount=three", "/feedback/replicaCount"),
        ("feedback.settings.ratingsPerTask=0", "/feedback/settings/ratingsPerTask"),
        ("feedback.settings.logLevel=LOUD", "/feedback/settings/logLevel"),
        ("feedback.database.existingSecret=Not_A_Name", "/feedback/database/existingSecret"),
        ("feedback.service.port=70000", "/feedback/service/port"),
        ("feedback.resources=null", "/feedback"),
        ("feedback.replicas=2", "additional properties 'replicas'"),
        ("image.tag=latest", "/image/tag"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("podSecurityContext.runAsUser=0", "/podSecurityContext/runAsUser"),
        ("mlflow.enabled=yes please", "/mlflow/enabled"),
        ("mlflow.artifacts.destination=ftp://bucket", "/mlflow/artifacts/destination"),
        ("schedule.cron=5", "/schedule/cron"),
        ("schedule.cron=every monday", "/schedule/cron"),
        ("schedule.kfpHost=ml-pipeline:8888", "/schedule/kfpHost"),
        ("schedule.runConfig=weekly", "/schedule/runConfig"),
        ("networkPolicy.egress.restrict=sometimes", "/networkPolicy/egress/restrict"),
    ],
)
def test_values_schema_rejects_bad_values(helm: Helm, set_value: str, error: str):
    proc = helm.template_text(CHART, set_values=[set_value], check=False)
    assert proc.returncode != 0, f"--set {set_value} was accepted"
    assert error in proc.stderr, proc.stderr


def test_a_credential_cannot_be_put_in_plain_env_values(helm: Helm, tmp_path: Path):
    """extraEnv takes a value or a valueFrom; a literal secret still renders, but our policy check flags it."""
    f = tmp_path / "v.yaml"
    f.write_text(yaml.safe_dump({"feedback": {"extraEnv": [{"name": "PREFTUNE_ADMIN_TOKEN", "value": "s3cr3t"}]}}))
    objs = helm.template(CHART, values_files=[f])
    problems = [p for o, _m, s in pod_specs(objs) for p in _pod_problems(o, s)]
    assert any("PREFTUNE_ADMIN_TOKEN" in p for p in problems)
    f.write_text(yaml.safe_dump({"feedback": {"extraEnv": [{"name": "X", "value": "a", "valueFrom": {}}]}}))
    with pytest.raises(HelmError):
        helm.template(CHART, values_files=[f])


def test_openshift_can_leave_the_uid_to_the_platform(helm: Helm):
    objs = render(helm, "schedule-only")
    for _o, _m, spec in pod_specs(objs):
        assert "runAsUser" not in spec["securityContext"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            assert "runAsUser" not in c["securityContext"]


@value_sets
def test_notes_tell_the_operator_what_to_do_next(helm: Helm, value_set: str):
    """NOTES.txt renders for every value set (helm install --dry-run=client, no cluster needed)."""
    args = ["install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client"]
    for f in VALUE_SETS[value_set]:
        args += ["--values", str(f)]
    out = helm.run(*args).stdout
    assert "NOTES:" in out
    notes = out.split("NOTES:", 1)[1]
    v = values_of(value_set)
    if v["feedback"]["enabled"]:
        assert f"helm test {RELEASE}" in notes
        if v["feedback"]["ingress"]["enabled"]:
            assert f"https://{v['feedback']['ingress']['hosts'][0]['host']}/" in notes
        else:
            assert f"port-forward svc/{RELEASE}-preftune-feedback" in notes
        assert ("WARNING: judgements are kept in SQLite" in notes) == (not v["feedback"]["database"]["existingSecret"])
    if v["mlflow"]["enabled"]:
        assert f"port-forward svc/{RELEASE}-preftune-mlflow" in notes
    if v["schedule"]["enabled"]:
        assert f"logs job/{RELEASE}-preftune-schedule" in notes
    assert "ServiceMonitor" in notes or "serviceMonitor.enabled=true" in notes


# ---------------------------------------------------------------------------------------------
# observe (issue 15 item 6): the CronJob


def test_observe_cronjob_runs_preftune_observe_and_passes_verdict_exit_codes(helm: Helm, tmp_path: Path):
    """The CronJob's script, run with sh and a stand-in `preftune` exiting with each code: the Job
    fails only for 1-5; 20 (drift) and 21 (regression) are verdicts, not failures."""
    import typer

    from preftune.cli import app

    assert not find(render(helm, "default"), "CronJob")
    objs = render(helm, "all-enabled")
    cron = one(objs, "CronJob", "-observe")
    v = values_of("all-enabled")["observe"]
    assert cron["spec"]["schedule"] == v["schedule"] and cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    (rule,) = job["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [1, 2, 3, 5]
    c = job["template"]["spec"]["containers"][0]
    assert c["command"][:2] == ["/bin/sh", "-c"]
    script, argv0, *args = c["command"][2:]
    assert args == ["--source", v["source"]]
    # the arguments parse with the real CLI
    group = typer.main.get_command(app)
    observe = group.get_command(group.context_class(group, info_name="preftune"), "observe")
    run = observe.get_command(observe.context_class(observe, info_name="observe"), "run")
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(one(objs, "ConfigMap", "-observe")["data"]["run.yaml"])
    ctx = run.make_context("run", ["--config", str(run_yaml), *args])
    assert ctx.params["source"] == v["source"]
    # exit codes, with a stand-in preftune on PATH
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "preftune"
    for code, expected in [(0, 0), (20, 0), (21, 0), (1, 1), (2, 2), (4, 4), (5, 5)]:
        fake.write_text(f"#!/bin/sh\nexit {code}\n")
        fake.chmod(0o755)
        proc = subprocess.run(
            ["/bin/sh", "-c", script, argv0, *args],
            env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert proc.returncode == expected, (code, proc.stdout, proc.stderr)


OBSERVE_METRICS = {
    "preftune_observed_behaviour_share",
    "preftune_observe_drift_score",
    "preftune_observe_records_judged_total",
    "preftune_observe_judge_errors_total",
    "preftune_observe_window_lag_seconds",
    "preftune_observe_last_success_timestamp_seconds",
}


def test_prometheus_rule_passes_promtool_and_alerts_on_observe_metrics(helm: Helm, tmp_path: Path):
    """The PrometheusRule's groups, checked by promtool (Debian's `prometheus` package; .ci/run installs it)."""
    objs = render(helm, "all-enabled")
    rule = one(objs, "PrometheusRule", "-observe")
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"} and set(rule["spec"]) == {"groups"}
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {
        "PreftuneBehaviourDrift",
        "PreftuneForbiddenShareOverGate",
        "PreftuneObserveJudgeFailures",
        "PreftuneObserveNoData",
    } <= set(alerts)
    used = {m for r in alerts.values() for m in OBSERVE_METRICS if m in r["expr"]}
    assert used == OBSERVE_METRICS
    assert 'behaviour="unsafe_compliance"' in alerts["PreftuneForbiddenShareOverGate"]["expr"]
    assert not find(render(helm, "default"), "PrometheusRule")
    promtool = shutil.which("promtool")
    if not promtool:
        unavailable("promtool is not installed (apt-get install prometheus)")
    f = tmp_path / "rules.yaml"
    f.write_text(yaml.safe_dump(rule["spec"]))
    proc = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # promtool can fail: a broken expression is refused
    broken = yaml.safe_load(yaml.safe_dump(rule["spec"]))
    broken["groups"][0]["rules"][0]["expr"] = "max by (family (preftune_observe_drift_score)"
    f.write_text(yaml.safe_dump(broken))
    assert subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, timeout=60).returncode != 0


def test_grafana_dashboard_configmap_queries_the_observe_metrics(helm: Helm):
    objs = render(helm, "all-enabled")
    cm = one(objs, "ConfigMap", "-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["preftune-observe.json"])
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for metric in ("preftune_observed_behaviour_share", "preftune_observe_drift_score", "preftune_tasks_pending"):
        assert metric in exprs
    assert not find(render(helm, "default"), "ConfigMap", "-dashboards")
    promtool = shutil.which("promtool")
    if promtool:  # every panel query parses as PromQL (promtool checks it as a rule expression)
        for p in dash["panels"]:
            for t in p["targets"]:
                expr = t["expr"].replace("$family", ".*")
                proc = subprocess.run(
                    [promtool, "check", "rules", "/dev/stdin"],
                    input=yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "x", "expr": expr}]}]}),
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                assert proc.returncode == 0, (expr, proc.stdout + proc.stderr)


def test_the_readme_values_table_is_generated_from_the_schema_and_in_sync(tmp_path: Path):
    """charts/preftune/README.md's table comes from values.schema.json (scripts/values_table.py --check)."""
    script = CHART / "scripts" / "values_table.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    readme = (CHART / "README.md").read_text()

    def leaves(schema: dict[str, Any], prefix: str = "") -> set[str]:
        out: set[str] = set()
        for key, sub in (schema.get("properties") or {}).items():
            if sub.get("type") == "object" and sub.get("properties"):
                out |= leaves(sub, f"{prefix}{key}.")
            else:
                out.add(f"{prefix}{key}")
        return out

    schema = json.loads((CHART / "values.schema.json").read_text())
    for key in leaves(schema):
        assert f"| `{key}` |" in readme, f"{key} is not in the values table"
    # a stale table is caught: the check fails on a README whose table lost a row
    import importlib.util

    spec = importlib.util.spec_from_file_location("values_table", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    stale = readme.replace("| `observe.schedule` |", "| `observe.cron` |")
    assert mod.render(stale) != stale
