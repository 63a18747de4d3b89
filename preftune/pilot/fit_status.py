"""The pilot's go / no-go on single-rated data: check-fit's "not measured" and "unaudited" verdicts.

check-fit gives single-rated families (one rating per item: an imported public set, logs) the
verdict ``not measured``: nobody knows whether people agree on these labels, so nothing about the
reward model or PPO can be called a "go" yet. The pilot says so in its own words,
:data:`NOT_MEASURED_VERDICT`, with the two ways forward (an audit, or the recorded override),
instead of folding it into "needs data" / "no-go" with a reason about held-out pairs. A family
that went on *unaudited* (``--accept-unaudited`` / ``fit.accept_unaudited``) keeps its go / no-go,
and its reason says the agreement was never measured and why it was accepted.

:func:`apply_fit_status` rewrites the report dict that :func:`preftune.pilot.report.analyse`
returns, before it is written (:func:`preftune.pilot.run.build_report`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from preftune.errors import ExitCode
from preftune.fit.verdict import NOT_MEASURED, UNAUDITED

NOT_MEASURED_VERDICT = "not measured — audit or accept"
"""The pilot's verdict for a family (and the whole pilot) whose rater agreement check-fit could not measure."""

HOW_TO_PROCEED = (
    "audit a sample (`preftune audit create`, then `preftune check-fit --audit EXPORT`) or accept the labels "
    "unaudited with a recorded reason (`--accept-unaudited REASON` / fit.accept_unaudited), then run the pilot again"
)


def _not_measured_reason(fit_reason: str | None) -> str:
    head = "agreement not measured (one rating per item): PPO on unmeasured labels cannot be judged a go"
    detail = f" (check-fit: {fit_reason})" if fit_reason else ""
    return f"{head}{detail}; {HOW_TO_PROCEED}"


def apply_fit_status(report: dict[str, Any], fit_report: Mapping[str, Any]) -> dict[str, Any]:
    """Give ``not measured`` families (and, when no family is a go, the pilot) the verdict :data:`NOT_MEASURED_VERDICT`.

    ``report``: the dict of :func:`preftune.pilot.report.analyse` (changed in place and returned);
    ``fit_report``: check-fit's ``fit_report.json``. The pilot's exit code becomes 10 (as
    check-fit's) when its verdict is :data:`NOT_MEASURED_VERDICT`. ``report["fit_status"]`` records
    check-fit's status (``measured``, ``audited``, ``unaudited``, ``not measured`` ...).
    """
    rows: dict[str, dict[str, Any]] = report.get("families") or {}
    not_measured = []
    for fam, row in rows.items():
        if row.get("fit_verdict") == NOT_MEASURED:
            row["verdict"], row["reason"] = NOT_MEASURED_VERDICT, _not_measured_reason(row.get("fit_reason"))
            not_measured.append(fam)
        elif row.get("fit_verdict") == UNAUDITED:
            why = fit_report.get("unaudited_reason") or "no reason recorded"
            row["reason"] = f"{row.get('reason')} — labels accepted unaudited, agreement never measured ({why})"
    report["go_families"] = [f for f in report.get("go_families") or [] if f not in not_measured]
    report["not_measured_families"] = not_measured
    report["fit_status"] = fit_report.get("fit_status")
    if not_measured and not report["go_families"]:
        report["verdict"], report["exit_code"] = NOT_MEASURED_VERDICT, ExitCode.NOT_FIT
        report["next_step"] = HOW_TO_PROCEED
    return report
