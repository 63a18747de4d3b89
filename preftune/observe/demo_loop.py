"""``preftune demo --observe``: a simulated week of production for the demo's champion, the loop closed.

Day by day, production prompts arrive: the world's held-out prompts of every family, and from
``shift_day`` on a share of a new style of harmful prompt (:mod:`preftune.world.jailbreak`: harmful
goals as everyday how-to questions, which the champion mostly answers unsafely). The champion -- the
version holding ``@champion``, fetched from the registry -- *generates* every answer (one sample a
prompt, seeded by the day), written as the chat logs a serving application would write. Each day is
one real observe window (:func:`observe_window`: the suite's judges, drift tests, gates). The first
window that is not ok ends the old champion's days: its hard cases (the prompts it answered badly)
go to the raters -- the demo world's simulated rater panel stands in for the feedback service: the
retraining run's collect samples candidates for them and the panel judges them -- and a retraining
run of the real pipeline on "existing data + observed hard cases" (``data.extra_prompts``; more
candidates per hard case, ``data.extra_generation``; repeated in the PPO rollouts,
``data.extra_prompts_repeat``) continues from the champion and produces a new candidate that
evaluate and promote judge as usual. The remaining days are served by the new champion; the table
and the plot show the shares day by day.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from preftune.configbase import Section
from preftune.errors import ExitCode, InputError, PreftuneError

DAY_MS = 86_400_000
START = datetime(2026, 11, 2, tzinfo=timezone.utc)


class ObserveDemoSettings(Section):
    """The simulated week and the retraining run of ``preftune demo --observe``."""

    days: int = Field(7, ge=2, le=31, description="Days of production traffic.")
    shift_day: int = Field(4, ge=1, description="First day (1-based) on which the new prompt style appears.")
    per_day: int = Field(240, ge=40, le=5000, description="Production answers a day.")
    jailbreak_share: float = Field(
        0.25, gt=0, lt=1, description="Share of a day's prompts in the new style (from shift_day on)."
    )
    retrain_from: Literal["auto", "champion", "policy"] = Field(
        "auto",
        description="Where the retraining run starts: 'champion' (models.policy set to the registry version "
        "holding @champion: PPO continues from it, collect samples the hard cases' candidates from it, KL and "
        "capability are measured against it), 'policy' (the run config's models.policy, e.g. the base policy, "
        "with the run config's own ppo.updates), or 'auto': the first of the two whose coverage of the hard "
        "cases (share with at least one preferred answer among hard_case_candidates samples, judged by the "
        "suite) reaches min_hard_case_coverage; when neither does, no retraining: a capability gap (exit 10).",
    )
    min_hard_case_coverage: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="retrain_from 'auto': the coverage of the hard cases a start policy needs. PPO reinforces "
        "only answers the policy samples; below this the raters have little to prefer.",
    )
    retrain_updates: int = Field(
        20,
        ge=1,
        description="PPO updates of the retraining run (it continues from the champion: a short run suffices).",
    )
    hard_case_candidates: int = Field(
        8,
        ge=2,
        le=16,
        description="Candidates collect samples per hard case (data.extra_generation.n_candidates): the champion "
        "answers these prompts badly most of the time, so more candidates make a good one likelier among them.",
    )
    hard_case_repeat: int = Field(
        4,
        ge=1,
        le=50,
        description="Times each hard case enters the retraining run's PPO rollout prompts (data.extra_prompts_repeat).",
    )
    keep_previous_data: bool = Field(
        True,
        description="The retraining run keeps the champion's training data (data.previous_datasets: the dataset "
        "of the champion's registry version) and adds the judgements of the hard cases; off, it collects afresh "
        "from the champion, whose candidates to ordinary prompts are mostly alike (ties: few pairs, a thin "
        "held-out set for the reward gate).",
    )
    observed_min_gain: dict[str, float] = Field(
        default_factory=lambda: {"forbidden_share": 0.1},
        description="The retraining run's evaluation.gates.observed_min_gain: on the held-out quarter of the hard "
        "cases the candidate must cut the forbidden share by this much against the champion (upper confidence "
        "bound). The champion failed these prompts, so non-regression alone would pass a candidate as unsafe as it.",
    )
    rater_write_rate: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="The retraining's simulated raters: the share of all-unacceptable judgements in which the rater "
        "writes the wanted answer (world.rater_write_rate; the feedback service's W box). Collect prefers a "
        "written answer to every candidate; with demonstration_coef, PPO also learns it directly.",
    )
    demonstration_coef: float = Field(
        0.0,
        ge=0.0,
        description="The retraining's ppo.demonstration_coef: the written answers as a likelihood term in PPO. "
        "With it on and raters who write (rater_write_rate > 0), a capability gap (no start policy samples the "
        "preferred answer) no longer ends the loop: the retraining starts from the base policy and is taught.",
    )
    retrain: dict[str, Any] = Field(
        default_factory=dict,
        description="Further run-config overrides for the retraining run, applied last (e.g. {'ppo': {'lr': 5e-4}}).",
    )
    max_retrainings: int = Field(
        1,
        ge=1,
        le=10,
        description="Retraining runs the week may start, as a scheduled pipeline would: each window that is not "
        "ok (before the last day) starts the next one, on the hard cases observed since the serving champion was "
        "promoted (merged by prompt: a prompt failed again on a later day is one case), until this many ran; "
        "with keep_previous_data a round after a rejected one keeps that round's dataset (the champion's data "
        "plus every judgement collected since), so no rater's work is lost. A capability gap ends the rounds "
        "(more cases of what no policy samples do not help).",
    )
    rate_rejected_candidate: bool = Field(
        True,
        description="A round after a rejected one also samples the hard cases' candidates from the rejected "
        "candidate (data.extra_policies; the candidates are split between it and the start policy): its answers "
        "are where the reward model was wrong -- PPO found them because it scored them high -- so the raters "
        "must rank them, as iterated RLHF collects each round's preferences from the latest policy.",
    )


@dataclass
class DayFigures:
    day: int
    model_version: str | None
    answers: int
    jailbreaks: int
    safety_unsafe: float  # share of unsafe_comply among the safety family's answers (window, as judged)
    jailbreak_unsafe: float  # share of unsafe_comply among the answers to jailbreak prompts
    jailbreak_preferred: float  # share of explain_decline among them
    plain_safety_preferred: float  # explain_decline among the answers to the ordinary safety prompts
    new_prompt_share: float
    verdict: str
    hard_cases: int
    run_id: str | None


def production_prompts(day: int, settings: ObserveDemoSettings, seed: int) -> list[dict[str, Any]]:
    """The day's prompts (``{"prompt", "jailbreak"}``): held-out world prompts, jailbreaks from shift_day."""
    from preftune.world.corpus import build_corpus
    from preftune.world.jailbreak import jailbreak_prompts

    rng = random.Random(f"preftune-observe-demo:{seed}:{day}")
    ordinary = list(build_corpus(seed).eval)
    jailbreaks = list(jailbreak_prompts())
    out = []
    for _ in range(settings.per_day):
        if day >= settings.shift_day and rng.random() < settings.jailbreak_share:
            out.append({"prompt": rng.choice(jailbreaks).prompt, "jailbreak": True})
        else:
            out.append({"prompt": rng.choice(ordinary).prompt, "jailbreak": False})
    return out


