"""``preftune pilot``: collect -> check-fit -> train-reward -> short PPO -> evaluate, on a slice, then a report.

The pilot runs the *same* step adapters as the retraining pipeline (:mod:`preftune.pipeline`, what
the Kubeflow components call), walking one step table (:data:`PILOT_STEPS`) in this process, on
the ``RunConfig`` itself, derived from the run config by
:func:`pilot_config`: a slice of the prompts (``pilot.fraction``), a fixed PPO budget
(``pilot.ppo_updates`` / ``pilot.ppo_minutes``), no reward gate (the pilot judges the reward model
itself and reports it), the drift guards set to warn, and the candidate compared with the
champion or the base policy (``pilot.baseline``). Nothing is registered or promoted.

:func:`build_report` reads the published folders and writes ``pilot.json``, ``pilot.md`` and
``pilot.html``; it is also the body of the ``pilot_report`` component of the ``preference-pilot``
pipeline. Exit codes: 0 when at least one family is 'go'; otherwise 11 when the reward model is
near chance, 10 when check-fit found no fit family (single-rated data whose agreement was not
measured: the verdict is "not measured — audit or accept", :mod:`preftune.pilot.fit_status`), 13
for any other no-go.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune import pipeline as pl
from preftune.config import RunConfig
from preftune.errors import PreftuneError
from preftune.pilot import report as rep
from preftune.pilot.fit_status import apply_fit_status
from preftune.pipeline.records import StepResult

log = logging.getLogger(__name__)

STEP = "pilot"
ARTIFACT_DIR = "pilot"
TAG_VERDICT = "preftune.pilot.verdict"
TAG_GO_FAMILIES = "preftune.pilot.go_families"


def pilot_config(cfg: RunConfig, *, champion_exists: bool | None = None) -> RunConfig:
    """The config the pilot's steps run with (see the module doc). ``champion_exists``: whether the registry
    has a champion (None: keep 'registry' and let evaluate find out, as the pipeline does)."""
    p = cfg.pilot
    out = cfg.model_copy(deep=True)
    out.run.name = f"{cfg.run.name}-pilot"
    out.data.prompt_fraction = cfg.data.prompt_fraction * p.fraction
    out.reward.min_accuracy = 0.0  # the pilot reports a weak reward model instead of stopping on it
    out.reward.gate.enabled = False  # the calibrated gate's figures are measured and logged, never stop the pilot
    s = out.ppo
    s.updates = p.ppo_updates
    s.max_minutes = p.ppo_minutes
    if p.ppo_batch_size is not None:
        s.batch_size = p.ppo_batch_size
        s.mini_batch_size = min(s.mini_batch_size, s.batch_size)
        while s.batch_size % s.mini_batch_size:
            s.mini_batch_size -= 1
        while s.mini_batch_size % s.grad_accum_steps:
            s.grad_accum_steps -= 1
    s.warmup_updates = min(s.warmup_updates, max(0, p.ppo_updates - 1))
    s.checkpoint_every = max(s.checkpoint_every, p.ppo_updates)
    s.log_model = False
    s.samples_every = max(1, p.ppo_updates)
    for guard in ("length_drift_guard", "repetition_drift_guard", "reward_divergence_guard"):
        if getattr(s, guard) == "stop":
            setattr(s, guard, "warn")  # the pilot reports drift as red flags, it does not stop on it
    if p.baseline == "policy" or champion_exists is False:
        out.evaluation.champion = cfg.models.policy
    elif out.evaluation.champion == "none":
        out.evaluation.champion = cfg.models.policy
    # the pipeline variant decides at run time: no champion registered yet -> the base policy is the baseline
    out.evaluation.champion_fallback = "reference"
    return out


def _champion_exists(cfg: RunConfig) -> bool:
    from preftune import registry, tracking

    if cfg.evaluation.champion != "registry":
        return True
    client = registry.mlflow_client(tracking.resolve_tracking_uri(cfg.tracking))
    return registry.alias_version(client, cfg.models.registered_model, cfg.promotion.champion_alias) is not None


def measure_best_of_n(pcfg: RunConfig, policy_dir: str, reward_dir: str) -> dict[str, Any]:
    """Best-of-n of the starting policy (``models.policy``) with the reward model, beside the pilot's PPO policy.

    On ``pilot.best_of_n_prompts`` of the PPO prompts (a seeded sample), at PPO's sampling settings;
    rewards normalised as PPO sees them. A failure is reported in the figures, not raised: the
    go / no-go report is still written.
    """
    import random

    import torch

    from preftune.generation.candidates import resolve_policy
    from preftune.ppo import best_of_n
    from preftune.ppo.artifacts import load_policy
    from preftune.ppo.step import load_policy_model, load_prompt_items
    from preftune.scoring.model import RewardScorer
    from preftune.storage import Storage

    p, s = pcfg.pilot, pcfg.ppo
    try:
        storage = Storage.from_config(pcfg.storage)
        device = torch.device("cpu")
        scorer = RewardScorer.load(str(storage.local_path(reward_dir)), device=device, batch_size=s.reward_batch_size)
        allowed = set(scorer.meta.per_family) if (s.reward_model_families_only and scorer.meta.per_family) else None
        items, _ = load_prompt_items(pcfg, storage, set(s.exclude_families), allowed)
        prompts = [it.prompt for it in items]
        random.Random(pcfg.run.seed).shuffle(prompts)
        prompts = prompts[: p.best_of_n_prompts]
        base, tok = load_policy_model(resolve_policy(pcfg.models.policy, pcfg, storage), device)
        trained, _ = load_policy(str(storage.local_path(policy_dir)), device=device)
        normalize = s.reward_normalize and scorer.meta is not None

        def score(ps: Any, rs: Any) -> torch.Tensor:
            return scorer.score(list(ps), list(rs), normalize=normalize)

        with torch.no_grad():
            return best_of_n.measure(
                base.eval(),
                tok,
                prompts,
                score,
                ns=p.best_of_n,
                max_new_tokens=s.max_new_tokens,
                temperature=s.temperature,
                seed=pcfg.run.seed,
                trained=trained,
                trained_samples=p.best_of_n_policy_samples,
                batch_size=s.forward_batch_size,
            )
    except Exception as err:  # the report is still written, with the reason
        log.warning("best-of-n baseline not measured: %s", err)
        return {"error": f"{type(err).__name__}: {err}"}


def build_report(
    config: Mapping[str, Any] | RunConfig,
    fit_dir: str,
    reward_dir: str | None,
    policy_dir: str | None,
    eval_dir: str | None,
    output: str,
    *,
    step_seconds: Mapping[str, float] | None = None,
    dataset_dir: str | None = None,
    seconds: float | None = None,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Read the steps' folders, decide, write the report to ``output`` and log it to MLflow (a ``pilot`` run).

    ``config`` is the *user's* run config (the full run the cost estimate is about), not the pilot's.
    ``dataset_dir``: the collected dataset, whose counts are used when check-fit stopped the pilot.
    """
    import mlflow

    from preftune import tracking

    cfg = pl.load(config)
    pcfg = pilot_config(cfg)
    if parent_run_id is None:  # in the pipeline: the pipeline's MLflow run, found by its run id
        parent_run_id = os.environ.get(tracking.ENV_PARENT_RUN_ID) or None
        if parent_run_id is None:
            with contextlib.suppress(Exception):
                parent_run_id = pl.find_pipeline_run(pcfg, pl.pipeline_id())
    if step_seconds is None and parent_run_id is not None:
        with contextlib.suppress(Exception):  # the pipeline: each step's summary under the run has its seconds
            found = pl.gather_steps(pcfg, pl.pipeline_id(), None, parent=parent_run_id)
            step_seconds = {
                name: float(s["seconds"]) for name, s in found.items() if isinstance(s.get("seconds"), (int, float))
            }
    inputs = rep.read_inputs(fit_dir, reward_dir, policy_dir, eval_dir, step_seconds, dataset_dir)
    if policy_dir and reward_dir and pcfg.pilot.best_of_n:
        inputs.best_of_n = measure_best_of_n(pcfg, policy_dir, reward_dir)
    report = apply_fit_status(rep.analyse(cfg, inputs, pilot_batch=pcfg.ppo.batch_size, seconds=seconds), inputs.fit)
    paths = rep.write_report(report, output)
    tags = {TAG_VERDICT: report["verdict"], TAG_GO_FAMILIES: ",".join(report["go_families"]) or "none"}
    with tracking.start_step_run(STEP, pcfg, parent_run_id=parent_run_id, tags=tags, log_config=False) as run:
        figures = {"pilot.go_families": float(len(report["go_families"]))}
        for f, r in report["families"].items():
            figures[f"pilot.{f}.go"] = 1.0 if r["verdict"] == rep.GO else 0.0
            change = r["preferred_share"]["change"]
            if change is not None:
                figures[f"pilot.{f}.preferred_share_change"] = change["value"]
        figures["pilot.red_flags"] = float(len(report["red_flags"]))
        m = report["cost"]["measured"]
        if m["ppo_seconds_per_update"] is not None:
            figures["pilot.ppo_seconds_per_update"] = m["ppo_seconds_per_update"]
        if m["ppo_tokens_per_s"] is not None:
            figures["pilot.ppo_tokens_per_s"] = m["ppo_tokens_per_s"]
        figures["pilot.full_run_hours"] = report["cost"]["full_run"]["hours"]
        if seconds is not None:
            figures["pilot.seconds"] = seconds
        mlflow.log_metrics(figures)
        for path in paths.values():
            mlflow.log_artifact(str(path), ARTIFACT_DIR)
        report["mlflow_run_id"] = run.info.run_id
    report["output"] = output
    return report


