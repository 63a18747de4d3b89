"""Issue 16: what the compiled pipeline YAML carries of the ``kubernetes`` section.

``kubernetes.pipeline_root`` is baked into the compiled pipeline (``defaultPipelineRoot``), so a
package uploaded by hand keeps it. ``kubernetes.service_account`` has no place in the compiled
pipeline spec of kfp 2.17 (the service account is an attribute of a run or recurring run), so it is
applied where runs are created: ``preftune run --host`` and ``preftune schedule`` pass it (checked
in tests/test_schedule.py against a fake Kubeflow API).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from preftune.config import RunConfig


def compiled(tmp_path: Path, kubernetes: dict, which: str = "retraining") -> dict:
    from preftune.pipelines import pilot, retraining

    cfg = RunConfig.model_validate({"kubernetes": kubernetes})
    out = tmp_path / f"{which}.yaml"
    if which == "retraining":
        retraining.compile_pipeline(cfg, str(out))
    else:
        pilot.compile_pilot_pipeline(cfg, str(out))
    docs = list(yaml.safe_load_all(out.read_text()))
    return docs[0]


def test_pipeline_root_is_baked_into_both_compiled_pipelines(tmp_path: Path):
    for which in ("retraining", "pilot"):
        spec = compiled(tmp_path, {"pipeline_root": "s3://ml-artifacts/kfp"}, which)
        assert spec["defaultPipelineRoot"] == "s3://ml-artifacts/kfp", which
        assert "defaultPipelineRoot" not in compiled(tmp_path, {}, which)
