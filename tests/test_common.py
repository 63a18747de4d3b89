"""``preftune.common``: the one home of device selection, thread control, metadata reading, timestamps, requirements."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from preftune.errors import ConfigError, ExitCode, InputError


def test_the_device_follows_the_setting_then_the_environment(monkeypatch):
    import torch

    from preftune.common.device import select_device

    monkeypatch.delenv("PREFTUNE_DEVICE", raising=False)
    assert select_device("cpu").type == "cpu"
    assert select_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("PREFTUNE_DEVICE", "cpu")
    assert select_device(None).type == "cpu"  # every step honours $PREFTUNE_DEVICE (evaluate did not)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"evaluation\.device is 'cuda' but no CUDA GPU") as err:
            select_device("cuda", setting="evaluation.device")
        assert err.value.exit_code == ExitCode.CONFIG
        monkeypatch.setenv("PREFTUNE_DEVICE", "cuda:0")
        with pytest.raises(ConfigError, match=r"\$PREFTUNE_DEVICE is 'cuda:0'"):
            select_device(None, setting="ppo.device")


def test_torch_threads_are_pinned_then_restored():
    import torch

    from preftune.common.device import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None, deterministic=True):
        assert torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled()


def test_metadata_files_fail_with_one_line_naming_the_file(tmp_path):
    from preftune.common.metadata import read_dataset_json, read_metadata_json

    path = tmp_path / "m.json"
    with pytest.raises(InputError, match="no such model"):
        read_metadata_json(path, fmt="x", missing="no such model")
    path.write_text("{not json")
    with pytest.raises(InputError, match=r"m\.json: cannot read thing"):
        read_metadata_json(path, fmt="x", missing="-", what="thing")
    path.write_text(json.dumps({"format": "y", "version": 1}))
    with pytest.raises(InputError, match="expected format 'x', got 'y'"):
        read_metadata_json(path, fmt="x", missing="-")
    with pytest.raises(InputError, match="unsupported y version 1 .this preftune reads 2"):
        read_metadata_json(path, fmt="y", version=2, missing="-")
    assert read_metadata_json(path, fmt="y", version=1, missing="-") == {"format": "y", "version": 1}
    with pytest.raises(InputError, match="s3://b/d: not a preftune dataset .no dataset.json"):
        read_dataset_json(tmp_path, "s3://b/d")
    (tmp_path / "dataset.json").write_text(json.dumps({"format": "preftune.dataset", "version": 1, "hash": "h"}))
    assert read_dataset_json(tmp_path)["hash"] == "h"


def test_timestamps_have_one_spelling():
    from preftune.common.timestamps import utc_now, utc_stamp

    assert len(utc_now()) == 20 and utc_now().endswith("Z")
    assert utc_stamp(0) == "1970-01-01T00:00:00Z"
    assert utc_stamp(datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05Z"  # naive means UTC
    plus2 = timezone(timedelta(hours=2))
    assert utc_stamp(datetime(2026, 1, 2, 3, 4, 5, tzinfo=plus2)) == "2026-01-02T01:04:05Z"


def test_pip_requirements_are_pinned_and_skip_missing_packages():
    from importlib.metadata import version

    from preftune.common.requirements import pip_requirements

    reqs = pip_requirements("peft", "no-such-package-xyz")
    names = [r.split("==")[0] for r in reqs]
    assert names[:2] == ["preftune", "torch"] and "no-such-package-xyz" not in names
    assert f"numpy=={version('numpy').split('+')[0]}" in reqs and names.index("peft") < names.index("pandas")
