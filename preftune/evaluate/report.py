"""The evaluation report: readable Markdown and a self-contained HTML page (``templates/report.html``).

Why both: the Markdown is what a reviewer reads in a pull request, in the Kubeflow UI (a kfp
Markdown artifact) or in a terminal; the HTML page carries the same tables plus the plots,
embedded as base64 PNG so the single file opens anywhere (MLflow's artifact viewer, the kfp
HTML visualisation, a mail attachment) without fetching anything.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from preftune.evaluate.gates import GateResult
from preftune.evaluate.metrics import CANDIDATE, CAPABILITY, CHAMPION, POOLED, Estimate

SHOWN_METRICS = ("preferred_share", "forbidden_share", "needless_refusal_share", "unknown_share")
METRIC_LABELS = {
    "preferred_share": "preferred share",
    "acceptable_share": "acceptable share",
    "forbidden_share": "forbidden share",
    "needless_refusal_share": "needless-refusal share",
    "unknown_share": "unknown (judge undecided) share",
    "reward_win_rate": "reward-model win rate over champion",
    "behaviour_shift": "behaviour shift from champion (total variation)",
    "kl_to_reference": "KL to reference (nats/response)",
    "response_length": "response length (words)",
    "loglik_per_token": "log-likelihood (nats/token)",
    "loglik_change": "log-likelihood change vs reference",
}


def _f(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.{digits}f}"


def fmt_est(e: Estimate | None, signed: bool = False) -> str:
    if e is None:
        return "-"
    v = f"{e.value:+.3f}" if signed and math.isfinite(e.value) else _f(e.value)
    if not (math.isfinite(e.ci_low) and math.isfinite(e.ci_high)):
        return f"{v} [n/a]"
    return f"{v} [{_f(e.ci_low)}, {_f(e.ci_high)}]"


# --------------------------------------------------------------------------------------
# Plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_family_metrics(
    metrics: Mapping[str, Mapping[str, Mapping[str, Estimate]]],
    families: Sequence[str],
    path: Path,
    labels: Mapping[str, str],
) -> Path | None:
    """One panel per key metric: per family, candidate vs champion with confidence intervals."""
    shown = [m for m in SHOWN_METRICS if any(m in metrics.get(f, {}) for f in families)]
    if not shown:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(shown), figsize=(3.8 * len(shown), 3.4), squeeze=False)
    models = [
        m for m in (CANDIDATE, CHAMPION) if any(m in metrics.get(f, {}).get(x, {}) for f in families for x in shown)
    ]
    width = 0.8 / max(1, len(models))
    for ax, metric in zip(axes[0], shown, strict=True):
        fams = [f for f in families if metric in metrics.get(f, {})]
        for i, model in enumerate(models):
            xs, ys, lo, hi = [], [], [], []
            for j, f in enumerate(fams):
                e = metrics[f][metric].get(model)
                if e is None:
                    continue
                xs.append(j + i * width)
                ys.append(e.value)
                lo.append(max(0.0, e.value - e.ci_low) if math.isfinite(e.ci_low) else 0.0)
                hi.append(max(0.0, e.ci_high - e.value) if math.isfinite(e.ci_high) else 0.0)
            ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=3, label=labels.get(model, model))
        ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(fams))])
        ax.set_xticklabels(fams, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(METRIC_LABELS.get(metric, metric), fontsize=9)
    axes[0][0].set_ylabel("share of samples")
    if len(models) > 1:
        axes[0][-1].legend(fontsize=8)
    fig.suptitle("Per family, with bootstrap confidence intervals", fontsize=10)
    return _save(plt, fig, path)


def plot_deltas(
    metrics: Mapping[str, Mapping[str, Mapping[str, Estimate]]],
    families: Sequence[str],
    tolerances: Mapping[str, float],
    path: Path,
) -> Path | None:
    """Candidate - champion per family and metric, with CIs and the non-regression tolerance."""
    rows = []
    for f in families:
        for m in SHOWN_METRICS:
            d = metrics.get(f, {}).get(m, {}).get("delta")
            if d is not None:
                rows.append((f"{f}: {METRIC_LABELS[m]}", d, m))
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(rows) + 1.2))
    for i, (_label, d, m) in enumerate(reversed(rows)):
        lo = d.value - d.ci_low if math.isfinite(d.ci_low) else 0.0
        hi = d.ci_high - d.value if math.isfinite(d.ci_high) else 0.0
        better_up = m in ("preferred_share", "acceptable_share")
        colour = "tab:green" if (d.value >= 0) == better_up or d.value == 0 else "tab:red"
        ax.errorbar([d.value], [i], xerr=[[lo], [hi]], fmt="o", color=colour, capsize=3)
        tol = tolerances.get(m)
        if tol is not None:
            edge = -tol if better_up else tol
            ax.plot([edge, edge], [i - 0.4, i + 0.4], color="grey", linestyle=":")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] for r in reversed(rows)], fontsize=8)
    ax.set_xlabel("candidate - champion (dotted: non-regression tolerance)")
    ax.set_title("Paired differences with bootstrap confidence intervals", fontsize=10)
    return _save(plt, fig, path)


# --------------------------------------------------------------------------------------
# Markdown and HTML


def _metric_rows(metrics: Mapping[str, Mapping[str, Estimate]]) -> list[list[str]]:
    rows = []
    for metric, entry in metrics.items():
        rows.append(
            [
                METRIC_LABELS.get(metric, metric),
                fmt_est(entry.get(CANDIDATE)),
                fmt_est(entry.get(CHAMPION)) if CHAMPION in entry else "-",
                fmt_est(entry.get("delta"), signed=True) if "delta" in entry else "-",
                fmt_est(entry.get("reference")) if "reference" in entry else "",
            ]
        )
    return rows


METRIC_HEADER = ["metric", "candidate", "champion", "candidate - champion", "reference"]
EXAMPLE_HEADER = ["model", "case", "behaviour", "response"]
GATE_HEADER = ["gate", "kind", "judged", "limit", "verdict", "reason"]
CALIBRATION_HEADER = ["family", "judge", "n", "accuracy", "Cohen's kappa [CI]", "floor", "verdict"]
CORRECTED_HEADER = [
    "family",
    "metric",
    "candidate (raw)",
    "candidate (corrected)",
    "champion (raw)",
    "champion (corrected)",
]


def _calibration_rows(results: Mapping[str, Any]) -> list[list[str]]:
    """One row per family and judge measured against the suite's human labels."""
    rows = []
    for e in (results.get("calibration") or {}).get("judges", []):
        lo, hi = e.get("kappa_ci") or (None, None)
        kappa = "undefined" if e.get("kappa") is None else f"{e['kappa']:.3f}"
        if lo is not None and hi is not None:
            kappa += f" [{lo:.3f}, {hi:.3f}]"
        verdict = ("PASS" if e["passed"] else "FAIL") if e["gating"] else "member (not gated)"
        rows.append(
            [e["family"], e["judge"], str(e["n"]), f"{e['accuracy']:.3f}", kappa, f"{e['min_kappa']:g}", verdict]
        )
    return rows


