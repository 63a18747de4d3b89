"""The run config: defaults work, the example round-trips, and bad files name the field and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from preftune.config import RunConfig, example_yaml, json_schema, load_config, parse_config
from preftune.errors import ConfigError, ExitCode

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_hash_is_stable():
    a, b = RunConfig(), RunConfig()
    assert a.config_hash() == b.config_hash()
    c = parse_config({"run": {"seed": 1}})
    assert c.config_hash() != a.config_hash()


def test_example_yaml_round_trips_to_defaults():
    text = example_yaml()
    assert text.count("# ") > 20  # every field documented
    assert parse_config(yaml.safe_load(text)) == RunConfig()


def test_every_field_has_a_description():
    schema = json_schema()
    missing = []

    def walk(node, path):
        for name, prop in node.get("properties", {}).items():
            if "$ref" in prop:
                ref = prop["$ref"].split("/")[-1]
                walk(schema["$defs"][ref], f"{path}{name}.")
            elif "description" not in prop:
                missing.append(path + name)

    walk(schema, "")
    assert not missing, f"fields without a description: {missing}"


def test_published_schema_is_up_to_date():
    published = REPO / "docs" / "run-config.schema.json"
    assert published.exists(), "run `preftune config schema -o docs/run-config.schema.json`"
    assert json.loads(published.read_text()) == json_schema(), (
        "docs/run-config.schema.json is stale: run `preftune config schema -o docs/run-config.schema.json`"
    )


def test_invalid_value_names_file_field_and_line(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("run:\n  name: x\n  seed: -3\nreward:\n  lr: 0\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = ei.value.message
    assert f"{p}:3: run.seed" in msg
    assert f"{p}:5: reward.lr" in msg
    assert ei.value.exit_code == ExitCode.CONFIG


def test_unknown_field_is_rejected_with_a_hint(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("models:\n  polcy: x\n")
    with pytest.raises(ConfigError, match=r"run.yaml:2: models.polcy: unknown field"):
        load_config(p)


def test_unreadable_or_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(lst)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(binary)


def test_empty_file_gives_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert load_config(p) == RunConfig()
