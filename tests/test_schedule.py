"""``preftune schedule`` / ``run --host``: the exact requests the kfp client sends, against a local server.

The server below speaks the few Kubeflow Pipelines v2beta1 endpoints the commands use (healthz,
experiments, recurring runs, runs), keeps state like the real API (so "update by name" can be
observed), and records every request. No Kubeflow client other than kfp's is involved: the
commands are run through the preftune CLI entry point.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from preftune.config import parse_config
from preftune.pipeline import config_parameter, load

API = "/apis/v2beta1"


class FakeKFP:
    """State and request log of the fake Kubeflow Pipelines API."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.experiments: dict[str, dict[str, Any]] = {}
        self.recurring: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.fail_status: int | None = None
        self.lock = threading.Lock()

    def calls(self) -> list[tuple[str, str]]:
        """(method, path) of every request after healthz."""
        return [(r["method"], r["path"]) for r in self.requests if not r["path"].endswith("/healthz")]


def _matches(item: dict[str, Any], filt: str | None) -> bool:
    if not filt:
        return True
    for p in json.loads(filt).get("predicates", []):
        op = p.get("operation")
        assert op in ("EQUALS", 1), f"unexpected filter operation {op!r}"
        if item.get(p["key"]) != p.get("stringValue"):
            return False
    return True


def make_handler(state: FakeKFP):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self, method: str) -> None:
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            with state.lock:
                state.requests.append(
                    {
                        "method": method,
                        "path": url.path,
                        "query": query,
                        "body": body,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                    }
                )
                if state.fail_status and not url.path.endswith("/healthz"):
                    return self._send(state.fail_status, {"error": "denied by test", "code": 7})
                return self._route(method, url.path, query, body)

        def _route(self, method: str, path: str, query: dict[str, str], body: Any) -> None:
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            if path == f"{API}/healthz" and method == "GET":
                return self._send(200, {"multi_user": False})
            if path == f"{API}/experiments":
                if method == "GET":
                    items = [e for e in state.experiments.values() if _matches(e, query.get("filter"))]
                    return self._send(200, {"experiments": items, "total_size": len(items)})
                exp = {**body, "experiment_id": uuid.uuid4().hex, "created_at": now, "storage_state": "AVAILABLE"}
                state.experiments[exp["experiment_id"]] = exp
                return self._send(200, exp)
            if path == f"{API}/recurringruns":
                if method == "GET":
                    items = [
                        r
                        for r in state.recurring.values()
                        if _matches(r, query.get("filter"))
                        and (not query.get("experiment_id") or r["experiment_id"] == query["experiment_id"])
                    ]
                    return self._send(200, {"recurringRuns": items, "total_size": len(items)})
                rr = {**body, "recurring_run_id": uuid.uuid4().hex, "created_at": now, "status": "ENABLED"}
                state.recurring[rr["recurring_run_id"]] = rr
                return self._send(200, rr)
            if path.startswith(f"{API}/recurringruns/") and method == "DELETE":
                rid = path.rsplit("/", 1)[-1]
                if state.recurring.pop(rid, None) is None:
                    return self._send(404, {"error": f"recurring run {rid} not found"})
                return self._send(200, {})
            if path == f"{API}/runs" and method == "POST":
                run = {**body, "run_id": uuid.uuid4().hex, "created_at": now, "state": "PENDING"}
                state.runs[run["run_id"]] = run
                return self._send(200, run)
            return self._send(404, {"error": f"no route {method} {path}"})

        def do_GET(self) -> None:  # noqa: N802
            self._handle("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._handle("POST")

        def do_DELETE(self) -> None:  # noqa: N802
            self._handle("DELETE")

    return Handler


@pytest.fixture()
def kfp_server():
    state = FakeKFP()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.host = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def run_yaml(tmp_path: Path) -> Path:
    """The GPU run config of the Helm chart's gpu-schedule value set (what the chart's Job schedules)."""
    values = yaml.safe_load((Path(__file__).parents[1] / "charts/preftune/ci/gpu-schedule-values.yaml").read_text())
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values["schedule"]["runConfig"]))
    return path