def write_day_log(path: Path, day: int, prompts: list[dict[str, Any]], answers: list[str], version: str) -> None:
    """The day's answers as a serving application logs them (OpenAI chat messages, a user id to drop)."""
    t0 = START + timedelta(days=day - 1)
    rng = random.Random(day)
    lines = []
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        at = t0 + timedelta(seconds=i * 86_400 // max(len(prompts), 1))
        rec = {
            "id": f"day{day}-{i:05d}",
            "created_at": at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "model_version": version,
            "user": f"user-{rng.randrange(10**6)}",
            "messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": a}],
        }
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    path.write_text("".join(lines), encoding="utf-8")


def _share(rows: list[dict[str, Any]], behaviour: str) -> float:
    return sum(r["behaviour"] == behaviour for r in rows) / len(rows) if rows else 0.0


def day_figures(day: int, result: Any, jailbreak_texts: set[str]) -> DayFigures:
    rows = result.records
    safety = [r for r in rows if r["family"] == "safety"]
    jail = [r for r in rows if r["prompt"] in jailbreak_texts]
    plain = [r for r in safety if r["prompt"] not in jailbreak_texts]
    return DayFigures(
        day=day,
        model_version=result.window.get("model_version"),
        answers=len(rows),
        jailbreaks=len(jail),
        safety_unsafe=_share(safety, "unsafe_comply"),
        jailbreak_unsafe=_share(jail, "unsafe_comply"),
        jailbreak_preferred=_share(jail, "explain_decline"),
        plain_safety_preferred=_share(plain, "explain_decline"),
        new_prompt_share=result.new_prompt_share,
        verdict=result.verdict,
        hard_cases=len(result.hard_cases),
        run_id=result.mlflow_run_id,
    )


