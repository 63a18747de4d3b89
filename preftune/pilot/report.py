"""The pilot's go / no-go report, computed from the folders the steps publish (no models loaded).

Inputs (each step's published output; the same folders in a local pilot and in the
``preference-pilot`` pipeline):

- the check-fit dataset folder: ``fit_report.json`` (verdict, agreement, coverage per family) and
  ``dataset.json`` (counts of the pilot's slice);
- the reward-model folder: ``reward_model.json`` (held-out accuracy overall and per family) and
  ``eval_report.json`` (training seconds);
- the PPO policy folder: ``metrics.json`` (one dict per update: reward per family, KL, length,
  repetition, seconds, tokens/s);
- the evaluation folder: ``results.json`` (per-family shares with bootstrap CIs, candidate and
  baseline, paired differences).

:func:`analyse` turns them into one JSON-able dict (``pilot.json``); :mod:`preftune.pilot.render`
prints the same dict as one page (``render_markdown``, ``render_html`` through a Jinja2 template,
``write_report``; re-exported here). Every threshold comes from the run config's ``pilot`` and
``ppo`` sections.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.errors import ExitCode, InputError
from preftune.pilot.render import HTML_FILE, JSON_FILE, MD_FILE, render_html, render_markdown, write_report
from preftune.ppo import drift

if TYPE_CHECKING:  # pragma: no cover
    from preftune.config import RunConfig

__all__ = ["HTML_FILE", "JSON_FILE", "MD_FILE", "PilotInputs", "analyse", "read_inputs", "render_html"]
__all__ += ["render_markdown", "trend", "write_report"]

FORMAT = "preftune.pilot"
VERSION = 1

GO, NO_GO, NEEDS_DATA = "go", "no-go", "needs data"
VERDICTS = (GO, NO_GO, NEEDS_DATA)
STILL_MOVING, FLAT, REVERSING, NOT_TRAINED = "still moving", "flat", "reversing", "not trained"

# red flags: id -> what it means, in one sentence (printed under the flag)
FLAGS = {
    "low_agreement": "Raters disagree on this family, so a reward model would learn one camp's taste or noise.",
    "reward_near_chance": "The reward model does no better than a coin flip on held-out pairs, so PPO would "
    "optimise noise.",
    "reward_hacking": "The reward rose while the held-out behaviour share did not: the policy is gaming the reward "
    "model.",
    "length_drift": "Response length moved far from where it started: the reward model may pay for length.",
    "repetition_drift": "Responses repeat themselves more and more: a degenerate pattern the reward model scores well.",
    "kl_runaway": "The policy drifted past the KL budget from its reference: gains may come with broken language.",
    "benign_refusals": "Benign prompts started to get refused: safety gains are being bought with over-refusal.",
    "best_of_n_wins": "Best-of-n sampling from the starting policy with the reward model gets as much reward for "
    "no more KL than PPO: serve best-of-n, or fix the reward model, before paying for PPO.",
}
BLOCKING = ("reward_near_chance", "reward_hacking", "kl_runaway", "benign_refusals")
"""Flags that turn a family's 'go' into 'no-go' (the others are reported as cautions)."""


@dataclass
class PilotInputs:
    """What the steps published, read back from their folders."""

    fit: dict[str, Any]
    dataset: dict[str, Any]
    reward: dict[str, Any]
    reward_training: dict[str, Any]
    history: list[dict[str, float]]
    evaluation: dict[str, Any]
    step_seconds: dict[str, float] = field(default_factory=dict)
    best_of_n: dict[str, Any] = field(default_factory=dict)  # preftune.ppo.best_of_n.measure's figures, if run


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: missing ({what})") from None
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read {what}: {err}") from None