def cli(*args: str) -> int:
    from preftune.cli import main

    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_schedule_creates_then_leaves_unchanged_then_replaces_by_name(kfp_server, run_yaml, capsys):
    host = kfp_server.host
    args = ["schedule", "--config", str(run_yaml), "--cron", "0 3 * * 1", "--host", host, "--name", "weekly"]
    assert cli(*args) == 0
    assert "created recurring run 'weekly'" in capsys.readouterr().out
    assert kfp_server.calls() == [
        ("GET", f"{API}/experiments"),  # find the experiment by name ...
        ("POST", f"{API}/experiments"),  # ... create it
        ("GET", f"{API}/recurringruns"),  # recurring runs of that name
        ("POST", f"{API}/recurringruns"),
    ]
    find_exp, create_exp, list_rr, create_rr = [r for r in kfp_server.requests if not r["path"].endswith("healthz")]
    assert json.loads(find_exp["query"]["filter"])["predicates"][0]["stringValue"] == "preftune"
    assert create_exp["body"]["display_name"] == "preftune"
    exp_id = next(iter(kfp_server.experiments))
    assert list_rr["query"]["experiment_id"] == exp_id
    assert json.loads(list_rr["query"]["filter"])["predicates"][0] == {
        "operation": "EQUALS",
        "key": "display_name",
        "stringValue": "weekly",
    }
    body = create_rr["body"]
    assert body["display_name"] == "weekly" and body["experiment_id"] == exp_id
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 1"}}  # Kubeflow's cron has seconds first
    assert int(body["max_concurrency"]) == 1 and body["no_catchup"] is True and body["mode"] == "ENABLE"
    spec, platform = body["pipeline_spec"]["pipeline_spec"], body["pipeline_spec"]["platform_spec"]
    assert spec["pipelineInfo"]["name"] == "preference-retraining"
    ppo = spec["deploymentSpec"]["executors"]["exec-ppo"]["container"]
    assert ppo["image"] == "registry.example.com/ml/preftune:0.1.0-cuda"
    assert ppo["resources"]["accelerator"]["resourceCount"] == "4"
    ppo_k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-ppo"]
    assert ppo_k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    # the run config is the one parameter, and it comes back as the same config
    params = body["runtime_config"]["parameters"]
    assert set(params) == {"config"}
    cfg = parse_config(yaml.safe_load(run_yaml.read_text()))
    assert load(params["config"]) == cfg and params["config"] == config_parameter(cfg)

    # the same command again changes nothing (the Helm hook runs on every upgrade)
    n = len(kfp_server.requests)
    assert cli(*args) == 0
    assert "unchanged" in capsys.readouterr().out
    assert [(r["method"], r["path"]) for r in kfp_server.requests[n:] if not r["path"].endswith("healthz")] == [
        ("GET", f"{API}/experiments"),
        ("GET", f"{API}/recurringruns"),
    ]
    assert len(kfp_server.recurring) == 1

    # a new cron replaces it: the new one is created first, then the old one deleted
    old_id = next(iter(kfp_server.recurring))
    n = len(kfp_server.requests)
    assert cli(*args[:4], "0 4 * * 2", *args[5:]) == 0
    assert "updated" in capsys.readouterr().out
    assert [(r["method"], r["path"]) for r in kfp_server.requests[n:] if not r["path"].endswith("healthz")] == [
        ("GET", f"{API}/experiments"),
        ("GET", f"{API}/recurringruns"),
        ("POST", f"{API}/recurringruns"),
        ("DELETE", f"{API}/recurringruns/{old_id}"),
    ]
    (rr,) = kfp_server.recurring.values()
    assert rr["display_name"] == "weekly" and rr["trigger"]["cron_schedule"]["cron"] == "0 0 4 * * 2"

    # --list shows it; --delete removes it; deleting again is not an error
    assert cli("schedule", "--list", "--host", host, "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(x["name"], x["cron"], x["managed_by_preftune"]) for x in listed] == [("weekly", "0 0 4 * * 2", True)]
    assert cli("schedule", "--delete", "--name", "weekly", "--host", host) == 0
    assert "deleted recurring run 'weekly'" in capsys.readouterr().out
    assert kfp_server.recurring == {}
    assert kfp_server.requests[-1]["method"] == "DELETE"
    assert cli("schedule", "--delete", "--name", "weekly", "--host", host) == 0
    assert "nothing to delete" in capsys.readouterr().out


def test_schedule_never_touches_recurring_runs_of_other_names(kfp_server, run_yaml):
    host = kfp_server.host
    assert cli("schedule", "--config", str(run_yaml), "--cron", "0 3 * * 1", "--host", host, "--name", "a") == 0
    assert cli("schedule", "--config", str(run_yaml), "--cron", "0 5 * * *", "--host", host, "--name", "b") == 0
    assert sorted(r["display_name"] for r in kfp_server.recurring.values()) == ["a", "b"]
    assert cli("schedule", "--config", str(run_yaml), "--cron", "0 6 * * *", "--host", host, "--name", "a") == 0
    crons = {r["display_name"]: r["trigger"]["cron_schedule"]["cron"] for r in kfp_server.recurring.values()}
    assert crons == {"a": "0 0 6 * * *", "b": "0 0 5 * * *"}


def test_projected_service_account_token_is_sent_as_bearer(kfp_server, run_yaml, tmp_path, monkeypatch):
    token = tmp_path / "token"
    token.write_text("sa-token-123")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    assert (
        cli("schedule", "--config", str(run_yaml), "--cron", "0 3 * * 1", "--host", kfp_server.host, "--name", "t") == 0
    )
    api_calls = [r for r in kfp_server.requests if not r["path"].endswith("healthz")]
    assert api_calls and all(r["headers"].get("authorization") == "Bearer sa-token-123" for r in api_calls)


def test_run_with_host_submits_one_run_with_the_config_parameter(kfp_server, tmp_path, capsys):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump({"run": {"name": "adhoc"}, "ppo": {"reward_clip": None}}))
    assert cli("run", "--config", str(cfg_path), "--host", kfp_server.host, "--json") == 0
    out = json.loads(capsys.readouterr().out)
    (run,) = kfp_server.runs.values()
    assert out["run_id"] == run["run_id"] and run["display_name"] == "adhoc"
    expected = {"run": {"name": "adhoc"}, "null_fields": ["ppo.reward_clip"]}
    assert run["runtime_config"]["parameters"] == {"config": expected}
    assert load(run["runtime_config"]["parameters"]["config"]).ppo.reward_clip is None
    root = run["pipeline_spec"]["pipeline_spec"]["root"]
    assert root["inputDefinitions"]["parameters"]["config"]["parameterType"] == "STRUCT"