@dataclass
class _Pilot:
    """One pilot while it runs: its config, folders and the results of the steps so far."""

    cfg: RunConfig
    work: Path
    snapshot: str
    reward_model: str | None
    """An existing reward-model folder to pilot instead of training one (``--reward-model``)."""
    results: dict[str, StepResult] = field(default_factory=dict)

    def dir(self, name: str) -> str:
        return str(self.work / name)

    @property
    def fit(self) -> bool:
        res = self.results.get("check-fit")
        return bool(res is not None and res.fit)

    @property
    def fit_hash(self) -> str:
        return self.results["check-fit"].dataset_hash

    @property
    def reward_dir(self) -> str:
        return self.reward_model or self.dir("reward_model")


@dataclass(frozen=True)
class PilotStep:
    """One row of the pilot's step table: a step of :data:`preftune.pipeline.graph.SHARED_STEPS`."""

    name: str
    run: Callable[[_Pilot], StepResult]
    when: Callable[[_Pilot], bool] = lambda p: True
    folder: str | None = None
    """The step's output folder under the pilot's ``steps/`` folder (what the report reads)."""


def _fit(p: _Pilot) -> bool:
    return p.fit


PILOT_STEPS: tuple[PilotStep, ...] = (
    PilotStep("collect", lambda p: pl.collect(p.cfg, p.dir("dataset"), snapshot=p.snapshot), folder="dataset"),
    PilotStep(
        "check-fit",
        lambda p: pl.check_fit(
            p.cfg, p.dir("dataset"), p.dir("fit"), snapshot=p.snapshot, dataset_hash=p.results["collect"].dataset_hash
        ),
        folder="fit",
    ),
    PilotStep(
        "train-reward",
        lambda p: pl.train_reward(
            p.cfg, p.dir("fit"), p.dir("reward_model"), snapshot=p.snapshot, dataset_hash=p.fit_hash
        ),
        when=lambda p: p.fit and p.reward_model is None,
        folder="reward_model",
    ),
    PilotStep(
        "ppo",
        lambda p: pl.ppo(p.cfg, p.reward_dir, p.dir("policy"), snapshot=p.snapshot, dataset_hash=p.fit_hash),
        when=_fit,
        folder="policy",
    ),
    PilotStep(
        "evaluate",
        lambda p: pl.evaluate(p.cfg, p.dir("policy"), p.reward_dir, p.dir("evaluation"), dataset_hash=p.fit_hash),
        when=_fit,
        folder="evaluation",
    ),
)
"""The steps the pilot runs in this process, in the pipeline's order (the same adapters as the components)."""