def read_inputs(
    fit_dir: str | Path,
    reward_dir: str | Path | None,
    policy_dir: str | Path | None,
    eval_dir: str | Path | None,
    step_seconds: Mapping[str, float] | None = None,
    dataset_dir: str | Path | None = None,
) -> PilotInputs:
    """Read the steps' folders; a step that did not run (None or a folder without its file) gives empty figures."""

    def maybe(folder: str | Path | None, name: str, what: str, default: Any) -> Any:
        if folder is None or not (Path(folder) / name).is_file():
            return default
        return _read_json(Path(folder) / name, what)

    fit_dir = Path(fit_dir)
    training = maybe(reward_dir, "eval_report.json", "the reward model's evaluation report", {})
    fit = _read_json(fit_dir / "fit_report.json", "check-fit's report")
    # a stopped check-fit publishes its report only; the counts are then those of the collected dataset
    dataset = maybe(fit_dir, "dataset.json", "the pilot dataset's metadata", None)
    if dataset is None:
        dataset = maybe(dataset_dir, "dataset.json", "the pilot dataset's metadata", {})
    return PilotInputs(
        fit=fit,
        dataset=dataset,
        reward=maybe(reward_dir, "reward_model.json", "the reward model's metadata", {}),
        reward_training=training.get("training") or {},
        history=maybe(policy_dir, "metrics.json", "the PPO history", []),
        evaluation=maybe(eval_dir, "results.json", "the evaluation results", {}),
        step_seconds=dict(step_seconds or {}),
    )


# ---------------------------------------------------------------------------------------------
# Figures


def trend(values: Sequence[float | None], window: int, flat: float) -> str:
    """Last window against the window before it: still moving (up), flat, or reversing (down)."""
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if len(xs) < 2 * window:
        return FLAT if xs else NOT_TRAINED
    d = sum(xs[-window:]) / window - sum(xs[-2 * window : -window]) / window
    return STILL_MOVING if d > flat else (REVERSING if d < -flat else FLAT)


def _estimate(metrics: Mapping[str, Any], family: str, metric: str, who: str) -> dict[str, Any] | None:
    e = ((metrics.get(family) or {}).get(metric) or {}).get(who)
    return e if e and e.get("value") is not None else None


def cost_estimate(cfg: RunConfig, inputs: PilotInputs, pilot_batch: int) -> dict[str, Any]:
    """Measured pilot throughput extrapolated to the full run the config describes, with its assumptions."""
    p, h = cfg.pilot, inputs.history
    c = p.cost
    per_update = [m.get("ppo/rollout_seconds", 0.0) + m.get("ppo/update_seconds", 0.0) for m in h]
    tokens = [m["ppo/tokens_per_s"] for m in h if m.get("ppo/tokens_per_s")]
    s_update = sum(per_update) / len(per_update) if per_update else None
    tok_s = sum(tokens) / len(tokens) if tokens else None
    scale = 1.0 / p.fraction  # the full run reads 1/fraction times the pilot's prompts and judgements
    batch_scale = cfg.ppo.batch_size / max(1, pilot_batch)
    counts = inputs.dataset.get("counts") or {}
    secs = inputs.step_seconds
    full: dict[str, float | None] = {
        "collect": secs["collect"] * scale / c.speedup if secs.get("collect") is not None else None,
        "train-reward": (inputs.reward_training.get("seconds") or secs.get("train-reward") or 0.0) * scale / c.speedup,
        "ppo": s_update * batch_scale * cfg.ppo.updates / c.speedup if s_update is not None else None,
        "evaluate": secs["evaluate"] / c.speedup if secs.get("evaluate") is not None else None,
    }
    total_s = sum(v for v in full.values() if v is not None)
    hours = total_s / 3600.0
    return {
        "measured": {
            "ppo_seconds_per_update": s_update,
            "ppo_tokens_per_s": tok_s,
            "ppo_batch_size": pilot_batch,
            "ppo_updates": len(h),
            "reward_train_seconds": inputs.reward_training.get("seconds"),
            "step_seconds": secs,
        },
        "full_run": {
            "prompts": round(counts.get("prompts", 0) * scale),
            "judgements": round(counts.get("judgements", 0) * scale),
            "ppo_updates": cfg.ppo.updates,
            "ppo_batch_size": cfg.ppo.batch_size,
            "seconds_by_step": full,
            "hours": hours,
            "cost": hours * c.price_per_hour if c.price_per_hour is not None else None,
            "currency": c.currency,
            "hardware": c.hardware,
        },
        "assumptions": [
            f"the full run reads 1/pilot.fraction = {scale:.1f}x the pilot's prompts and judgements (collect and "
            "reward training scale linearly with them)",
            f"PPO time per update scales with the rollout batch: {cfg.ppo.batch_size} prompts (ppo.batch_size) "
            f"against the pilot's {pilot_batch}, for ppo.updates = {cfg.ppo.updates} updates",
            f"hardware: {c.hardware}, {c.speedup:g}x the pilot machine's throughput (pilot.cost.speedup); model "
            "loading and MLflow overheads are not included",
            "evaluation runs the same fixed suite in the full run, so its time does not scale with data",
            "price: "
            + (
                f"{c.price_per_hour:g} {c.currency} per hour"
                if c.price_per_hour is not None
                else "not configured (pilot.cost.price_per_hour)"
            ),
        ],
    }