def _champion_policy(cfg: Any, workdir: Path) -> tuple[str, Path]:
    """(version, local policy folder) of the model holding @champion."""
    from preftune.observe.baselines import champion_version
    from preftune.registry import resolve_model
    from preftune.storage import Storage

    client, version, _ = champion_version(cfg)
    if version is None:
        raise InputError(
            f"{cfg.models.registered_model} has no @{cfg.promotion.champion_alias}: run `preftune demo` first "
            "(--observe observes the champion it promotes)"
        )
    ref = f"models:/{cfg.models.registered_model}@{cfg.promotion.champion_alias}"
    path = resolve_model(ref, client, workdir / f"v{version}", Storage.from_config(cfg.storage)).path
    return str(version), Path(path)


def retrain_overrides(
    cfg: Any, settings: ObserveDemoSettings, champion: str, champion_data: str | None = None
) -> dict[str, Any]:
    """The retraining run's settings (ObserveDemoSettings) as run-config overrides; ``settings.retrain`` last.
    ``champion_data``: the champion's training dataset, kept when ``settings.keep_previous_data``."""
    gen = {**cfg.data.generation.model_dump(mode="json"), "n_candidates": settings.hard_case_candidates}
    out: dict[str, Any] = {
        "data": {"extra_generation": gen, "extra_prompts_repeat": settings.hard_case_repeat},
        "evaluation": {"gates": {"observed_min_gain": dict(settings.observed_min_gain)}},
    }
    if settings.keep_previous_data and champion_data:
        out["data"]["previous_datasets"] = [*cfg.data.previous_datasets, champion_data]
    if settings.rater_write_rate > 0:
        out["world"] = {"rater_write_rate": settings.rater_write_rate}
    if settings.demonstration_coef > 0:
        out["ppo"] = {"demonstration_coef": settings.demonstration_coef}
    if settings.retrain_from == "champion":  # 'auto' is decided before this (choose_start)
        out["models"] = {"policy": f"models:/{cfg.models.registered_model}/{champion}"}
        out.setdefault("ppo", {})["updates"] = settings.retrain_updates
    _merge(out, settings.retrain)
    return out


def choose_start(
    cfg: Any, settings: ObserveDemoSettings, hard: Path, champion_path: Path, console: Any
) -> tuple[str | None, dict[str, Any]]:
    """``retrain_from`` 'auto': 'champion' or 'policy' (the first whose coverage of the hard cases reaches
    ``min_hard_case_coverage``); when neither does, 'policy' if the raters' written answers will teach it
    (:func:`teaches`), else None (a capability gap); with each measured coverage. Other values pass."""
    if settings.retrain_from != "auto":
        return settings.retrain_from, {}
    from preftune.generation.candidates import resolve_policy
    from preftune.observe.coverage import hard_case_coverage
    from preftune.storage import Storage

    cases = [json.loads(line) for line in hard.read_text(encoding="utf-8").splitlines() if line.strip()]
    measured: dict[str, Any] = {}
    base = resolve_policy(cfg.models.policy, cfg, Storage.from_config(cfg.storage))
    for start in ("champion", "policy"):
        path = champion_path if start == "champion" else base
        cov = hard_case_coverage(cfg, str(path), cases, settings.hard_case_candidates, cfg.run.seed)
        measured[start] = cov.to_dict()
        console.print(
            f"  coverage of the hard cases, {start}: {cov.covered} of {cov.cases} with a preferred answer among "
            f"{cov.samples} samples ({cov.share:.2f}; preferred {cov.preferred_share:.3f} of the answers)"
        )
        if cov.share >= settings.min_hard_case_coverage:
            return start, measured
    if teaches(settings):  # PPO cannot find the answer, but the demonstration term is given it
        console.print(
            "  neither policy samples the preferred answer: the retraining starts from the base policy "
            "and learns the raters' written answers (ppo.demonstration_coef)"
        )
        return "policy", measured
    return None, measured


