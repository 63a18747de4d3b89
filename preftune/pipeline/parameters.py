"""The run config as the pipeline's one parameter, ``config`` (a dict), and back.

Kubeflow parameters and the local runner cannot hold a null, and a short parameter reads better
in the Kubeflow UI: :func:`config_parameter` keeps only the fields that differ from the defaults
and lists the fields set to null under ``null_fields``; :func:`load` reverses it exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from preftune.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import RunConfig

NULLS_KEY = "null_fields"
"""Key of the ``config`` parameter listing fields set to null (kfp parameters cannot hold a null)."""


def config_parameter(cfg: RunConfig) -> dict[str, Any]:
    """The run config as the pipeline's ``config`` parameter: the fields that differ from the defaults.

    Short (the default config is ``{}``) and free of nulls, which neither a compiled default nor
    the local runner can carry: a field set to null where its default is not (``ppo.reward_clip:
    null``) is listed under ``null_fields`` instead. :func:`load` reverses it exactly.
    """
    from preftune.kube.config import StepsSection

    data = cfg.model_dump(mode="json", exclude_defaults=True)
    # Steps have per-step defaults that differ from StepResources' own: compare whole steps instead.
    kube = data.get("kubernetes", {})
    kube.pop("steps", None)
    default_steps = StepsSection()
    changed = {
        name: getattr(cfg.kubernetes.steps, name).model_dump(mode="json", exclude_none=True)
        for name in StepsSection.model_fields
        if getattr(cfg.kubernetes.steps, name) != getattr(default_steps, name)
    }
    if changed:
        kube["steps"] = changed
    if kube:
        data["kubernetes"] = kube
    else:
        data.pop("kubernetes", None)
    nulls: list[str] = []

    def strip(node: Any, prefix: str) -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if v is None:
                    nulls.append(f"{prefix}{k}")
                    continue
                value = strip(v, f"{prefix}{k}.")
                if isinstance(v, dict) and v and not value:
                    continue  # a section left empty once its nulls moved to null_fields
                out[k] = value
            return out
        if isinstance(node, list):
            return [strip(v, prefix) for v in node if v is not None]
        return node

    data = strip(data, "")
    if nulls:
        data[NULLS_KEY] = sorted(nulls)
    return data


def load(config: Mapping[str, Any] | RunConfig) -> RunConfig:
    """The run config from the pipeline's ``config`` parameter (a dict), validated; a RunConfig passes through."""
    from preftune.config import RunConfig, parse_config

    if isinstance(config, RunConfig):
        return config
    data = copy.deepcopy(dict(config or {}))
    nulls = data.pop(NULLS_KEY, None) or []
    if not isinstance(nulls, list):
        raise ConfigError(f"pipeline parameter 'config': {NULLS_KEY} must be a list of field paths")
    for path in nulls:
        node = data
        *parents, leaf = str(path).split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"pipeline parameter 'config': {NULLS_KEY} names {path!r}, which is not a field")
        node[leaf] = None
    return parse_config(data, "pipeline parameter 'config'")
