"""The pilot's report as pages: ``pilot.md`` (Markdown, for a pull request or a terminal) and ``pilot.html``
(the Jinja2 template ``templates/pilot.html``, autoescaped), from the dict :func:`preftune.pilot.report.analyse`
returns, which is also written as ``pilot.json``."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

JSON_FILE = "pilot.json"
MD_FILE = "pilot.md"
HTML_FILE = "pilot.html"
TEMPLATE = "pilot.html"


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _share(e: Mapping[str, Any] | None, signed: bool = False) -> str:
    if not e:
        return "-"
    sign = "+" if signed else ""
    return f"{e['value']:{sign}.2f} [{_f(e.get('ci_low'), sign + '.2f')}, {_f(e.get('ci_high'), sign + '.2f')}]"


def _family_rows(report: Mapping[str, Any]) -> list[list[str]]:
    out = []
    for f, r in report["families"].items():
        ps = r["preferred_share"]
        out.append(
            [
                f,
                r["verdict"],
                r["fit_verdict"],
                _f(r["reward_accuracy"], ".3f"),
                _share(ps["before"]),
                _share(ps["after"]),
                _share(ps["change"], signed=True),
                r["trend"],
                r["reason"],
            ]
        )
    return out


FAMILY_HEADER = [
    "family",
    "verdict",
    "fit",
    "RM accuracy",
    "preferred before",
    "preferred after",
    "change",
    "trend",
    "reason",
]


def _cost_lines(report: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    c = report["cost"]
    m, full = c["measured"], c["full_run"]
    figures = [
        f"measured in the pilot: {_f(m['ppo_seconds_per_update'], '.2f')} s per PPO update "
        f"({m['ppo_batch_size']} prompts), {_f(m['ppo_tokens_per_s'], '.0f')} generated tokens/s over "
        f"{m['ppo_updates']} updates; reward model trained in {_f(m['reward_train_seconds'], '.1f')} s",
        f"full run: about {full['prompts']} prompts and {full['judgements']} judgements, {full['ppo_updates']} PPO "
        f"updates x {full['ppo_batch_size']} prompts on {full['hardware']}",
        "estimated time: "
        + ", ".join(f"{k} {_f(v, '.0f')} s" for k, v in full["seconds_by_step"].items())
        + f"; total {full['hours']:.2f} h"
        + (f", about {full['cost']:.2f} {full['currency']}" if full.get("cost") is not None else ""),
    ]
    return figures, list(c["assumptions"])


BEST_OF_N_HEADER = ["sampler", "KL to the starting policy (nats)", "reward (normalised)"]


def _best_of_n_rows(report: Mapping[str, Any]) -> tuple[list[list[str]], str] | None:
    """(table rows, verdict sentence) of the best-of-n comparison, or None when it was not measured."""
    b = report.get("best_of_n") or {}
    if not b:
        return None
    if b.get("error"):
        return [], f"Best-of-n could not be measured: {b['error']}"
    rows = [[f"best-of-{int(p['n'])}", _f(p["kl"]), _f(p["reward"], ".3f")] for p in b.get("curve", [])]
    pol = b.get("policy")
    if pol:
        rows.append(["PPO policy (pilot)", _f(pol["kl"]), _f(pol["reward"], ".3f")])
    c = b.get("comparison")
    verdict = {True: "PPO beats best-of-n at the KL it spends.", False: "PPO does NOT beat best-of-n."}.get(
        c["beats"] if c else None, "Undecided."
    )
    where = f" on {b.get('prompts')} prompts, {b.get('draws_per_prompt')} draws each, KL = log n - (n-1)/n"
    sentence = verdict + (f" {c['detail']}." if c else "") + where + "."
    return rows, sentence


def render_markdown(report: Mapping[str, Any]) -> str:
    v = report["verdict"]
    lines = [
        f"# Pilot: {v.upper()}" + (f" for {', '.join(report['go_families'])}" if report["go_families"] else ""),
        "",
        f"Run `{report['run']}`: {report['slice']['fraction']:.0%} of the prompts "
        f"({report['slice']['counts'].get('prompts', 0)} prompts, {report['slice']['counts'].get('judgements', 0)} "
        f"judgements), {report['ppo']['updates']} PPO updates; candidate against "
        f"`{report['baseline'] or 'no baseline'}` on suite `{report['suite']}`"
        + (f" ({report['confidence']:.0%} bootstrap CIs)." if report.get("confidence") else ".")
        + (f" Pilot wall time {report['seconds']:.0f} s." if report.get("seconds") else ""),
        "",
        "## Verdict per family",
        "",
        "| " + " | ".join(FAMILY_HEADER) + " |",
        "| " + " | ".join("---" for _ in FAMILY_HEADER) + " |",
        *["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in _family_rows(report)],
        "",
        "## Red flags",
        "",
    ]
    if not report["red_flags"]:
        lines.append("None raised.")
    for fl in report["red_flags"]:
        where = f" ({fl['family']})" if fl["family"] else ""
        stop = " **blocks go**" if fl["blocking"] else ""
        lines.append(f"- **{fl['flag']}**{where}{stop}: {fl['meaning']} {fl['detail']}.")
    bon = _best_of_n_rows(report)
    if bon is not None:
        rows, sentence = bon
        lines += ["", "## PPO against best-of-n", "", sentence, ""]
        if rows:
            lines += [
                "| " + " | ".join(BEST_OF_N_HEADER) + " |",
                "| " + " | ".join("---" for _ in BEST_OF_N_HEADER) + " |",
                *["| " + " | ".join(r) + " |" for r in rows],
            ]
    figures, assumptions = _cost_lines(report)
    lines += [
        "",
        "## Cost of the full run",
        "",
        *[f"- {x}" for x in figures],
        "",
        "Assumptions:",
        "",
        *[f"- {a}" for a in assumptions],
    ]
    return "\n".join(lines) + "\n"


def _css_class(verdict: str) -> str:
    return verdict.replace(" ", "-")


def render_html(report: Mapping[str, Any]) -> str:
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("preftune.pilot", "templates"), autoescape=select_autoescape())
    env.filters["css_class"] = _css_class
    bon = _best_of_n_rows(report)
    figures, assumptions = _cost_lines(report)
    return env.get_template(TEMPLATE).render(
        r=report,
        intro=render_markdown(report).split("\n")[2].replace("`", ""),
        family_header=FAMILY_HEADER,
        family_rows=_family_rows(report),
        best_of_n=None if bon is None else {"header": BEST_OF_N_HEADER, "rows": bon[0], "sentence": bon[1]},
        figures=figures,
        assumptions=assumptions,
    )


def write_report(report: Mapping[str, Any], folder: str | Path) -> dict[str, Path]:
    """Write pilot.json, pilot.md and pilot.html into ``folder`` (each atomically); returns their paths."""
    from preftune.storage import atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / JSON_FILE, "md": folder / MD_FILE, "html": folder / HTML_FILE}
    atomic_write_text(paths["json"], json.dumps(report, indent=2, sort_keys=False) + "\n")
    atomic_write_text(paths["md"], render_markdown(report))
    atomic_write_text(paths["html"], render_html(report))
    return paths
