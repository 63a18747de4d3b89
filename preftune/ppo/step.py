"""The ppo step: policy + reward model + prompts in, a trained (and published) policy out.

:func:`run_ppo` is what ``preftune ppo`` and the pipeline component call. It

1. resolves the inputs (policy ref, reward-model folder, prompt set; ``s3://`` through storage),
2. builds the actor-critic (LoRA by default: the base is loaded once) and the reward scorer,
3. resumes from the newest checkpoint when there is one (the same command after a kill),
4. trains (:class:`~preftune.ppo.trainer.PPOTrainer`) with MLflow, Prometheus and a progress bar,
5. publishes the policy folder atomically (layout in :mod:`preftune.ppo.artifacts`) and logs it
   to MLflow as a pyfunc model with a signature, with the reward-and-KL curves.

Nothing is published when training fails; checkpoints stay for the next attempt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from preftune.common.device import select_device, torch_threads
from preftune.common.timestamps import utc_now
from preftune.config import RunConfig
from preftune.errors import ConfigError, InputError

log = logging.getLogger(__name__)

STEP = "ppo"
FINGERPRINT_EXEMPT = frozenset(
    {
        "updates",
        "progress",
        "threads",
        "params_per_thread",
        "pushgateway_url",
        "pushgateway_job",
        "samples_every",
        "samples_per_table",
        "log_model",
        "checkpoint_every",
        "keep_checkpoints",
        "checkpoint_dir",
        "save_merged",
        "device",
        "forward_batch_size",
        "reward_batch_size",
        "max_minutes",
        "length_drift_guard",
        "max_length_drift",
        "repetition_drift_guard",
        "max_repetition_rise",
        "repetition_ngram",
        "reward_divergence_guard",
        "divergence_min_reward_rise",
        "divergence_min_judged_rise",
        "drift_window",
    }
)
"""PPO settings that may change between a checkpoint and its resume (they do not change the math).

