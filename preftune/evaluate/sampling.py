"""Sampling a model on a suite and judging every sample (what the evaluate step spends its time on).

Each model is sampled on every case with the suite's fixed seeds (common random numbers between
the candidate and the champion), its KL to the reference scored on the sampled tokens, its
samples judged by each family's judge, and its capability texts scored. A registry champion's
samples are reused from the evaluation that promoted it when they answer the same question.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune import registry
from preftune.behaviour.judges import judge_by_family
from preftune.behaviour.suite import Suite
from preftune.common.device import torch_threads
from preftune.config import RunConfig
from preftune.evaluate.metrics import CANDIDATE, CHAMPION, SampleRecord
from preftune.evaluate.stored import stored_champion_samples

log = logging.getLogger(__name__)


@dataclass
class Models:
    candidate: registry.ResolvedModel
    champion: registry.ResolvedModel | None
    reference: registry.ResolvedModel


def _judge_and_record(
    suite: Suite,
    judges: Mapping[str, Any],
    model_label: str,
    samples: Sequence[Any],
    kl: Sequence[float | None],
    rewards: Sequence[float | None],
) -> list[SampleRecord]:
    """Judge every sample with its family's judge; unknowns are kept and counted."""
    cases = [suite.cases[s.case_index] for s in samples]
    judged = judge_by_family(
        suite, judges, [c.family for c in cases], [c.prompt for c in cases], [s.text for s in samples]
    )
    behaviours = [b or "unknown" for b in judged]
    out = []
    for i, s in enumerate(samples):
        case = suite.cases[s.case_index]
        roles = case.roles(behaviours[i])
        out.append(
            SampleRecord(
                model=model_label,
                case_id=case.id,
                family=case.family,
                sample=s.sample_index,
                text=s.text,
                behaviour=behaviours[i],
                preferred=roles["preferred"],
                acceptable=roles["acceptable"],
                forbidden=roles["forbidden"],
                needless_refusal=roles["needless_refusal"],
                unknown=roles["unknown"],
                has_preferred=bool(case.preferred),
                has_acceptable=bool(case.preferred or case.acceptable),
                has_forbidden=bool(case.forbidden),
                has_needless_refusal=bool(case.needless_refusal),
                words=len(s.text.split()),
                tokens=len(s.response_ids),
                ended=s.ended,
                kl=kl[i],
                reward=rewards[i],
            )
        )
    return out


def _capability(policy: Any, suite: Suite) -> dict[str, float]:
    from preftune.generation.policy import text_logliks

    values = text_logliks(
        policy,
        [t.text for t in suite.capability],
        max_tokens=suite.capability_max_tokens,
        prompts=[t.prompt for t in suite.capability],
    )
    return dict(zip([t.id for t in suite.capability], values.tolist(), strict=True))


def _evaluate_model(
    label: str,
    model: registry.ResolvedModel,
    suite: Suite,
    judges: Mapping[str, Any],
    ref_policy: Any,
    scorer: Any,
    device: Any,
    cfg: RunConfig,
    progress: Any,
) -> tuple[list[SampleRecord], dict[str, float] | None]:
    """Sample one model on every case, judge, score KL (and rewards), and measure capability."""
    from preftune.generation.policy import load_policy, response_logprobs, same_vocabulary, sample

    gen = suite.generation
    prompts = [c.prompt for c in suite.cases]
    pol = load_policy(model.path, device, cfg.world)
    samples = sample(
        pol,
        prompts,
        n_samples=gen.samples_per_prompt,
        seed=gen.seed,
        temperature=gen.temperature,
        top_p=gen.top_p,
        top_k=gen.top_k,
        max_new_tokens=gen.max_new_tokens,
        batch_size=gen.batch_size,
        progress=progress,
    )
    kl: list[float | None] = [None] * len(samples)
    if same_vocabulary(pol.tokenizer, ref_policy.tokenizer):
        lp = response_logprobs(pol, prompts, samples, temperature=gen.temperature, batch_size=gen.batch_size)
        lp_ref = response_logprobs(ref_policy, prompts, samples, temperature=gen.temperature, batch_size=gen.batch_size)
        kl = [float((a - b).sum()) for a, b in zip(lp, lp_ref, strict=True)]
    else:
        log.warning("%s: its tokenizer differs from the reference's; KL to the reference is not computed", model.label)
    rewards: list[float | None] = [None] * len(samples)
    if scorer is not None:
        rewards = scorer.score([prompts[s.case_index] for s in samples], [s.text for s in samples]).tolist()
    records = _judge_and_record(suite, judges, label, samples, kl, rewards)
    cap = _capability(pol, suite) if suite.capability else None
    del pol
    gc.collect()
    return records, cap


def sample_and_judge(
    models: Models,
    suite: Suite,
    judges: Mapping[str, Any],
    scorer: Any,
    device: Any,
    cfg: RunConfig,
    client: Any,
    uri: str,
    tmp: Path,
    reference_hash: str,
    progress: bool | None,
    *,
    reuse: bool = True,
) -> tuple[list[SampleRecord], dict[str, dict[str, float]], str | None]:
    """Sample and judge the candidate and (unless its stored samples can be reused) the champion."""
    from tqdm.auto import tqdm

    from preftune.generation.policy import load_policy

    ev = cfg.evaluation
    gen = suite.generation
    champ = models.champion
    reused_from = None
    with torch_threads(ev.threads):
        ref_policy = load_policy(models.reference.path, device, cfg.world)
        capability: dict[str, dict[str, float]] = {}
        if suite.capability:
            capability["reference"] = _capability(ref_policy, suite)
        todo = [(CANDIDATE, models.candidate)] + ([(CHAMPION, champ)] if champ is not None else [])
        stored = None
        if champ is not None and reuse and ev.reuse_champion_samples:
            stored = stored_champion_samples(client, uri, tmp, cfg, suite, champ, reference_hash)
            if stored is not None:
                todo = todo[:1]
        bar = tqdm(
            total=len(suite.cases) * gen.samples_per_prompt * len(todo),
            desc="evaluate: sampling",
            unit="seq",
            disable=None if progress is None else not progress,
            leave=False,
        )
        records: list[SampleRecord] = []
        try:
            for label, model in todo:
                recs, cap = _evaluate_model(label, model, suite, judges, ref_policy, scorer, device, cfg, bar.update)
                records += recs
                if cap is not None:
                    capability[label] = cap
        finally:
            bar.close()
        if stored is not None:
            reused_from, champ_records, champ_cap = stored
            if scorer is not None:
                prompts = {c.id: c.prompt for c in suite.cases}
                scores = scorer.score([prompts[r.case_id] for r in champ_records], [r.text for r in champ_records])
                for r, v in zip(champ_records, scores.tolist(), strict=True):
                    r.reward = v
            records += champ_records
            if champ_cap is not None:
                capability[CHAMPION] = champ_cap
    return records, capability, reused_from