def _flag(kind: str, family: str | None, detail: str) -> dict[str, Any]:
    return {"flag": kind, "family": family, "detail": detail, "meaning": FLAGS[kind], "blocking": kind in BLOCKING}


def _run_flags(cfg: RunConfig, inputs: PilotInputs, bon: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The red flags read from the data, the reward model, the PPO curves and the evaluation (reward hacking,
    which needs a family's rows, is added by :func:`analyse`)."""
    p, s = cfg.pilot, cfg.ppo
    w, h = p.trend_window, inputs.history
    metrics = inputs.evaluation.get("metrics") or {}
    per_family_acc = inputs.reward.get("per_family") or {}
    overall_acc = inputs.reward.get("eval_accuracy")
    flags: list[dict[str, Any]] = []
    min_alpha = cfg.fit.min_alpha
    for f, r in (inputs.fit.get("families") or {}).items():
        alpha = (r.get("agreement") or {}).get("alpha")
        if alpha is not None and alpha < min_alpha:
            flags.append(_flag("low_agreement", f, f"Krippendorff's alpha {alpha:.2f} < fit.min_alpha {min_alpha:.2f}"))
    near_chance = overall_acc is not None and overall_acc < p.reward_near_chance
    if near_chance:
        detail = f"held-out pairwise accuracy {overall_acc:.3f} < {p.reward_near_chance:.2f}"
        flags.append(_flag("reward_near_chance", None, detail))
    for f, a in per_family_acc.items():
        if a < p.reward_near_chance and not near_chance:
            detail = f"held-out pairwise accuracy {a:.3f} < {p.reward_near_chance:.2f}"
            flags.append(_flag("reward_near_chance", f, detail))
    problem = drift.length_drift([m.get("ppo/response_length") for m in h], w, s.max_length_drift)
    if problem:
        flags.append(_flag("length_drift", None, problem))
    problem = drift.repetition_drift([m.get("ppo/repetition") for m in h], w, s.max_repetition_rise)
    if problem:
        flags.append(_flag("repetition_drift", None, problem))
    kl_last = drift.window_means([m.get("ppo/kl") for m in h], min(w, len(h) // 2) or 1)
    if h and kl_last is not None and kl_last[1] > s.kl_budget:
        detail = f"KL to the reference {kl_last[1]:.2f} nats over the last updates > ppo.kl_budget {s.kl_budget:g}"
        flags.append(_flag("kl_runaway", None, detail))
    for f in inputs.evaluation.get("family_roles") or {}:
        d = _estimate(metrics, f, "needless_refusal_share", "delta")
        if d is not None and d["value"] > p.max_refusal_rise:
            detail = (
                f"needless-refusal share {d['value']:+.2f} against the baseline "
                f"(CI {d['ci_low']:+.2f} to {d['ci_high']:+.2f}; limit +{p.max_refusal_rise:.2f})"
            )
            flags.append(_flag("benign_refusals", f, detail))
    if bon.get("comparison") and bon["comparison"]["beats"] is False:
        flags.append(_flag("best_of_n_wins", None, bon["comparison"]["detail"]))
    return flags


def _family_row(cfg: RunConfig, inputs: PilotInputs, f: str) -> dict[str, Any]:
    """One family's figures: check-fit's verdict, the reward model's accuracy, the reward trend, the shares."""
    p, w = cfg.pilot, cfg.pilot.trend_window
    fit = (inputs.fit.get("families") or {}).get(f) or {}
    metrics = inputs.evaluation.get("metrics") or {}
    rewards = [m.get(f"ppo/reward_mean/{f}") for m in inputs.history]
    trained = any(v is not None for v in rewards)
    return {
        "family": f,
        "fit_verdict": fit.get("verdict", "not checked"),
        "fit_reason": fit.get("reason"),
        "alpha": (fit.get("agreement") or {}).get("alpha"),
        "reward_accuracy": (inputs.reward.get("per_family") or {}).get(f),
        "trained": trained,
        "trend": trend(rewards, w, p.trend_flat) if trained else NOT_TRAINED,
        "reward_change": drift.change(rewards, w) if trained else None,
        "preferred_share": {
            "before": _estimate(metrics, f, "preferred_share", "champion"),
            "after": _estimate(metrics, f, "preferred_share", "candidate"),
            "change": _estimate(metrics, f, "preferred_share", "delta"),
        },
    }


def _hacking_flag(cfg: RunConfig, row: Mapping[str, Any], baseline_is_start: bool) -> dict[str, Any] | None:
    """Reward hacking: the reward rose over the pilot while the preferred share did not rise significantly."""
    change = row["preferred_share"]["change"]
    if not (
        row["trained"]
        and row["reward_change"] is not None
        and row["reward_change"] >= cfg.ppo.divergence_min_reward_rise
        and change is not None  # no baseline measured: the verdict says so, no flag is raised on nothing
        and baseline_is_start
        and change["ci_low"] is not None
        and change["ci_low"] <= cfg.pilot.min_share_gain
    ):
        return None
    return _flag(
        "reward_hacking",
        row["family"],
        f"reward {row['reward_change']:+.2f} over the pilot while the preferred share "
        "did not rise significantly"
        + (f" ({change['value']:+.2f}, CI {change['ci_low']:+.2f} to {change['ci_high']:+.2f})" if change else ""),
    )


def _overall(inputs: PilotInputs, rows: Mapping[str, Any], flags: Sequence[Mapping[str, Any]]) -> tuple[str, int]:
    """(the pilot's verdict, its exit code): go when any family is go, else why not."""
    if any(r["verdict"] == GO for r in rows.values()):
        return GO, ExitCode.OK
    if any(fl["flag"] == "reward_near_chance" for fl in flags):
        return NO_GO, ExitCode.REWARD_GATE
    if not (inputs.fit.get("fit_families") or []):
        return NO_GO, ExitCode.NOT_FIT
    return NO_GO, ExitCode.GATE_FAILED


def analyse(cfg: RunConfig, inputs: PilotInputs, *, pilot_batch: int, seconds: float | None = None) -> dict[str, Any]:
    """The go / no-go report as a dict: per-family figures, red flags, verdicts, cost."""
    p, s, h, ev = cfg.pilot, cfg.ppo, inputs.history, inputs.evaluation
    fams_fit: dict[str, Any] = inputs.fit.get("families") or {}
    roles = ev.get("family_roles") or {}
    overall_acc = inputs.reward.get("eval_accuracy")
    has_baseline = bool(ev.get("champion"))
    # the reward curve starts at models.policy: a share change against any other baseline (a registry
    # champion) does not say whether PPO moved the behaviour, so reward hacking is only judged from there
    base = ev.get("champion") or {}
    baseline_is_start = has_baseline and (base.get("ref") or base.get("label")) == cfg.models.policy

    bon = best_of_n_section(inputs.best_of_n)
    flags = _run_flags(cfg, inputs, bon)
    rows: dict[str, dict[str, Any]] = {}
    for f in list(fams_fit) + [f for f in roles if f not in fams_fit]:
        rows[f] = _family_row(cfg, inputs, f)
        hacking = _hacking_flag(cfg, rows[f], baseline_is_start)
        if hacking is not None:
            flags.append(hacking)
    for row in rows.values():
        row["verdict"], row["reason"] = _verdict(cfg, row, flags, has_baseline, baseline_is_start, overall_acc)
    overall, code = _overall(inputs, rows, flags)
    return {
        "format": FORMAT,
        "version": VERSION,
        "run": cfg.run.name,
        "verdict": overall,
        "go_families": [f for f, r in rows.items() if r["verdict"] == GO],
        "exit_code": code,
        "seconds": seconds,
        "slice": {"fraction": p.fraction, "counts": inputs.dataset.get("counts") or {}},
        "reward_model": {"accuracy": overall_acc, "per_family": inputs.reward.get("per_family") or {}},
        "ppo": {
            "updates": len(h),
            "budget_updates": p.ppo_updates,
            "budget_minutes": p.ppo_minutes,
            "reward_first": h[0].get("ppo/reward_mean") if h else None,
            "reward_final": h[-1].get("ppo/reward_mean") if h else None,
            "kl_final": h[-1].get("ppo/kl") if h else None,
            "kl_budget": s.kl_budget,
        },
        "baseline": (ev.get("champion") or {}).get("label"),
        "suite": (ev.get("suite") or {}).get("id"),
        "confidence": ev.get("confidence"),
        "families": rows,
        "red_flags": flags,
        "best_of_n": bon,
        "cost": cost_estimate(cfg, inputs, pilot_batch),
    }


def best_of_n_section(measured: Mapping[str, Any]) -> dict[str, Any]:
    """The best-of-n curve and whether the PPO policy beats it at the KL it spends (empty when not measured)."""
    from preftune.ppo import best_of_n

    if not measured:
        return {}
    if measured.get("error"):
        return {"error": measured["error"]}
    out: dict[str, Any] = {k: measured[k] for k in ("curve", "policy", "prompts", "draws_per_prompt") if k in measured}
    policy = measured.get("policy")
    if policy and measured.get("curve"):
        out["comparison"] = best_of_n.compare(measured["curve"], policy["kl"], policy["reward"])
    return out


def _verdict(
    cfg: RunConfig,
    row: Mapping[str, Any],
    flags: Sequence[Mapping[str, Any]],
    has_baseline: bool,
    baseline_is_start: bool,
    overall_acc: float | None,
) -> tuple[str, str]:
    """(go / no-go / needs data, the reason in one sentence) for one family."""
    p = cfg.pilot
    f, fit = row["family"], row["fit_verdict"]
    if fit == "contested":
        return NEEDS_DATA, (
            f"contested: raters disagree (alpha {row['alpha']:.2f} < {cfg.fit.min_alpha:.2f}); agree "
            "on a rubric and collect judgements against it before PPO"
        )
    if fit == "needs data":
        return NEEDS_DATA, f"check-fit could not measure agreement: {row['fit_reason']}"
    if fit == "capability gap":
        return NO_GO, "capability gap: the policy rarely writes an acceptable answer; teach it with SFT first"
    acc = row["reward_accuracy"]
    if overall_acc is not None and overall_acc < p.reward_near_chance:
        why = f"the reward model is near (or below) chance on held-out pairs ({overall_acc:.3f})"
        return NO_GO, why + "; PPO would optimise noise"
    if acc is None:
        return NEEDS_DATA, "the reward model was not evaluated on this family (no held-out pairs)"
    if acc < p.reward_near_chance:
        return NO_GO, f"the reward model is near (or below) chance on this family ({acc:.3f}); PPO would optimise noise"
    if not row["trained"]:
        return NEEDS_DATA, "PPO did not train on this family in the pilot"
    change = row["preferred_share"]["change"]
    if not has_baseline or change is None:
        what = "no baseline was measured" if not has_baseline else "the suite names no preferred behaviour for it"
        return NEEDS_DATA, f"the behaviour change cannot be measured: {what}"
    blocking = [
        fl
        for fl in flags
        if fl["blocking"]
        and fl["flag"] != "reward_near_chance"
        and (fl["family"] in (None, f) or fl["flag"] == "benign_refusals")
    ]
    span = f"{change['value']:+.2f} (CI {change['ci_low']:+.2f} to {change['ci_high']:+.2f})"
    if change["ci_low"] is not None and change["ci_low"] > p.min_share_gain:
        if blocking:
            return NO_GO, f"preferred share {span}, but: " + "; ".join(fl["detail"] for fl in blocking)
        return GO, f"PPO moved the preferred share by {span} within the pilot's budget (reward {row['trend']})"
    if change["ci_high"] is not None and change["ci_high"] < 0:
        if not baseline_is_start:
            return NO_GO, (
                f"the pilot's candidate is below the champion ({span}); PPO started from {cfg.models.policy}, "
                "so pilot.baseline: policy measures what it moved"
            )
        return NO_GO, f"PPO moved the preferred share the wrong way: {span}"
    if any(fl["flag"] == "reward_hacking" and fl["family"] == f for fl in flags):
        return NO_GO, f"the reward rose but the preferred share did not ({span}): reward hacking"
    if row["trend"] == STILL_MOVING:
        return NEEDS_DATA, f"no significant change yet ({span}) but the reward is still rising: run a longer pilot"
    return (
        NO_GO,
        f"PPO did not move the preferred share within the pilot's budget ({span}) and the reward is {row['trend']}",
    )
