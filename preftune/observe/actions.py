"""What observe does about a window that drifted or regressed.

- *Hard cases*: the offending prompts -- in a family that drifted or broke its gate, answered with
  a forbidden, unknown or non-preferred behaviour -- and, when the window is not ok, the new prompt
  types. Written as a prompt file (``{"id", "family", "prompt", "tags", "split"}``, what ``data.prompts`` and
  ``data.extra_prompts`` read), so the next retraining run samples and judges them. A stable share
  (``observe.hard_cases_heldout``, by a hash of the prompt, so a prompt keeps its side in every
  window) is marked ``"split": "heldout"``: training skips those, and ``evaluation.observed_cases``
  judges the next candidate on them against the champion -- a fix for the hard cases is measured on
  hard cases it never trained on.
- *To the feedback service* (``--to-service URL``): each hard case becomes a rating task with the
  champion's answer and fresh candidates from the policy (``preftune.candidates`` v1, posted to
  ``/api/admin/tasks/import`` with ``$PREFTUNE_ADMIN_TOKEN``).
- *Rollback* (``--on-regression rollback``): ``@champion`` goes back to ``@previous-champion``
  through the promotion lock (:func:`preftune.registry.rollback`).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from preftune.data.records import short_hash
from preftune.errors import ConfigError, UnreachableError


def heldout(prompt: str, share: float) -> bool:
    """Whether an observed prompt is held out for evaluation: a stable hash of its text against ``share``."""
    key = " ".join(prompt.split())
    return int(short_hash("observed-heldout", key, n=8), 16) / 16**8 < share


def hard_cases(result: Any, suite: Any, cap: int, heldout_share: float = 0.0) -> list[dict[str, Any]]:
    flagged = {f for f, g in result.gates.items() if g.broken}
    flagged |= {t.family for tests in result.drift.values() for t in tests.values() if t.drift}
    out, seen = [], set()
    for rec in result.records:
        fam = rec["family"]
        family = suite.families.get(fam)
        bad = family is not None and fam in flagged and rec["behaviour"] not in family.preferred
        new = result.verdict in ("drift", "regression") and rec["new_prompt_type"]
        key = " ".join(rec["prompt"].split())
        if (bad or new) and key not in seen:
            seen.add(key)
            out.append(
                {
                    "id": "observed-" + short_hash("observed", key, n=12),
                    "family": fam if family is not None else "default",
                    "prompt": rec["prompt"],
                    "tags": ["observed", result.window["window"], "new-prompt-type" if new else rec["behaviour"]],
                    "champion_answer": rec["response"],
                    "model_version": rec["model_version"],
                    "split": "heldout" if heldout(rec["prompt"], heldout_share) else "train",
                }
            )
        if len(out) >= cap:
            break
    return out


def _fresh_candidates(cases: list[dict[str, Any]], policy: str, cfg: Any, storage: Any) -> list[list[str]]:
    import tempfile
    from pathlib import Path

    from preftune.generation.candidates import PromptRecord, sample_candidates
    from preftune.registry import resolve_model

    client = None
    if policy.startswith("models:/"):
        from preftune import tracking
        from preftune.registry import mlflow_client

        tracking.configure(cfg)
        client = mlflow_client(tracking.resolve_tracking_uri(cfg.tracking))
    with tempfile.TemporaryDirectory(prefix="preftune-observe-policy-") as tmp:
        path = resolve_model(policy, client, Path(tmp), storage).path
        gen = cfg.data.generation.model_copy(update={"n_candidates": max(2, cfg.data.generation.n_candidates - 1)})
        prompts = [PromptRecord(c["id"], c["family"], tuple(c["tags"]), c["prompt"]) for c in cases]
        texts, _ = sample_candidates(str(path), prompts, gen, seed=cfg.run.seed, progress=False)
    return texts


def send_to_service(result: Any, url: str | None, policy: str | None, cfg: Any, storage: Any) -> list[dict[str, Any]]:
    """Post the hard cases of the training split as rating tasks (held-out ones stay unseen by training, the
    raters' judgements included); returns the action records."""
    cases = [c for c in result.hard_cases if c.get("split") != "heldout"]
    if not url or not cases:
        return []
    from preftune.generation.candidates import PromptRecord, candidate_records, candidates_jsonl

    token = os.environ.get("PREFTUNE_ADMIN_TOKEN")
    if not token:
        raise ConfigError("--to-service needs the feedback service's admin token in $PREFTUNE_ADMIN_TOKEN")
    policy = policy or f"models:/{cfg.models.registered_model}@{cfg.promotion.champion_alias}"
    fresh = _fresh_candidates(cases, policy, cfg, storage)
    prompts = [PromptRecord(c["id"], c["family"], tuple(c["tags"]), c["prompt"]) for c in cases]
    texts = [[c["champion_answer"], *f] for c, f in zip(cases, fresh, strict=True)]
    body = candidates_jsonl(candidate_records(prompts, texts, policy)).encode("utf-8")
    req = urllib.request.Request(
        url.rstrip("/") + "/api/admin/tasks/import",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - the operator's service URL
            answer = json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        raise UnreachableError(
            f"{url}: the feedback service refused the hard cases: {err.code} {err.read()[:300]!r}"
        ) from None
    except (urllib.error.URLError, TimeoutError) as err:
        raise UnreachableError(f"{url}: the feedback service is unreachable ({err})") from None
    return [{"action": "to_service", "url": url, "tasks": len(cases), "service": answer}]


def rollback(cfg: Any, client: Any, champion: str | None, previous: str | None, result: Any) -> dict[str, Any]:
    """Move @champion back to @previous-champion (through the promotion lock); never raises for 'nothing to do'."""
    from preftune.registry import rollback as registry_rollback

    if champion is None or previous is None or previous == champion:
        return {"action": "rollback", "done": False, "why": "no previous champion to roll back to"}
    reason = f"observe {result.window['window']}: " + "; ".join(result.reasons())[:3000]
    record = registry_rollback(cfg, previous, reason, user="preftune-observe")
    return {"action": "rollback", "done": True, "from": champion, "to": previous, "record": record}