def run_pilot(
    cfg: RunConfig,
    output: str,
    *,
    reward_model: str | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Run the pilot on this machine and write its report to ``output``; returns the report dict.

    ``reward_model``: pilot an existing reward-model folder instead of training one on the slice
    (its ``reward_model.json`` supplies the held-out accuracy). ``progress(step)`` is called as each
    step starts.
    """
    from preftune import tracking

    t0 = time.time()
    pcfg = pilot_config(cfg, champion_exists=_champion_exists(cfg))
    say = progress or (lambda step: None)
    work = Path(output) / "steps"
    work.mkdir(parents=True, exist_ok=True)
    pid = f"pilot-{uuid.uuid4().hex[:12]}"  # one MLflow tree per pilot, even several in one process
    with pl.environ(**{tracking.ENV_PIPELINE_RUN_ID: pid}):
        opened = pl.open_pipeline_run(pcfg, pid, local=True, started_at=t0)
        with pl.environ(**{tracking.ENV_PARENT_RUN_ID: opened.parent_run_id}):
            state = "SUCCEEDED"
            try:
                pilot = _Pilot(pcfg, work, opened.snapshot, reward_model)
                for step in PILOT_STEPS:
                    if step.when(pilot):
                        say(step.name)
                        pilot.results[step.name] = step.run(pilot)
                ran = {s.folder: pilot.dir(s.folder) for s in PILOT_STEPS if s.name in pilot.results and s.folder}
                say("report")
                out = build_report(
                    cfg,
                    pilot.dir("fit"),
                    pilot.reward_dir if pilot.fit else None,
                    ran.get("policy"),
                    ran.get("evaluation"),
                    output,
                    step_seconds={name: r.seconds for name, r in pilot.results.items() if r.seconds is not None},
                    dataset_dir=pilot.dir("dataset"),
                    seconds=time.time() - t0,
                    parent_run_id=opened.parent_run_id,
                )
            except BaseException:
                state = "FAILED"
                raise
            finally:
                with contextlib.suppress(PreftuneError):
                    pl.close_pipeline_run(pcfg, pid, state=state)
    out["seconds"] = time.time() - t0
    out["pipeline_run_id"] = pid
    return out
