"""The ``preference-pilot`` pipeline variant: the retraining components on the pilot's config, then pilot-report."""

from __future__ import annotations

from pathlib import Path

from test_pipeline_spec import load_compiled, source, tasks_of

from preftune.config import parse_config


def test_pilot_pipeline_compiles_with_the_retraining_components_and_a_report(tmp_path: Path):
    from preftune.pipelines.pilot import compile_pilot_pipeline

    from preftune.pipeline import load

    cfg = parse_config({"pilot": {"fraction": 0.1, "ppo_updates": 5}, "run": {"name": "team-x"}})
    path = tmp_path / "pilot.yaml"
    compile_pilot_pipeline(cfg, str(path))
    component = load_compiled(path)
    spec = component.pipeline_spec
    assert spec.pipeline_info.name == "preference-pilot"
    tasks = tasks_of(component)
    assert set(tasks) == {
        "open-run",
        "collect",
        "check-fit",
        "train-reward",
        "ppo",
        "evaluate",
        "pilot-report",
        "close-run",
    }  # no promote: a pilot registers nothing
    # the same components as the retraining pipeline (same executor commands)
    from preftune.pipelines import COMPILED_PIPELINE

    retraining = tasks_of(load_compiled(COMPILED_PIPELINE))
    for name in ("collect", "check-fit", "train-reward", "ppo", "evaluate"):
        assert tasks[name]["executor"]["container"]["command"] == retraining[name]["executor"]["container"]["command"]
    # only the fit gate: the report runs whatever the reward model's accuracy and the evaluation gates say
    assert len(tasks["pilot-report"]["conditions"]) == 1
    assert len(tasks["ppo"]["conditions"]) == 1 and len(tasks["evaluate"]["conditions"]) == 1
    inputs = tasks["pilot-report"]["task"].inputs.artifacts
    assert source(inputs["evaluation"]).startswith("evaluate")
    assert source(inputs["fit_dataset"]).startswith("check-fit")
    # parameters: the pilot's step config (slice, short PPO, no reward gate) and the user's config
    params = spec.root.input_definitions.parameters
    from google.protobuf import json_format

    step_cfg = load(json_format.MessageToDict(params["config"].default_value.struct_value))
    full_cfg = load(json_format.MessageToDict(params["full_config"].default_value.struct_value))
    assert step_cfg.data.prompt_fraction == 0.1 and step_cfg.ppo.updates == 5 and step_cfg.reward.min_accuracy == 0
    assert step_cfg.run.name == "team-x-pilot" and full_cfg == cfg


def test_pilot_command_compiles_the_pipeline(tmp_path: Path, capsys):
    import pytest

    from preftune.cli import main

    out = tmp_path / "p.yaml"
    with pytest.raises(SystemExit) as exc:
        main(["pilot", "--compile", str(out)])
    assert exc.value.code == 0 and "compiled preference-pilot" in capsys.readouterr().out
    assert load_compiled(out).pipeline_spec.pipeline_info.name == "preference-pilot"


def test_the_pilot_walks_the_shared_steps_in_the_pipelines_order():
    from preftune.pilot.run import PILOT_STEPS
    from preftune.pipeline.graph import SHARED_STEPS, STEPS

    assert tuple(s.name for s in PILOT_STEPS) == SHARED_STEPS == STEPS[:-1]