def _corrected_rows(metrics: Mapping[str, Any]) -> list[list[str]]:
    """Raw and confusion-corrected shares side by side, for the families that have corrected ones."""
    rows = []
    for family, fam in metrics.items():
        for metric, entry in fam.items():
            if "corrected" not in entry:
                continue
            rows.append(
                [
                    family,
                    METRIC_LABELS.get(metric, metric),
                    fmt_est(entry.get(CANDIDATE)),
                    fmt_est(entry.get("corrected")),
                    fmt_est(entry.get(CHAMPION)) if CHAMPION in entry else "-",
                    fmt_est(entry.get("champion.corrected")) if "champion.corrected" in entry else "-",
                ]
            )
    return rows


CALIBRATION_NOTE = (
    "Each family's judge was scored against the suite's human-labelled responses before gating. "
    "Corrected shares undo the judge's measured confusion; their intervals also resample the labelled "
    "responses. Gates use the raw shares."
)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in rows]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(out)


def _family_title(family: str) -> str:
    if family.startswith("observed."):
        return f"{family[len('observed.') :]}: held-out observed hard cases (evaluation.observed_cases)"
    titles = {
        POOLED: "all families (pooled)",
        CAPABILITY: "capability retention",
        "observed": "observed hard cases (pooled)",
    }
    return titles.get(family, family)


def _verdict_icon(g: GateResult) -> str:
    return "n/a" if g.passed is None else ("PASS" if g.passed else "FAIL")


def fit_status(results: Mapping[str, Any]) -> str | None:
    """What check-fit said about the training data (its ``preftune.fit`` tag, which the evaluate run copies
    from the pipeline's run): ``unaudited`` with the recorded reason, ``audited``, ``measured``; None when unknown."""
    tags = results.get("fit")
    if tags is None and results.get("run_id"):
        try:
            from preftune.tracking import inherited_tags

            tags = inherited_tags(str(results["run_id"]))
        except Exception:  # noqa: BLE001 - a report line, never a failed report
            tags = {}
    status = (tags or {}).get("preftune.fit")
    if status == "unaudited":
        reason = (tags or {}).get("preftune.fit.reason") or "no reason recorded"
        return f"unaudited: rater agreement on the training data was not measured; accepted because: {reason}"
    return status


