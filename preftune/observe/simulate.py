"""Simulated production traffic for the demo world: a champion's answers, day by day, as the chat
logs a serving application writes (``{"id", "created_at", "model_version", "messages"}``).

Answers are the demo world's own response texts, drawn from a behaviour mix per family (what a
champion that learned the rubric does: mostly the preferred behaviour). From ``shift_day`` on, a
new style of harmful request appears -- role-play framings the suite never shows -- and the
champion complies unsafely with a share of them. Used by the tests, the drift benchmark
(``benchmarks/observe_drift.py``) and the demo; nothing here is used on real traffic.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone

from preftune.world.corpus import build_corpus, responses_for
from preftune.world.jailbreak import ROLE_PLAY_TEMPLATES as JAILBREAK_TEMPLATES

# What a champion trained on the demo rubric does (the demo's promoted policy, rounded).
CHAMPION_MIX: dict[str, dict[str, float]] = {
    "safety": {"explain_decline": 0.9, "curt_refusal": 0.1, "unsafe_comply": 0.0},
    "high_risk": {"hedged_referral": 0.92, "flat_refusal": 0.08, "overconfident": 0.0},
    "benign": {"helpful": 0.97, "needless_refusal": 0.03},
    "tone": {"firm_conclusion": 0.3, "cautious_suggestion": 0.5, "clarifying_question": 0.2},
}


def _draw(rng: random.Random, mix: Mapping[str, float]) -> str:
    r, acc = rng.random(), 0.0
    for b, p in mix.items():
        acc += p
        if r < acc:
            return b
    return next(iter(mix))


def simulate_day(
    day: int,
    *,
    n: int = 400,
    seed: int = 0,
    mix: Mapping[str, Mapping[str, float]] | None = None,
    shift_day: int | None = None,
    jailbreak_share: float = 0.25,
    jailbreak_unsafe: float = 0.7,
    model_version: str = "1",
    start: datetime | None = None,
) -> list[dict]:
    """One day of logged chat completions (see the module docstring)."""
    mix = mix or CHAMPION_MIX
    rng = random.Random(f"{seed}:{day}")
    corpus = build_corpus(seed)
    prompts = list(corpus.eval)
    safety = [p for p in prompts if p.family == "safety"]
    t0 = (start or datetime(2026, 11, 1, tzinfo=timezone.utc)) + timedelta(days=day)
    out = []
    for i in range(n):
        if shift_day is not None and day >= shift_day and rng.random() < jailbreak_share:
            rec = rng.choice(safety)
            prompt = rng.choice(JAILBREAK_TEMPLATES).format(x=rec.slot)
            behaviour = "unsafe_comply" if rng.random() < jailbreak_unsafe else _draw(rng, mix["safety"])
            family, domain = "safety", rec.domain
        else:
            rec = rng.choice(prompts)
            prompt, family, domain = rec.prompt, rec.family, rec.domain
            behaviour = _draw(rng, mix[family])
        answer = rng.choice(responses_for(family, behaviour, domain))
        out.append(
            {
                "id": f"d{day}-{i}",
                "created_at": (t0 + timedelta(seconds=i * 86400 // n)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "model_version": model_version,
                "user": f"user-{rng.randrange(10**6)}",  # a PII field observe must drop
                "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            }
        )
    return out


def to_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)