def teaches(settings: ObserveDemoSettings) -> bool:
    """Whether the retraining can learn an answer no policy samples: raters write it, the demonstration term trains
    on it."""
    return settings.rater_write_rate > 0 and settings.demonstration_coef > 0


def retrain_config(cfg: Any, hard_cases: Path, workdir: Path, overrides: dict[str, Any]) -> Any:
    """The retraining run: the same config plus the observed hard cases (``data.extra_prompts``: collect
    samples and judges the training split, the PPO rollouts train on it; ``evaluation.observed_cases``:
    evaluate judges the candidate against the champion on the held-out split), with ``overrides`` merged in."""
    from preftune.config import parse_config

    data = cfg.model_dump(mode="json")
    data["data"]["extra_prompts"] = [*data["data"].get("extra_prompts", []), str(hard_cases)]
    data["evaluation"]["observed_cases"] = [*data["evaluation"].get("observed_cases", []), str(hard_cases)]
    data["run"]["name"] = f"{cfg.run.name}-observed"
    _merge(data, overrides)
    return parse_config(data)


def capability_gap_message(settings: ObserveDemoSettings, coverage: dict[str, Any]) -> str:
    shown = ", ".join(f"{k} {v['covered']} of {v['cases']}" for k, v in coverage.items())
    return (
        f"capability gap: neither the champion nor the base policy answers the hard cases as preferred often "
        f"enough for PPO to reinforce it (hard cases with a preferred answer among {settings.hard_case_candidates} "
        f"samples: {shown}; {settings.min_hard_case_coverage:.2f} needed); teach the behaviour first (SFT on "
        "preferred answers to such prompts), then retrain"
    )


def _merge(into: dict[str, Any], overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def observe_config(cfg: Any, workdir: Path, settings: ObserveDemoSettings) -> Any:
    obs = cfg.observe.model_copy(
        update={
            "source": cfg.observe.source.model_copy(update={"kind": "logs", "path": str(workdir / "logs")}),
            "state": str(workdir / "state"),
            "max_records": max(cfg.observe.max_records, settings.per_day),
            "on_regression": "report",
        }
    )
    return cfg.model_copy(update={"observe": obs})


@dataclass
class LoopResult:
    days: list[DayFigures]
    flagged_day: int | None
    retrain: dict[str, Any]
    plot: Path | None
    run_id: str | None
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "days": [asdict(d) for d in self.days],
            "flagged_day": self.flagged_day,
            "retrain": self.retrain,
            "seconds": self.seconds,
        }


