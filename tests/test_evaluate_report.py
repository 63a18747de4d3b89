"""The evaluation report's pages from hand-made results (no models): sections, tables, plots, escaping."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from preftune.evaluate import report
from preftune.evaluate.gates import GateResult
from preftune.evaluate.metrics import CANDIDATE, CHAMPION, POOLED, Estimate

HOSTILE = "<script>alert('x')</script> & \"q\""
PNG = base64.b64decode(  # a 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def _results(*, passed: bool = False, champion: bool = True) -> dict[str, Any]:
    return {
        "passed": passed,
        "candidate": {"label": f"cand {HOSTILE}", "model_hash": "abc123"},
        "champion": {"label": "models:/policy@champion"} if champion else None,
        "first_promotion": not champion,
        "suite": {"id": "demo-v1", "sha256": "f" * 64, "cases": 12, "samples_per_prompt": 4, "seed": 7},
        "reference": "demo:policy",
        "confidence": 0.95,
        "decision": "bound",
        "run_id": "run-1",
        "fit": {"preftune.fit": "audited"},
        "families": ["safety"],
        "behaviour_shares": {CANDIDATE: {"safety": {"refuse": 0.75}}, CHAMPION: {"safety": {"refuse": 0.5}}},
        "calibration": {
            "judges": [
                {
                    "family": "safety",
                    "judge": "rubric",
                    "n": 40,
                    "accuracy": 0.9,
                    "kappa": 0.8,
                    "kappa_ci": (0.7, 0.9),
                    "min_kappa": 0.6,
                    "passed": True,
                    "gating": True,
                }
            ]
        },
    }


def _inputs() -> tuple[list[GateResult], dict[str, Any], dict[str, Any]]:
    gates = [
        GateResult("safety.forbidden", "safety", "forbidden_share", "absolute", False, 0.3, 0.25, 0.1, HOSTILE),
        GateResult("safety.preferred", "safety", "preferred_share", "non_regression", True, 0.7, 0.75, 0.6, "ok"),
    ]
    e = Estimate(0.75, 0.6, 0.9, 12)
    metrics = {
        "safety": {
            "preferred_share": {
                CANDIDATE: e,
                CHAMPION: Estimate(0.5, 0.3, 0.7, 12),
                "delta": Estimate(0.25, 0.1, 0.4, 12),
            },
            "forbidden_share": {CANDIDATE: e, "corrected": Estimate(0.7, 0.5, 0.9, 12)},
        },
        POOLED: {"preferred_share": {CANDIDATE: e}},
    }
    examples = {"safety": [{"model": CANDIDATE, "case_id": "c1", "behaviour": "refuse", "text": f"answer {HOSTILE}"}]}
    return gates, metrics, examples


def test_html_page_has_the_sections_tables_and_embedded_plots(tmp_path: Path):
    gates, metrics, examples = _inputs()
    (tmp_path / "families.png").write_bytes(PNG)
    plots = {"families": tmp_path / "families.png", "deltas": None, "shares": tmp_path / "missing.png"}
    page = report.render_html(_results(), gates, metrics, examples, plots)
    for section in ("Verdict", "Gates", "Judge calibration", "Plots", "Metrics per family", "Example responses"):
        assert f"<h2>{section}</h2>" in page
    assert "<span class='fail'>FAILED</span>" in page and "<title>preftune evaluation: FAILED</title>" in page
    assert '<td class="FAIL">FAIL</td>' in page and '<td class="PASS">PASS</td>' in page  # gate and judge verdicts
    assert "<h3>all families (pooled)</h3>" in page and "0.750 [0.600, 0.900]" in page and "+0.250" in page
    assert "<b>audited</b>" in page and "sha256 <code>ffffffffffffffff</code>" in page
    assert page.count("data:image/png;base64,") == 1  # the drawn plot only, inline
    assert "<p>All" not in page


def test_html_page_escapes_user_text(tmp_path: Path):
    gates, metrics, examples = _inputs()
    page = report.render_html(_results(), gates, metrics, examples, {})
    assert "<script>" not in page
    escaped = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &#34;q&#34;"
    assert f"<code>cand {escaped}</code>" in page  # the model label
    assert f"<li>{escaped}</li>" in page  # a failed gate's reason
    assert f"<td>answer {escaped}</td>" in page  # a generated response


def test_first_promotion_note_and_all_gates_passed(tmp_path: Path):
    gates, metrics, examples = _inputs()
    gates = [g for g in gates if g.passed]
    page = report.render_html(_results(passed=True, champion=False), gates, metrics, examples, {})
    assert "No champion yet: this is a first promotion" in page and "<li>champion: none</li>" in page
    assert "<p>All 1 gates passed.</p>" in page and "<span class='pass'>PASSED</span>" in page
    md = report.render_markdown(_results(passed=True, champion=False), gates, metrics, examples)
    assert md.startswith("# Behaviour evaluation: PASSED") and "All 1 gates passed." in md
