"""What a reviewer sees of an evaluation in the MLflow UI, without opening a file.

- The candidate's LoggedModel (logged by ppo, found by content hash) is the run's model input and
  carries the evaluation metrics, so the experiment's Models view lists every candidate with its
  figures side by side.
- The suite is the run's dataset input (name ``<suite>-v<version>``, digest of its content).
- Every case, candidate and champion side by side -- prompt, each one's first answer, each one's
  behaviour -- as an evaluation table (``evaluation/comparison.json``) and as one trace a case
  whose assessments are the judges' labels, so the Traces tab compares them prompt by prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

COMPARISON_TABLE = "evaluation/comparison.json"
MAX_TRACED_CASES = 200  # traces are per case; a suite beyond this keeps them in the table only


def suite_dataset(suite: Any) -> Any:
    """The suite's cases as an MLflow dataset (name ``<suite>-v<version>``, digest of its content)."""
    import mlflow
    import pandas as pd

    df = pd.DataFrame([{"case_id": c.id, "family": c.family, "prompt": c.prompt} for c in suite.cases])
    return mlflow.data.from_pandas(df, source=suite.source, name=suite.id, digest=(suite.sha256 or "")[:32] or None)


def log_model_and_dataset(model_hash: str, suite: Any, metrics: Mapping[str, float]) -> str | None:
    """The suite as the run's evaluation dataset; the candidate's LoggedModel as its model input,
    carrying ``metrics`` (linked to the suite). Returns the LoggedModel's id, or None when the
    candidate has none (not from ppo, or ppo ran with ``log_model: false``)."""
    import mlflow

    from preftune.policy_model import find_logged_model

    dataset = suite_dataset(suite)
    mlflow.log_input(dataset, context="evaluation")
    run = mlflow.active_run()
    logged = find_logged_model(model_hash, run.info.experiment_id if run else None)
    if logged is None:
        return None
    # Metrics logged with a model_id make the model an input of the run (MLflow links it itself).
    mlflow.log_metrics(dict(metrics), model_id=logged.model_id, dataset=dataset)
    mlflow.set_tag("preftune.eval.logged_model_id", logged.model_id)
    return logged.model_id


def comparison_rows(records: Sequence[Any], suite: Any) -> list[dict[str, Any]]:
    """One row a case: the prompt and the first sample of each model with its behaviour."""
    first: dict[tuple[str, str], Any] = {}
    for r in records:
        key = (r.model, r.case_id)
        if key not in first or r.sample < first[key].sample:
            first[key] = r
    rows = []
    for case in suite.cases:
        cand = first.get(("candidate", case.id))
        if cand is None:
            continue
        champ = first.get(("champion", case.id))
        rows.append(
            {
                "case_id": case.id,
                "family": case.family,
                "prompt": case.prompt,
                "candidate_answer": cand.text,
                "candidate_behaviour": cand.behaviour,
                "candidate_preferred": bool(cand.preferred),
                "champion_answer": champ.text if champ else None,
                "champion_behaviour": champ.behaviour if champ else None,
                "champion_preferred": bool(champ.preferred) if champ else None,
            }
        )
    return rows


def log_case_comparison(records: Sequence[Any], suite: Any, model_id: str | None) -> int:
    """The comparison table, and one trace a case with the judges' labels as assessments; returns traces."""
    import mlflow
    import pandas as pd

    rows = comparison_rows(records, suite)
    if not rows:
        return 0
    mlflow.log_table(pd.DataFrame(rows), COMPARISON_TABLE)
    if model_id:
        mlflow.set_active_model(model_id=model_id)  # the traces show on the candidate's model page too
    try:
        return _trace_cases(rows[:MAX_TRACED_CASES], {name: fam.judge for name, fam in suite.families.items()})
    finally:
        if model_id:
            mlflow.clear_active_model()


def _trace_cases(rows: list[dict[str, Any]], judge_of: Mapping[str, str]) -> int:
    import mlflow
    from mlflow.entities import AssessmentSource

    ids = []
    for row in rows:
        with mlflow.start_span(name=f"case {row['case_id']}", span_type="CHAIN") as span:
            span.set_inputs({"prompt": row["prompt"], "family": row["family"]})
            span.set_outputs({"candidate": row["candidate_answer"], "champion": row["champion_answer"]})
            mlflow.update_current_trace(tags={"preftune.case_id": row["case_id"], "preftune.family": row["family"]})
            ids.append(span.trace_id)
    mlflow.flush_trace_async_logging()  # the traces must be stored before assessments can name them
    for row, trace_id in zip(rows, ids, strict=True):
        source = AssessmentSource(source_type="CODE", source_id=f"judge:{judge_of.get(row['family'], '?')}")
        feedback = {
            "candidate_behaviour": row["candidate_behaviour"],
            "candidate_preferred": row["candidate_preferred"],
        }
        if row["champion_answer"] is not None:
            feedback["champion_behaviour"] = row["champion_behaviour"]
            feedback["champion_preferred"] = row["champion_preferred"]
        for name, value in feedback.items():
            mlflow.log_feedback(trace_id=trace_id, name=name, value=value, source=source)
    return len(ids)