def run_week(
    cfg: Any, settings: ObserveDemoSettings, console: Any, workdir: Path, *, verbose: bool = False
) -> LoopResult:
    """The simulated week (see the module docstring); ``workdir`` keeps the logs, state and plot."""
    from preftune.observe import observe_window
    from preftune.world.jailbreak import jailbreak_prompts
    from preftune.world.sampling import sample_responses

    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    ocfg = observe_config(cfg, workdir, settings)
    jail_texts = {p.prompt for p in jailbreak_prompts()}
    version, policy = _champion_policy(cfg, workdir / "models")
    days: list[DayFigures] = []
    flagged: int | None = None
    rounds: list[dict[str, Any]] = []  # one entry per retraining run (or capability gap), in order
    pending: dict[str, dict[str, Any]] = {}  # hard cases observed since the serving champion began, by id
    rejected: list[dict[str, Any]] = []  # rejected rounds since then: their candidate and dataset
    seconds = {"generate": 0.0, "observe": 0.0, "retrain": 0.0}
    for day in range(1, settings.days + 1):
        prompts = production_prompts(day, settings, cfg.run.seed)
        t = time.perf_counter()
        answers = sample_responses(
            policy,
            prompts,
            1,
            max_new_tokens=cfg.data.generation.max_new_tokens,
            seed=cfg.run.seed * 1000 + day,
            progress=False,
        )
        seconds["generate"] += time.perf_counter() - t
        write_day_log(workdir / "logs" / f"day{day:02d}.jsonl", day, prompts, [a[0] for a in answers], version)
        t = time.perf_counter()
        out_dir = workdir / "windows" / f"day{day:02d}"
        res = observe_window(ocfg, output=str(out_dir), now_ms=int((START.timestamp() + day * 86_400) * 1000))
        seconds["observe"] += time.perf_counter() - t
        fig = day_figures(day, res, jail_texts)
        days.append(fig)
        console.print(
            f"  day {day} (v{version}): {fig.answers} answers, {fig.jailbreaks} jailbreaks; unsafe on jailbreaks "
            f"{fig.jailbreak_unsafe:.2f}; verdict {fig.verdict}"
            + (f" -> {fig.hard_cases} hard cases" if res.verdict in ("drift", "regression") else "")
        )
        if res.verdict not in ("drift", "regression"):
            continue
        for case in res.hard_cases:
            pending.setdefault(case["id"], case)
        gave_up = any(r.get("outcome") == "capability-gap" for r in rounds)
        if day == settings.days or len(rounds) >= settings.max_retrainings or gave_up:
            continue
        if not res.hard_cases:
            raise PreftuneError(f"day {day}: observe flagged {res.verdict} but wrote no hard case")
        flagged = day if flagged is None else flagged
        hard = write_hard_cases(workdir / "hard_cases" / f"round{len(rounds) + 1}.jsonl", pending.values())
        console.print(
            f"  {len(pending)} hard cases since v{version} began serving: can PPO fix them? Then to the raters (the "
            "simulated panel) and a retraining run on existing data + observed hard cases:"
        )
        info, new_version, t_retrain = _retrain_round(
            cfg, settings, hard, version, policy, workdir, console, verbose, rejected
        )
        info.update(day=day, round=len(rounds) + 1)
        rounds.append(info)
        seconds["retrain"] += t_retrain
        if info.get("outcome") == "rejected":
            rejected.append(info)
        if new_version is not None:
            version, policy = new_version
            pending, rejected = {}, []  # the new champion's own failures are the next round's evidence
    retrain_info = dict(rounds[-1]) if rounds else {}
    if rounds:
        retrain_info["rounds"] = rounds
    plot = plot_week(days, flagged, workdir / "observed_week.png", [r["day"] for r in rounds if r.get("version")])
    run_id = log_week(cfg, days, flagged, retrain_info, plot, seconds)
    return LoopResult(days, flagged, retrain_info, plot, run_id, seconds)


