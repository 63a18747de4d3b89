"""Demonstrations: the answers raters wrote where no candidate was acceptable, as a likelihood term in PPO.

PPO can only reinforce what the policy samples. When a new kind of prompt meets a policy that never
answers it well -- every candidate unacceptable -- the preference pairs say "the written answer is
better than all of these", but the policy has no sample of that answer to push up. InstructGPT's
PPO-ptx mixes a log-likelihood term into the PPO loss; here the term is on the raters' own answers
(the ``written`` field of a judgement, docs/architecture.md "Exchange formats"):

    loss = ppo_loss + demonstration_coef * mean token NLL(written answer | prompt)

The batches are drawn without state (seeded by the update and the micro-step), so a resumed run
draws the same demonstrations as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preftune.data.dataset import read_jsonl
from preftune.errors import InputError
from preftune.text import render_prompt

#: The file of a published dataset (collect, check-fit) that holds the judgements, written answers included.
JUDGEMENTS_FILE = "judgements.jsonl"


@dataclass(frozen=True)
class Demonstration:
    prompt: str
    response: str
    family: str
    prompt_id: str


def load_demonstrations(
    dataset_dir: str | Path, *, excluded: Collection[str] = (), allowed: Collection[str] | None = None
) -> list[Demonstration]:
    """The written answers of a dataset folder's judgements, one per (prompt, text), in file order;
    families in ``excluded`` (or not in ``allowed``) left out, as the rollout prompts are."""
    path = Path(dataset_dir) / JUDGEMENTS_FILE
    out: list[Demonstration] = []
    seen: set[tuple[str, str]] = set()
    for number, j in enumerate(read_jsonl(path, required=False), start=1):
        written, family = j.get("written"), j.get("family") or "default"
        if not written or family in excluded or (allowed is not None and family not in allowed):
            continue
        if not isinstance(written, str) or not isinstance(j.get("prompt"), str):
            raise InputError(f"{path}: judgement {number}: one with 'written' needs 'prompt' and 'written' as text")
        key = (j["prompt"], " ".join(written.split()))
        if key not in seen:  # two raters writing the same answer to one prompt: one demonstration
            seen.add(key)
            out.append(Demonstration(j["prompt"], written, family, j.get("prompt_id", "")))
    return out


@dataclass
class DemonstrationBatch:
    """Left-padded prompts followed by right-padded responses: the rollouts' layout."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor


class DemonstrationSampler:
    """Tokenised demonstrations and a stateless draw of ``batch_size`` of them per (update, micro-step)."""

    def __init__(
        self,
        demos: Sequence[Demonstration],
        tokenizer: Any,
        *,
        batch_size: int,
        max_prompt_tokens: int,
        max_new_tokens: int,
        seed: int,
        device: torch.device,
    ) -> None:
        if not demos:
            raise ValueError("DemonstrationSampler needs at least one demonstration")
        self.batch_size = min(batch_size, len(demos))
        self.seed = seed
        self.device = device
        eos = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
        self.prompts: list[list[int]] = []
        self.responses: list[list[int]] = []
        for d in demos:
            ids = tokenizer(render_prompt(d.prompt, tokenizer), add_special_tokens=False)["input_ids"]
            self.prompts.append(ids[-max_prompt_tokens:])  # like the rollouts: an over-long prompt loses its start
            resp = tokenizer(d.response.strip(), add_special_tokens=False)["input_ids"] + [eos]
            self.responses.append(resp[:max_new_tokens])  # the policy never answers longer than this
        self.families = [d.family for d in demos]

    def __len__(self) -> int:
        return len(self.prompts)

    def draw(self, update: int, micro: int) -> DemonstrationBatch:
        """The demonstrations of one micro-step (seeded by the run seed, the update and the micro-step)."""
        rng = np.random.default_rng([self.seed, update, micro])
        idx = rng.choice(len(self.prompts), size=self.batch_size, replace=False)
        prompts = [self.prompts[i] for i in idx]
        resps = [self.responses[i] for i in idx]
        p_len, r_len = max(map(len, prompts)), max(map(len, resps))
        rows, attn, resp_ids, resp_mask = [], [], [], []
        for p, r in zip(prompts, resps, strict=True):
            pad_p, pad_r = p_len - len(p), r_len - len(r)
            rows.append([self.pad_id] * pad_p + p + r + [self.pad_id] * pad_r)
            attn.append([0] * pad_p + [1] * (len(p) + len(r)) + [0] * pad_r)
            resp_ids.append(r + [self.pad_id] * pad_r)
            resp_mask.append([1] * len(r) + [0] * pad_r)

        def tensor(x: list[list[int]]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.long, device=self.device)

        return DemonstrationBatch(tensor(rows), tensor(attn), tensor(resp_ids), tensor(resp_mask).bool())