``updates`` may grow (train longer); the lr schedule then stretches from the resumed update on.
``forward_batch_size`` only chunks no-grad passes and ``threads`` only schedules work; either can
change float reductions by an ulp (the run stays valid, no longer bit-identical).
"""


@dataclass
class PPOResult:
    """What the ppo step produced and measured."""

    output: str
    updates: int
    resumed_from: int | None
    final: dict[str, float]
    first: dict[str, float]
    kl: float
    kl_budget: float
    kl_within_budget: bool
    reward_gain: float
    seconds: float
    last_checkpoint: str | None
    mlflow_run_id: str | None
    policy: str
    reward_model: str
    process_rank: int = 0
    history: list[dict[str, float]] = field(default_factory=list, repr=False)

    def to_dict(self, with_history: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_history:
            d.pop("history")
        return d


def checkpoint_root(output: str, cfg: RunConfig) -> str:
    """``ppo.checkpoint_dir``, else ``<output>.checkpoints`` next to the output (local or s3://)."""
    if cfg.ppo.checkpoint_dir:
        return cfg.ppo.checkpoint_dir
    return output.rstrip("/") + ".checkpoints"


def fingerprint(cfg: RunConfig, policy_path: str, reward_dir: str) -> str:
    """Hash of everything a resume must share with the run that wrote the checkpoint."""
    ppo = {k: v for k, v in cfg.ppo.model_dump(mode="json").items() if k not in FINGERPRINT_EXEMPT}
    canonical = json.dumps(
        {"ppo": ppo, "seed": cfg.run.seed, "policy": policy_path, "reward_model": reward_dir},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def auto_threads(n_params: int, params_per_thread: int, available: int) -> int:
    """One CPU thread per ``params_per_thread`` parameters, between 1 and ``available``."""
    return max(1, min(available, n_params // params_per_thread))


def load_prompt_items(
    cfg: RunConfig, storage: Any, excluded: set[str], allowed: set[str] | None = None
) -> tuple[list[Any], dict[str, int]]:
    """The rollout prompts (families in ``excluded``, or not in ``allowed``, left out) and counts per family."""
    from preftune.data.records import prompt_key
    from preftune.data.validation import ValidationReport
    from preftune.generation.candidates import load_prompts, training_prompts
    from preftune.ppo.trainer import PromptItem

    spec = cfg.ppo.prompts or cfg.data.prompts
    report = ValidationReport(max_chars=cfg.data.max_chars)
    records = load_prompts(spec, cfg, storage, report)
    seen = {prompt_key(r.prompt) for r in records}
    for extra in cfg.data.extra_prompts:  # observe's hard cases: collect judges them, the rollouts train on them
        for r in training_prompts(load_prompts(extra, cfg, storage, report))[0]:  # held-out cases: evaluate's
            if prompt_key(r.prompt) not in seen:
                seen.add(prompt_key(r.prompt))
                records.extend([r] * cfg.data.extra_prompts_repeat)  # repeats: weight in the rollouts
    items = [
        PromptItem(prompt=r.prompt, family=r.family, prompt_id=r.prompt_id)
        for r in records
        if r.family not in excluded and (allowed is None or r.family in allowed)
    ]
    if not items:
        covered = f" and keeping only the reward model's families {sorted(allowed)}" if allowed is not None else ""
        raise InputError(
            f"{spec}: no prompt left after excluding the families {sorted(excluded)}{covered}; check "
            "ppo.exclude_families and ppo.reward_model_families_only"
        )
    counts: dict[str, int] = {}
    for it in items:
        counts[it.family] = counts.get(it.family, 0) + 1
    return items, counts


def suite_judge(cfg: RunConfig, device: Any) -> Any:
    """The reward-divergence guard's judge: the evaluation suite's judge of each rollout response's family.

    True when the response shows one of its family's preferred behaviours, False when it does not,
    None for families the suite does not cover or that have no preferred behaviour.
    """
    from preftune.behaviour.judges import judge_by_family, load_judges
    from preftune.behaviour.suite import load_suite

    suite = load_suite(cfg.evaluation.suite, reward_model=cfg.evaluation.reward_model, world=cfg.world)
    judges = load_judges(suite, reward_model=cfg.evaluation.reward_model, device=device)
    preferred = {name: fam.preferred for name, fam in suite.families.items() if fam.preferred}

    def judge(items: Any, responses: Any) -> list[bool | None]:
        families = [it.family if it.family in preferred else "" for it in items]  # "": not judged
        labels = judge_by_family(suite, judges, families, [it.prompt for it in items], list(responses))
        return [None if f == "" else label in preferred[f] for f, label in zip(families, labels, strict=True)]

    return judge


def load_policy_model(path: str, device: Any) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot load the policy as a causal LM ({err})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise InputError(f"{path}: the policy's tokenizer has no EOS token; responses could never stop")
    return model.to(device), tok


def run_ppo(
    cfg: RunConfig,
    reward_model_dir: str,
    output: str,
    policy_ref: str | None = None,
    *,
    resume: bool = True,
    pipeline_run_id: str | None = None,
    reward_fn: Any = None,
    dataset: str | None = None,
) -> PPOResult:
    """Train the policy with PPO against the reward model and publish it at ``output``.

    ``reward_fn(prompts, responses) -> tensor`` replaces the reward model's scores when given (tests,
    custom rewards); the reward model folder still provides the normalisation statistics. ``dataset``: the
    run's (fit) preference dataset, whose written answers are the demonstrations of ``ppo.demonstration_coef``. Under
    ``torchrun`` (several processes) the rollouts and updates are data-parallel and process 0 alone
    tracks, checkpoints and publishes (see :mod:`preftune.ppo.distributed`).
    """

    from preftune.ppo import distributed

    s = cfg.ppo
    ctx = distributed.init_distributed(select_device(s.device, setting="ppo.device").type)
    try:
        with torch_threads(s.threads, deterministic=s.deterministic):
            return _run(cfg, reward_model_dir, output, policy_ref, resume, pipeline_run_id, reward_fn, ctx, dataset)
    finally:
        distributed.shutdown(ctx)


@dataclass
class _Inputs:
    """What the run trains with, resolved and loaded: the reward scorer, the prompts and the policy."""

    reward_local: str
    scorer: Any
    reward_stats: tuple[float, float] | None
    prompts: list[Any]
    family_counts: dict[str, int]
    policy_path: str
    base: Any
    tok: Any
    demonstrations: list[Any]


def _deepspeed_config(cfg: RunConfig, storage: Any, world_size: int) -> dict[str, Any] | None:
    """``ppo.deepspeed_config`` read and checked against the run config before any model is loaded."""
    s = cfg.ppo
    if not s.deepspeed_config:
        return None
    from preftune.ppo import zero

    ds_config = zero.load(str(storage.local_path(s.deepspeed_config)), s, world_size)
    if s.critic_warmup_updates:
        raise ConfigError(
            "ppo.critic_warmup_updates is not supported with ppo.deepspeed_config (the warm-up steps the critic "
            "outside the DeepSpeed engine); set it to 0, or use critic_init"
        )
    return ds_config


def _load_inputs(
    cfg: RunConfig, storage: Any, device: Any, reward_model_dir: str, policy_ref: str, dataset: str | None
) -> _Inputs:
    """The reward scorer (and its normalisation statistics), the rollout prompts, the starting policy and (with
    ``ppo.demonstration_coef``) the written answers of ``dataset`` in the same families as the prompts."""
    import torch

    from preftune.generation.candidates import resolve_policy
    from preftune.scoring.model import RewardScorer

    s = cfg.ppo
    reward_local = str(storage.local_path(reward_model_dir))
    scorer = RewardScorer.load(reward_local, device=device, batch_size=s.reward_batch_size)
    meta = scorer.meta
    reward_stats = (meta.reward_mean, meta.reward_std) if meta is not None else None
    excluded = set(s.exclude_families)
    extra = getattr(meta, "model_extra", None) or {}
    excluded |= set(extra.get("excluded_families") or [])
    allowed = set(meta.per_family) if (s.reward_model_families_only and meta is not None and meta.per_family) else None
    prompts, family_counts = load_prompt_items(cfg, storage, excluded, allowed)
    demos: list[Any] = []
    if s.demonstration_coef > 0:
        if dataset is None:
            log.warning(
                "ppo.demonstration_coef is %s but no dataset was given: no demonstration term", s.demonstration_coef
            )
        else:
            from preftune.ppo.demonstrations import load_demonstrations

            demos = load_demonstrations(storage.local_path(dataset), excluded=excluded, allowed=allowed)
            if not demos:
                log.warning("ppo.demonstration_coef: %s holds no written answers: no demonstration term", dataset)
    policy_path = resolve_policy(policy_ref, cfg, storage)
    base, tok = load_policy_model(policy_path, device)
    if s.threads is None and device.type == "cpu":
        n_params = sum(p.numel() for p in base.parameters())
        torch.set_num_threads(auto_threads(n_params, s.params_per_thread, torch.get_num_threads()))
    return _Inputs(reward_local, scorer, reward_stats, prompts, family_counts, policy_path, base, tok, demos)


def _demonstration_sampler(cfg: RunConfig, inputs: _Inputs, device: Any) -> Any:
    """The written answers, tokenised for the demonstration term (None: the term is off or has nothing)."""
    from preftune.ppo.demonstrations import DemonstrationSampler

    s = cfg.ppo
    if s.demonstration_coef <= 0 or not inputs.demonstrations:
        return None
    return DemonstrationSampler(
        inputs.demonstrations,
        inputs.tok,
        batch_size=s.demonstration_batch_size,
        max_prompt_tokens=s.max_prompt_tokens,
        max_new_tokens=s.max_new_tokens,
        seed=cfg.run.seed,
        device=device,
    )


def _build_actor(cfg: RunConfig, inputs: _Inputs, device: Any) -> tuple[Any, str]:
    """The actor-critic around the policy, and how its critic started (``ppo.critic_init``)."""
    import torch

    from preftune.ppo import estimators
    from preftune.ppo.policy import ActorCritic, start_critic

    s = cfg.ppo
    critic_free = not estimators.get(s.advantage_estimator).needs_critic
    actor = ActorCritic(
        inputs.base,
        mode=s.mode,
        critic="none" if critic_free else s.critic,  # a critic-free estimator: no value head at all
        temperature=s.temperature,
        lora_r=s.lora_r,
        lora_alpha=s.lora_alpha,
        lora_dropout=s.lora_dropout,
        lora_target_modules=list(s.lora_target_modules),
        ref_device=torch.device("cpu") if (s.ref_offload and device.type == "cuda") else device,
    ).to(device)
    # the critic starts as the reward model where the architectures allow it (ppo.critic_init), else at zero
    stats = inputs.reward_stats if s.reward_normalize else None
    critic_start = start_critic(actor, s.critic_init, inputs.scorer.model, inputs.tok, inputs.scorer.tokenizer, stats)
    if s.gradient_checkpointing:
        actor.gradient_checkpointing_enable()
    return actor, critic_start


def _resume(trainer: Any, store: Any, resume: bool, ctx: Any, ckpt_root: str) -> None:
    """Continue from the newest checkpoint (``resume``), else clear the checkpoint folder (process 0)."""
    from preftune.ppo import distributed
    from preftune.ppo.checkpoint import local_scratch, remove_scratch

    info = store.latest() if resume else None
    if not resume and ctx.is_main:
        store.clear()
    distributed.barrier(ctx)
    if info is None:
        return
    if info.fingerprint != store.fingerprint:
        raise ConfigError(
            f"{ckpt_root}: the checkpoint at update {info.update} was written with other PPO settings, "
            "policy, reward model or seed; rerun with the same config, or pass --no-resume to start over"
        )
    scratch = local_scratch("preftune-ppo-resume-")
    try:
        trainer.resume(info, store.fetch(info, scratch / "ckpt"))
    finally:
        remove_scratch(scratch)
    log.info("resumed from %s (update %d)", info.uri, info.update)


def _resolved_params(
    inputs: _Inputs,
    reward_model_dir: str,
    actor: Any,
    critic_start: str,
    device: Any,
    ctx: Any,
    ckpt_root: str,
    ds_config: Any,
) -> dict[str, Any]:
    """The run's resolved inputs and layout, as MLflow parameters."""
    import torch

    return {
        "ppo.resolved.policy_path": inputs.policy_path,
        "ppo.resolved.reward_model": reward_model_dir,
        "ppo.resolved.n_prompts": len(inputs.prompts),
        "ppo.resolved.prompt_families": json.dumps(inputs.family_counts, sort_keys=True),
        "ppo.resolved.trainable_parameters": actor.n_trainable(),
        "ppo.resolved.critic_start": critic_start,
        "ppo.resolved.device": str(device),
        "ppo.resolved.processes": ctx.world_size,
        "ppo.resolved.threads": torch.get_num_threads(),
        "ppo.resolved.checkpoint_root": ckpt_root,
        "ppo.resolved.demonstrations": len(inputs.demonstrations),
        "ppo.resolved.deepspeed_zero_stage": (ds_config.get("zero_optimization") or {}).get("stage", 0)
        if ds_config
        else "off",
    }


def _add_callbacks(cfg: RunConfig, trainer: Any) -> None:
    """Process 0's trackers: MLflow (with the history a resumed run already has) and the Pushgateway."""
    from preftune import tracking
    from preftune.ppo.observe import MlflowLogger, PushgatewayReporter

    s = cfg.ppo
    mlflow_logger = MlflowLogger()
    if trainer.history:
        mlflow_logger.log_history(trainer.history)
    trainer.callbacks.append(mlflow_logger)
    if s.pushgateway_url:
        labels = {"run": cfg.run.name, "pipeline_run_id": tracking.pipeline_run_id()}
        trainer.callbacks.append(PushgatewayReporter(s.pushgateway_url, s.pushgateway_job, labels))


def _result(
    cfg: RunConfig, trained: Any, output: str, policy_ref: str, reward_model_dir: str, run_id: str | None, rank: int
) -> PPOResult:
    """The step's result, with the figures derived from the history computed once."""
    s = cfg.ppo
    history = trained.history
    final = dict(history[-1]) if history else {}
    first = dict(history[0]) if history else {}
    kl = float(final.get("ppo/kl", 0.0))
    return PPOResult(
        output=output,
        updates=trained.updates,
        resumed_from=trained.resumed_from,
        final=final,
        first=first,
        kl=kl,
        kl_budget=s.kl_budget,
        kl_within_budget=kl <= s.kl_budget,
        reward_gain=float(final.get("ppo/reward_mean", 0.0) - first.get("ppo/reward_mean", 0.0)),
        seconds=trained.seconds,
        last_checkpoint=trained.last_checkpoint,
        mlflow_run_id=run_id,
        policy=policy_ref,
        reward_model=reward_model_dir,
        process_rank=rank,
        history=history,
    )


def _run(
    cfg: RunConfig,
    reward_model_dir: str,
    output: str,
    policy_ref: str | None,
    resume: bool,
    pipeline_run_id: str | None,
    reward_fn: Any,
    ctx: Any,
    dataset: str | None = None,
) -> PPOResult:
    import torch

    from preftune import tracking
    from preftune.ppo import distributed
    from preftune.ppo.checkpoint import CheckpointStore
    from preftune.ppo.trainer import PPOTrainer, install_sigterm
    from preftune.storage import Storage

    s = cfg.ppo
    storage = Storage.from_config(cfg.storage)
    device = distributed.device_for(ctx, select_device(s.device, setting="ppo.device"))
    policy_ref = policy_ref or cfg.models.policy
    torch.manual_seed(cfg.run.seed)
    ds_config = _deepspeed_config(cfg, storage, ctx.world_size)
    inputs = _load_inputs(cfg, storage, device, reward_model_dir, policy_ref, dataset)
    actor, critic_start = _build_actor(cfg, inputs, device)
    ckpt_root = checkpoint_root(output, cfg)
    store = CheckpointStore(
        ckpt_root, storage, s.keep_checkpoints, fingerprint(cfg, inputs.policy_path, inputs.reward_local)
    )

    def score(prompts_: Any, responses_: Any) -> torch.Tensor:
        return inputs.scorer.score(list(prompts_), list(responses_))

    trainer = PPOTrainer(
        s,
        actor,
        inputs.tok,
        reward_fn or score,
        inputs.prompts,
        seed=cfg.run.seed,
        device=device,
        reward_stats=inputs.reward_stats,
        checkpoints=store,
        progress=s.progress and ctx.is_main,
        world_size=ctx.world_size,
        rank=ctx.rank,
        judge_fn=suite_judge(cfg, device) if s.reward_divergence_guard != "off" else None,
        demonstrations=_demonstration_sampler(cfg, inputs, device),
    )
    trainer.broadcast_parameters()
    _resume(trainer, store, resume, ctx, ckpt_root)
    if ds_config is not None:  # after resume: ZeRO's fp32 master weights start from the resumed weights
        from preftune.ppo import zero

        trainer.attach_engine(zero.initialize(actor, trainer.optimizer, ds_config, device))

    # -- train (process 0 tracks and publishes) --------------------------------------------------
    params = _resolved_params(inputs, reward_model_dir, actor, critic_start, device, ctx, ckpt_root, ds_config)
    tags = {"preftune.resumed_from_update": str(trainer.update_idx)} if trainer.update_idx else None
    run_cm: Any = (
        tracking.start_step_run(STEP, cfg, pipeline_run_id=pipeline_run_id, params=params, tags=tags)
        if ctx.is_main
        else contextlib.nullcontext(None)
    )
    with run_cm as run:
        if ctx.is_main:
            _add_callbacks(cfg, trainer)
        undo = install_sigterm(trainer)
        try:
            trained = trainer.train()
        finally:
            undo()
        run_id = run.info.run_id if run is not None else None
        result = _result(cfg, trained, output, policy_ref, reward_model_dir, run_id, ctx.rank)
        if ctx.is_main:
            _publish(cfg, actor, inputs, result, trained.last_samples, storage)
    distributed.barrier(ctx)
    return result


def _publish(cfg: RunConfig, actor: Any, inputs: _Inputs, result: PPOResult, samples: list[Any], storage: Any) -> None:
    """Write the policy folder, log it (curves, metrics, pyfunc model) and publish it atomically."""
    import mlflow

    from preftune.ppo import artifacts
    from preftune.ppo.observe import curves_png

    s = cfg.ppo
    history, final, kl, within = result.history, result.final, result.kl, result.kl_within_budget
    with tempfile.TemporaryDirectory(prefix="preftune-ppo-out-") as tmp:
        folder = Path(tmp) / "policy"
        written = actor.save_policy(folder, inputs.tok, merged=s.save_merged)
        metadata = {
            "format": artifacts.FORMAT,
            "version": artifacts.VERSION,
            "base": result.policy,
            "base_path": inputs.policy_path,
            "mode": s.mode,
            "critic": "none" if actor.value_head is None else s.critic,
            "advantage_estimator": s.advantage_estimator,
            "merged": written["merged"],
            "adapter": written["adapter"],
            "reward_model": result.reward_model,
            "updates": result.updates,
            "resumed_from": result.resumed_from,
            "final": final,
            "kl": kl,
            "kl_budget": s.kl_budget,
            "kl_within_budget": within,
            "prompt_families": inputs.family_counts,
            "config_hash": cfg.config_hash(),
            "mlflow_run_id": result.mlflow_run_id,
            "created_at": utc_now(),
        }
        (folder / artifacts.METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        (folder / "metrics.json").write_text(json.dumps(history, indent=1) + "\n")
        (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
        if history:
            curves_png(history, folder / "curves.png", kl_budget=s.kl_budget)
            mlflow.log_artifact(str(folder / "curves.png"))
        mlflow.log_artifact(str(folder / "metrics.json"))
        mlflow.log_metrics({"ppo/final_kl_within_budget": float(within)})
        mlflow.set_tag("preftune.kl_within_budget", str(within).lower())
        if s.log_model:  # the candidate's one LoggedModel: evaluate scores it, promote registers it
            from preftune.policy_model import TAG_MODEL_HASH, folder_hash, log_policy_model

            adapter_only = written["adapter"] and not written["merged"]  # the base is needed to load it
            base = Path(inputs.policy_path) if adapter_only and cfg.promotion.package_adapter_base else None
            info = log_policy_model(
                folder, cfg.promotion.model_name, base=base, tags={TAG_MODEL_HASH: folder_hash(folder)}
            )
            mlflow.set_tag("preftune.logged_model_id", info.model_id)
        storage.put_dir(folder, result.output)