def write_hard_cases(path: Path, cases: Any) -> Path:
    """The hard cases of one retraining round as a prompt file (``data.extra_prompts``/``observed_cases``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in cases), encoding="utf-8")
    return path


def _retrain_round(
    cfg: Any,
    settings: ObserveDemoSettings,
    hard: Path,
    version: str,
    policy: Path,
    workdir: Path,
    console: Any,
    verbose: bool,
    rejected: list[dict[str, Any]],
) -> tuple[dict[str, Any], tuple[str, Path] | None, float]:
    """One retraining round on ``hard``: (its record, (new version, its policy folder) when it promoted, seconds).
    ``rejected``: the records of the rounds rejected since the champion began (their ``candidate`` policy and
    collected ``dataset``): the last one's dataset is kept instead of the champion's, and its candidate samples
    part of the hard cases' candidates (``rate_rejected_candidate``)."""
    from preftune.cli.pipeline_cmd import outcome_error, run_local_with_progress
    from preftune.observe.baselines import champion_training_data, champion_version
    from preftune.registry import RUN_TAG_EVAL_CANDIDATE

    start, coverage = choose_start(cfg, settings, hard, policy, console)
    if start is None:  # PPO cannot reinforce what no start policy samples: say so, spend nothing
        info = {"hard_cases": str(hard), "outcome": "capability-gap", "coverage": coverage}
        info.update(error=capability_gap_message(settings, coverage), error_code=int(ExitCode.NOT_FIT))
        console.print(f"  [yellow]no retraining: {info['error']}; v{version} stays[/]")
        return info, None, 0.0
    client, _, _ = champion_version(cfg)
    last = rejected[-1] if rejected else {}
    kept = None
    if settings.keep_previous_data:  # the last rejected round's data holds the champion's and all judged since
        kept = last.get("dataset") or champion_training_data(client, cfg, version)
        if kept is None:
            console.print(f"  [yellow]v{version}'s training data is not in the tracking store: collect afresh[/]")
        elif last.get("dataset"):
            console.print(
                f"  keeping round {last.get('round')}'s dataset (v{version}'s data and every judgement since)"
            )
    chosen = settings.model_copy(update={"retrain_from": start})
    overrides = retrain_overrides(cfg, chosen, version, kept)
    if settings.rate_rejected_candidate and last.get("candidate"):  # what PPO found goes to the raters too
        overrides["data"]["extra_policies"] = [last["candidate"]]
        console.print(f"  part of each hard case's candidates from round {last.get('round')}'s rejected candidate")
    rcfg = retrain_config(cfg, hard, workdir, overrides)
    t = time.perf_counter()
    run = run_local_with_progress(rcfg, console, verbose=verbose)
    took = time.perf_counter() - t
    err = outcome_error(run)
    outcome = run.outcome or {}
    info = {
        "hard_cases": str(hard),
        "start": start,
        "coverage": coverage,
        "outcome": outcome.get("outcome"),
        "exit_code": outcome.get("exit_code"),
        "pipeline_run_id": run.pipeline_run_id,
        "parent_run_id": outcome.get("parent_run_id"),
    }
    if err is not None:  # the week goes on with the old champion; the table shows it, the exit code says it
        info.update(error=err.message, error_code=err.exit_code)
        info["candidate"] = _step_tag(client, run.pipeline_run_id, "evaluate", RUN_TAG_EVAL_CANDIDATE)
        info["dataset"] = _step_tag(client, run.pipeline_run_id, "collect", "preftune.dataset_uri")
        console.print(f"  [yellow]the retraining run promoted nothing ({err.message}); v{version} stays[/]")
        return info, None, took
    new_version, new_policy = _champion_policy(cfg, workdir / "models")
    info["version"] = new_version
    console.print(f"  retrained: version {new_version} is the champion now (was {version})")
    return info, (new_version, new_policy), took


def plot_week(days: list[DayFigures], flagged: int | None, path: Path, promoted: list[int] | None = None) -> Path:
    """Shares day by day (matplotlib PNG): each promoted retraining drawn after the day that started it (by
    default, the flagged day's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [d.day for d in days]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    ax.plot(x, [d.jailbreak_unsafe for d in days], "o-", color="tab:red", label="unsafe_comply on jailbreaks")
    ax.plot(x, [d.jailbreak_preferred for d in days], "o-", color="tab:green", label="explain_decline on jailbreaks")
    ax.plot(x, [d.safety_unsafe for d in days], "s--", color="tab:orange", label="unsafe_comply, safety family")
    ax.plot(x, [d.plain_safety_preferred for d in days], "s--", color="tab:blue", label="explain_decline, plain safety")
    for i, day in enumerate(promoted if promoted is not None else ([flagged] if flagged is not None else [])):
        ax.axvline(day + 0.5, color="grey", linestyle=":", label="retrained, new champion" if i == 0 else None)
    for d in days:
        if d.verdict != "ok":
            ax.annotate(d.verdict, (d.day, 1.02), ha="center", fontsize=8, color="tab:red")
    ax.set_xlabel("day")
    ax.set_ylabel("share of answers")
    ax.set_ylim(0, 1.08)
    ax.set_xticks(x)
    ax.set_title("Observed behaviour of the champion, day by day")
    ax.legend(fontsize=7, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_week(cfg: Any, days: list[DayFigures], flagged: int | None, retrain: dict, plot: Path, seconds: dict) -> str:
    """A ``demo-observe`` MLflow run: each day's figures as metrics (step = day), the table and the plot."""
    import mlflow

    from preftune import tracking

    tags = {"preftune.observe.flagged_day": str(flagged), "preftune.observe.retrain": str(retrain.get("outcome"))}
    with tracking.start_step_run("demo-observe", cfg, log_config=False, tags=tags) as run:
        for d in days:
            mlflow.log_metrics(
                {
                    "observe_demo.jailbreak_unsafe": d.jailbreak_unsafe,
                    "observe_demo.jailbreak_preferred": d.jailbreak_preferred,
                    "observe_demo.safety_unsafe": d.safety_unsafe,
                    "observe_demo.plain_safety_preferred": d.plain_safety_preferred,
                },
                step=d.day,
            )
        mlflow.log_metrics({f"observe_demo.seconds.{k}": v for k, v in seconds.items()})
        mlflow.log_dict(
            {"days": [asdict(d) for d in days], "flagged_day": flagged, "retrain": retrain}, "observe_demo/week.json"
        )
        mlflow.log_artifact(str(plot), "observe_demo")
        return run.info.run_id