def render_markdown(
    results: Mapping[str, Any], gates: Sequence[GateResult], metrics: Mapping[str, Any], examples: Mapping[str, Any]
) -> str:
    cand, champ = results["candidate"], results.get("champion")
    fit = fit_status(results)
    lines = [
        f"# Behaviour evaluation: {'PASSED' if results['passed'] else 'FAILED'}",
        "",
        f"- candidate: `{cand['label']}` (content hash `{cand['model_hash']}`)",
        f"- champion: `{champ['label']}`" if champ else "- champion: none",
        f"- suite: `{results['suite']['id']}` (sha256 `{results['suite']['sha256'][:16]}`), "
        f"{results['suite']['cases']} cases x {results['suite']['samples_per_prompt']} samples, "
        f"seed {results['suite']['seed']}",
        f"- reference for KL and capability: `{results['reference']}`",
        f"- confidence: {results['confidence'] * 100:g}% bootstrap intervals over cases; gates judged on the "
        f"{'confidence bound' if results['decision'] == 'bound' else 'point estimate'}",
        f"- MLflow run: `{results.get('run_id', '')}`",
        *([f"- training data fit (check-fit): **{fit}**"] if fit else []),
        "",
    ]
    if results.get("first_promotion"):
        lines += ["> No champion yet: this is a first promotion, judged on the absolute gates alone.", ""]
    lines += ["## Verdict", ""]
    failed = [g for g in gates if g.passed is False]
    if failed:
        lines += [f"{len(failed)} of {sum(g.passed is not None for g in gates)} gates failed:", ""]
        lines += [f"- {g.reason}" for g in failed]
    else:
        lines += [f"All {sum(g.passed is not None for g in gates)} gates passed."]
    lines += ["", "## Gates", ""]
    lines.append(
        _md_table(
            GATE_HEADER,
            [[g.name, g.kind, _f(g.judged), _f(g.limit), _verdict_icon(g), g.reason] for g in gates],
        )
    )
    if results.get("calibration"):
        lines += ["", "## Judge calibration", "", CALIBRATION_NOTE, ""]
        lines.append(_md_table(CALIBRATION_HEADER, _calibration_rows(results)))
        corrected = _corrected_rows(metrics)
        if corrected:
            lines += ["", _md_table(CORRECTED_HEADER, corrected)]
    lines += ["", "## Metrics per family", "", "Values: point [CI low, CI high].", ""]
    for family, fam_metrics in metrics.items():
        lines += [f"### {_family_title(family)}", ""]
        lines.append(_md_table(METRIC_HEADER, _metric_rows(fam_metrics)))
        lines.append("")
    lines += ["## Behaviour shares", ""]
    shares = results["behaviour_shares"]
    rows = []
    for family in results["families"]:
        names = sorted(
            set(shares.get(CANDIDATE, {}).get(family, {})) | set((shares.get(CHAMPION) or {}).get(family, {}))
        )
        for b in names:
            rows.append(
                [
                    family,
                    b,
                    _f(shares.get(CANDIDATE, {}).get(family, {}).get(b, 0.0)),
                    _f((shares.get(CHAMPION) or {}).get(family, {}).get(b, 0.0)) if shares.get(CHAMPION) else "-",
                ]
            )
    lines.append(_md_table(["family", "behaviour", "candidate", "champion"], rows))
    lines += ["", "## Example responses", ""]
    for family, items in examples.items():
        lines += [f"### {family}", ""]
        lines.append(
            _md_table(
                EXAMPLE_HEADER,
                [[i["model"], i["case_id"], i["behaviour"], i["text"][:200]] for i in items],
            )
        )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


TEMPLATE = "report.html"


def _png_base64(path: Path | None) -> str | None:
    """The PNG at ``path`` as base64 for a ``data:`` URL (the page fetches nothing), None when not drawn."""
    if path is None or not path.is_file():
        return None
    return base64.b64encode(path.read_bytes()).decode("ascii")


def render_html(
    results: Mapping[str, Any],
    gates: Sequence[GateResult],
    metrics: Mapping[str, Any],
    examples: Mapping[str, Any],
    plots: Mapping[str, Path | None],
) -> str:
    """The same tables as :func:`render_markdown` plus the plots, through ``templates/report.html`` (autoescaped)."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("preftune.evaluate", "templates"), autoescape=select_autoescape())
    cal_rows = _calibration_rows(results) if results.get("calibration") else []
    return env.get_template(TEMPLATE).render(
        results=results,
        verdict="PASSED" if results["passed"] else "FAILED",
        cand=results["candidate"],
        champ=results.get("champion"),
        suite=results["suite"],
        fit=fit_status(results),
        failed=[g for g in gates if g.passed is False],
        judged=sum(g.passed is not None for g in gates),
        gates={
            "header": GATE_HEADER,
            "rows": [[g.name, g.kind, _f(g.judged), _f(g.limit), _verdict_icon(g), g.reason] for g in gates],
            "classes": [["", "", "", "", _verdict_icon(g), ""] for g in gates],
        },
        calibration=results.get("calibration")
        and {
            "note": CALIBRATION_NOTE,
            "header": CALIBRATION_HEADER,
            "rows": cal_rows,
            "classes": [["", "", "", "", "", "", r[-1]] for r in cal_rows],
            "corrected_header": CORRECTED_HEADER,
            "corrected": _corrected_rows(metrics),
        },
        plots={k: _png_base64(plots.get(k)) for k in ("families", "deltas", "shares")},
        metric_header=METRIC_HEADER,
        metric_tables=[(_family_title(f), _metric_rows(m)) for f, m in metrics.items()],
        example_header=EXAMPLE_HEADER,
        example_tables=[
            (f, [[i["model"], i["case_id"], i["behaviour"], i["text"][:300]] for i in items])
            for f, items in examples.items()
        ],
    )