def test_rejected_credentials_exit_5_with_one_line(kfp_server, run_yaml, capsys):
    kfp_server.fail_status = 403
    code = cli("schedule", "--config", str(run_yaml), "--cron", "0 3 * * 1", "--host", kfp_server.host)
    err = capsys.readouterr().err
    assert code == 5 and "refused" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3


def test_unreachable_host_fails_fast_before_anything_is_compiled(tmp_path, run_yaml, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    code = cli("schedule", "--config", str(run_yaml), "--cron", "0 3 * * 1", "--host", f"http://127.0.0.1:{port}")
    err = capsys.readouterr().err
    assert code == 4 and "unreachable" in err and f"127.0.0.1:{port}" in err
    assert time.monotonic() - t0 < 60
    code = cli("run", "--config", str(run_yaml), "--host", f"http://127.0.0.1:{port}")
    assert code == 4 and "unreachable" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--cron", "every monday"], "--cron"),
        (["--cron", "0 3 * *"], "expected 5 fields"),
    ],
)
def test_bad_cron_is_a_usage_error(kfp_server, run_yaml, capsys, args, needle):
    code = cli("schedule", "--config", str(run_yaml), "--host", kfp_server.host, *args)
    assert code == 2 and needle in capsys.readouterr().err
    assert not [r for r in kfp_server.requests if r["method"] != "GET"]


def test_cron_conversion():
    from preftune.kube.config import cron_for_kubeflow

    assert cron_for_kubeflow("0 3 * * 1") == "0 0 3 * * 1"
    assert cron_for_kubeflow("*/15 * * * *") == "0 */15 * * * *"
    assert cron_for_kubeflow("30 0 3 * * MON") == "30 0 3 * * MON"
    for bad in ("", "0 3 * *", "0 0 0 3 * * 1", "0 3 * * 1;rm"):
        with pytest.raises(ValueError):
            cron_for_kubeflow(bad)


def test_schedule_sends_the_service_account_and_bakes_the_pipeline_root(kfp_server, tmp_path):
    """Issue 16: the recurring run runs as kubernetes.service_account, and its compiled pipeline spec
    carries kubernetes.pipeline_root as defaultPipelineRoot."""
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {"kubernetes": {"service_account": "preftune-training", "pipeline_root": "s3://ml-artifacts/kfp"}}
        )
    )
    args = ["schedule", "--config", str(path), "--cron", "0 3 * * 1", "--host", kfp_server.host, "--name", "sa"]
    assert cli(*args) == 0
    (create_rr,) = [r for r in kfp_server.requests if r["method"] == "POST" and r["path"].endswith("/recurringruns")]
    body = create_rr["body"]
    assert body["service_account"] == "preftune-training"
    assert body["pipeline_spec"]["pipeline_spec"]["defaultPipelineRoot"] == "s3://ml-artifacts/kfp"
