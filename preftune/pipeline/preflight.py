"""Pre-flight: everything that can be checked before any step runs, failing with one line naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.errors import ConfigError, InputError, PreftuneError

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import RunConfig


def is_mlflow_ref(ref: str) -> bool:
    return ref.startswith(("models:/", "runs:/"))


def _check_ref(cfg: RunConfig, field_name: str, ref: str | None, *, kind: str, storage: Any, local_paths: bool) -> None:
    """Raise InputError when the model/file reference ``ref`` of ``field_name`` cannot be there."""
    from preftune.storage import is_s3_uri, parse_uri

    if not ref or is_mlflow_ref(ref):
        return
    if ref.startswith("demo:"):
        known = {"model": ("demo:policy", "demo:reward-base"), "prompts": ("demo:prompts",)}[kind]
        if ref not in known:
            raise InputError(f"{field_name}: unknown demo reference {ref!r}; use one of {', '.join(known)}")
        return
    try:
        parsed = parse_uri(ref)
    except PreftuneError as err:
        raise InputError(f"{field_name}: {err.message}") from None
    if is_s3_uri(ref):
        if not storage.exists(ref):
            what = "a folder published with save_pretrained" if kind == "model" else "a file"
            raise InputError(f"{field_name}: {ref} does not exist (expected {what} at that S3 URI)")
        return
    if not local_paths:
        return
    path = Path(parsed.key)
    if kind == "model":
        from preftune.models import is_hf_id, resolve_hf_cached

        if not path.is_dir() and is_hf_id(ref):  # a Hugging Face id: it must be in the local cache
            resolve_hf_cached(ref, setting=field_name)
            return
        if not path.is_dir():
            raise InputError(
                f"{field_name}: {ref} is not a folder; give a model saved with save_pretrained (local folder or "
                f"s3:// URI){' or demo:policy' if 'policy' in field_name else ''}"
            )
    elif not path.is_file():
        raise InputError(f"{field_name}: {ref} does not exist")


def preflight(
    cfg: RunConfig,
    *,
    local: bool,
    check_tracking: bool = True,
    check_storage: bool = True,
    check_paths: bool | None = None,
) -> None:
    """Fail before any step runs, with one line naming the field to change.

    ``local``: the run is about to start with the local runner on this machine (Kubernetes GPU
    requests are refused, ``cuda`` devices must exist here). ``check_paths`` (default: ``local``):
    local model folders and files must exist. On a cluster the same checks run inside the
    pipeline's first task, where the run's paths (e.g. on the model-cache claim), buckets and
    tracking server are visible; ``preftune run --host`` and ``preftune schedule`` check only
    what needs no access to them (``check_tracking=False, check_storage=False``).
    """
    check_paths = local if check_paths is None else check_paths
    from preftune.storage import Storage

    if local:
        gpu_steps = cfg.kubernetes.steps.gpu_steps()
        if gpu_steps:
            first = gpu_steps[0]
            n = getattr(cfg.kubernetes.steps, first).gpus
            raise ConfigError(
                f"kubernetes.steps.{first}.gpus is {n}, but the local runner runs every step as a process on this "
                f"machine and cannot give it Kubernetes GPUs: set kubernetes.steps.{first}.gpus to 0 for a local run "
                "(ppo.device picks a local GPU when there is one), or submit the run to a cluster with --host URL"
            )
        for name, device in (("ppo.device", cfg.ppo.device), ("evaluation.device", cfg.evaluation.device)):
            if device and device.startswith("cuda"):
                import torch

                if not torch.cuda.is_available():
                    raise ConfigError(
                        f"{name} is {device!r} but this machine has no CUDA GPU: set it to cpu or leave it empty"
                    )
    if cfg.kubernetes.trainer.enabled:  # the TrainJob's nodes read and write under storage.root
        from preftune.kube.handoff import check_supported, shared_root

        check_supported(cfg)
        shared_root(cfg)
    storage = Storage.from_config(cfg.storage)
    checks: list[tuple[str, str | None, str]] = [
        ("models.policy", cfg.models.policy, "model"),
        ("models.reward_base", cfg.models.reward_base, "model"),
        ("data.prompts", cfg.data.prompts, "prompts"),
        ("ppo.prompts", cfg.ppo.prompts, "prompts"),
        ("evaluation.reference", cfg.evaluation.reference, "model"),
        ("evaluation.reward_model", cfg.evaluation.reward_model, "model"),
    ]
    if cfg.evaluation.champion not in ("registry", "none"):
        checks.append(("evaluation.champion", cfg.evaluation.champion, "model"))
    if cfg.data.judgements != "simulated":
        if not cfg.data.judgements_path:
            raise ConfigError(
                f"data.judgements is {cfg.data.judgements!r}: set data.judgements_path to the export or file to read"
            )
        checks.append(("data.judgements_path", cfg.data.judgements_path, "file"))
    deepspeed = getattr(cfg.ppo, "deepspeed_config", None)  # present when the ppo section has DeepSpeed
    if deepspeed:
        checks.append(("ppo.deepspeed_config", deepspeed, "file"))
    suite = cfg.evaluation.suite
    if "/" in suite or suite.endswith((".yaml", ".yml")):
        checks.append(("evaluation.suite", suite, "file"))
    else:
        from preftune.behaviour.suite import shipped_suites

        if suite not in shipped_suites():
            raise ConfigError(
                f"evaluation.suite: no shipped suite {suite!r} (shipped: {', '.join(shipped_suites()) or 'none'}); "
                "give a suite name or a YAML path"
            )
    for name, ref, kind in checks:
        if not check_storage and ref and not ref.startswith("demo:"):
            continue
        _check_ref(cfg, name, ref, kind=kind, storage=storage, local_paths=check_paths)
    if check_tracking:
        from preftune import tracking

        tracking.check_reachable(tracking.resolve_tracking_uri(cfg.tracking), cfg.tracking.timeout_s)