def week_table(result: LoopResult) -> Any:
    from rich.table import Table

    table = Table(title="A week of production: the champion's observed behaviour")
    for col, just in (
        ("day", "right"),
        ("version", "left"),
        ("answers", "right"),
        ("jailbreaks", "right"),
        ("unsafe on jailbreaks", "right"),
        ("decline on jailbreaks", "right"),
        ("unsafe, safety family", "right"),
        ("verdict", "left"),
        ("hard cases", "right"),
    ):
        table.add_column(col, justify=just)
    for d in result.days:
        colour = {"ok": "green", "drift": "yellow", "regression": "red"}.get(d.verdict, "white")
        table.add_row(
            str(d.day),
            f"v{d.model_version}",
            str(d.answers),
            str(d.jailbreaks),
            f"{d.jailbreak_unsafe:.2f}",
            f"{d.jailbreak_preferred:.2f}",
            f"{d.safety_unsafe:.2f}",
            f"[{colour}]{d.verdict}[/]",
            str(d.hard_cases) if d.verdict != "ok" else "",
        )
    return table


def run_observe_demo(
    cfg: Any, settings: ObserveDemoSettings, console: Any, *, workdir: Path | None = None, verbose: bool = False
) -> LoopResult:
    """The week, then the table; the files stay in ``workdir`` (default: a folder under the preftune home).
    Raises the last round's error when no round promoted (a later round rejected after a promotion is printed:
    the retrained champion took over)."""
    from preftune.home import preftune_home

    if settings.shift_day > settings.days - 1:
        raise PreftuneError(f"shift_day {settings.shift_day} leaves no day after it in {settings.days} days")
    if workdir is None:
        base = preftune_home() / "demo-observe"
        base.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=base))
    console.rule("[bold]preftune demo --observe: a week of production traffic for the champion")
    result = run_week(cfg, settings, console, workdir, verbose=verbose)
    console.print(week_table(result))
    console.print(f"Plot: {result.plot} (also on the MLflow run {result.run_id}, observe_demo/observed_week.png)")
    promoted = [r for r in result.retrain.get("rounds", []) if r.get("version")]
    if result.retrain.get("error") and promoted:  # the loop closed; a later round found nothing better
        console.print(
            f"[yellow]round {result.retrain.get('round')} promoted nothing ({result.retrain['error']}); "
            f"v{promoted[-1]['version']}, promoted by round {promoted[-1].get('round')}, keeps serving[/]"
        )
    elif result.retrain.get("error"):
        what = (
            "no retraining on the observed hard cases"
            if result.retrain.get("outcome") == "capability-gap"
            else "the retraining run on the observed hard cases promoted nothing"
        )
        raise PreftuneError(f"{what}: {result.retrain['error']}", result.retrain.get("error_code"))
    return result


def _step_tag(client: Any, pipeline_run_id: str, step: str, tag: str) -> str | None:
    """A tag of a pipeline run's step run (e.g. the candidate evaluate judged, the dataset collect published)."""
    from preftune.tracking import TAG_PIPELINE_RUN_ID

    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        exps, f"tags.`preftune.step` = '{step}' and tags.`{TAG_PIPELINE_RUN_ID}` = '{pipeline_run_id}'"
    )
    return runs[0].data.tags.get(tag) if runs else None
