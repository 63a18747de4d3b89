"""The Kubeflow components: typed interfaces, published specs kept up to date, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPECS = REPO / "components" / "specs"

# step -> (artifact inputs, artifact outputs with their types, parameter outputs)
INTERFACES = {
    "collect": (
        {},
        {"dataset": "system.Dataset", "report": "system.Markdown", "metrics": "system.Metrics"},
        {"Output"},
    ),
    "check-fit": (
        {"dataset": "system.Dataset"},
        {"fit_dataset": "system.Dataset", "report": "system.Markdown", "metrics": "system.Metrics"},
        {"Output", "fit_dataset_hash"},
    ),
    "train-reward": (
        {"dataset": "system.Dataset"},
        {"reward_model": "system.Model", "report": "system.Markdown", "metrics": "system.Metrics"},
        {"Output"},
    ),
    "ppo": (
        {"fit_dataset": "system.Dataset", "reward_model": "system.Model"},  # the dataset: written answers
        {"policy": "system.Model", "report": "system.Markdown", "metrics": "system.Metrics"},
        {"Output"},
    ),
    "evaluate": (
        {"policy": "system.Model", "reward_model": "system.Model"},
        {
            "evaluation": "system.Artifact",
            "report": "system.HTML",
            "summary": "system.Markdown",
            "metrics": "system.Metrics",
        },
        {"Output", "eval_run_id"},
    ),
    "promote": (
        {"policy": "system.Model", "reward_model": "system.Model"},
        {"report": "system.Markdown"},
        {"Output", "version"},
    ),
}


def test_published_component_specs_are_up_to_date(tmp_path):
    from preftune.components import compile_specs

    fresh = {p.name: p.read_text() for p in compile_specs(tmp_path)}
    published = {p.name: p.read_text() for p in SPECS.glob("*.yaml")}
    assert published == fresh, (
        "components/specs is out of date: run `preftune compile -o pipelines/preference-retraining.yaml "
        "--components components/specs`"
    )


@pytest.mark.parametrize("step", list(INTERFACES))
def test_each_published_spec_loads_with_typed_inputs_and_outputs(step):
    from kfp.components import load_component_from_file

    comp = load_component_from_file(str(SPECS / f"{step}.yaml"))
    assert comp.name == step
    art_in, art_out, params_out = INTERFACES[step]
    spec = comp.component_spec
    got_in = {k: v.type for k, v in spec.inputs.items() if v.type.startswith("system.")}
    assert {k: v.split("@")[0] for k, v in got_in.items()} == art_in
    assert spec.inputs["config"].type == "Dict"  # the run config, the one structured parameter
    got_out = {k: v.type.split("@")[0] for k, v in spec.outputs.items() if v.type.startswith("system.")}
    assert got_out == art_out
    assert {k for k, v in spec.outputs.items() if not v.type.startswith("system.")} == params_out
    # runs the pinned preftune image, which has kfp and preftune installed
    container = spec.implementation.container
    assert container.image == f"preftune:{__import__('preftune').__version__}"
    assert "pip install" not in " ".join(container.command)


def test_gates_are_boolean_outputs():
    from kfp.components import load_component_from_file

    for step in ("check-fit", "train-reward", "evaluate", "promote"):
        comp = load_component_from_file(str(SPECS / f"{step}.yaml"))
        assert comp.component_spec.outputs["Output"].type == "Boolean", step


def test_a_user_error_exits_with_its_code_and_one_line(capsys):
    from preftune.components.runtime import call

    from preftune.errors import ExitCode, InputError

    def bad(**_):
        raise InputError("data.prompts: /nope.jsonl does not exist")

    with pytest.raises(SystemExit) as exc:
        call(bad)
    assert exc.value.code == ExitCode.INPUT
    assert capsys.readouterr().err.strip() == "error: data.prompts: /nope.jsonl does not exist"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback (exit 1 in the pod)
        call(lambda: 1 / 0)


def test_outputs_are_written_as_kubeflow_and_the_local_cache_expect(tmp_path):
    from kfp.dsl import Metrics
    from preftune.components import runtime

    m = Metrics(name="metrics", uri=str(tmp_path / "m" / "metrics"), metadata={})
    runtime.write_metrics(m, {"reward.eval_accuracy.high risk": 0.8, "fit.fit_families": 3})
    assert m.metadata == {"reward.eval_accuracy.high_risk": 0.8, "fit.fit_families": 3.0}
    assert json.loads(Path(m.path).read_text()) == m.metadata  # the artifact has a file
    runtime.write_param(str(tmp_path / "p" / "hash"), "abc")
    assert (tmp_path / "p" / "hash").read_text() == "abc"  # exact: no newline in a parameter
