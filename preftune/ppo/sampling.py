"""Batched ancestral sampling with a KV cache: the rollout's generation, and nothing else.

Why not ``model.generate``: a rollout needs exactly "sample from softmax(logits / T) until EOS or
``max_new_tokens``, from left-padded prompts, with a seeded generator we can checkpoint". A short
loop does that with one prefill forward (``logits_to_keep=1``: no vocabulary projection over the
prompt) and one cached forward per new token, stops as soon as every row has emitted EOS, and
keeps the random stream in a ``torch.Generator`` whose state is saved with each checkpoint (so a
resumed run samples exactly what the uninterrupted run would have).

With ``with_scores`` it also returns, for free, what PPO needs from the rollout policy: the
log-prob of each sampled token under ``softmax(logits / T)``, the entropy of that distribution,
and the last hidden state before each token (the value head's input) -- which saves the rollout
a whole extra forward pass over prompt + response.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from preftune.ppo import core
from preftune.ppo.policy import position_ids_from_mask
from preftune.ppo.static_decode import StaticDecoder


class NonFiniteLogits(RuntimeError):
    """The policy produced NaN or inf logits while sampling (weights diverged)."""


@dataclass
class Samples:
    prompt_ids: torch.Tensor  # (batch, P) left-padded
    prompt_mask: torch.Tensor  # (batch, P) 1 on real prompt tokens
    response_ids: torch.Tensor  # (batch, R) sampled tokens; pad_token_id after EOS
    n_forward_tokens: int  # tokens the model processed (prefill + one per step per row)
    logprobs: torch.Tensor | None = None  # (batch, R) float32, with ``with_scores``
    entropy: torch.Tensor | None = None  # (batch, R) float32, with ``with_scores``
    hidden: torch.Tensor | None = None  # (batch, R, hidden): last hidden state before each token


def shared_prefix_length(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> int:
    """Tokens every (left-padded) row starts with, leaving each row at least one token of its own."""
    lengths = prompt_mask.long().sum(dim=1)
    shortest = int(lengths.min())
    if prompt_ids.shape[0] < 2 or shortest < 2:
        return 0
    width = prompt_ids.shape[1]
    starts = (width - lengths).tolist()
    rows = torch.stack([prompt_ids[i, s : s + shortest - 1] for i, s in enumerate(starts)])
    same = (rows == rows[:1]).all(dim=0)
    return int(same.long().cumprod(dim=0).sum())


def _prefill_with_shared_prefix(
    lm: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, prefix: int, with_scores: bool
) -> tuple[Any, torch.Tensor, int]:
    """The prefill with the shared first ``prefix`` tokens computed once: (model output, the cache's attention
    mask, tokens processed). The cache's columns are the prefix, then each row's own tokens left-padded: the
    mask has a hole between them on shorter rows, and the positions carry on from the prefix."""
    rows, width = prompt_ids.shape
    lengths = prompt_mask.long().sum(dim=1)
    head = prompt_ids[:1, width - int(lengths[0]) : width - int(lengths[0]) + prefix]
    positions = torch.arange(prefix, device=head.device)[None]
    out = lm(input_ids=head, position_ids=positions, use_cache=True, logits_to_keep=1)  # its cache, not its logits
    past = out.past_key_values
    past.batch_repeat_interleave(rows)  # trick: one prefill of the shared prefix, its cache copied to every row
    own = int(lengths.max()) - prefix
    tail_ids = prompt_ids[:, width - own :]
    # each row's own tokens are its last (length - prefix) columns; before them a shorter row has its copy of
    # the prefix and its padding, both masked out here (the prefix is in the cache already)
    tail_mask = (torch.arange(own, device=lengths.device)[None] >= (own - (lengths - prefix))[:, None]).long()
    attention = torch.cat([torch.ones_like(tail_mask[:, :1]).expand(rows, prefix), tail_mask], dim=1)
    out = lm(
        input_ids=tail_ids,
        attention_mask=attention,
        position_ids=position_ids_from_mask(attention)[:, prefix:],
        past_key_values=past,
        use_cache=True,
        logits_to_keep=1,
        output_hidden_states=with_scores,
    )
    return out, attention, prefix + int(tail_ids.numel())


@torch.no_grad()
def sample(
    lm: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None,
    with_scores: bool = False,
    num_samples: int = 1,
    early_exit: bool = False,
    decoder: StaticDecoder | None = None,
    share_prefix: int = 0,
) -> Samples:
    """Sample ``num_samples`` responses per (left-padded) prompt row; rows stop at EOS, the batch when all have.

    ``num_samples=k`` prefills each prompt ONCE and copies its KV cache k times: the output rows are
    prompt 0's k responses, then prompt 1's, ... -- the same rows (and, in deterministic mode, the
    same tokens) as sampling a batch in which each prompt is repeated k times.

    ``early_exit`` drops a row from the model's batch as soon as it has emitted EOS (its cache rows
    are selected away, nothing is re-padded). The sampled tokens do not change: the random draw
    still covers every row (a finished row draws from a point mass on the pad token), so the
    generator advances exactly as without it.

    ``decoder`` (``ppo.rollout_compile``): after the same eager prefill, the decode steps run on a
    static KV cache through :class:`~preftune.ppo.static_decode.StaticDecoder` (compiled when
    possible); the same random draws, log-probs to float rounding. Not combinable with
    ``early_exit`` (a static cache keeps its rows).

    ``share_prefix=m`` (``ppo.rollout_share_prefix``): when every row starts with the same ``m`` or more
    tokens (a chat template's system text), those are prefilled once and their KV cache copied to every
    row; each row's own tokens follow, positions carrying on. The same random draws; log-probs to float
    rounding. 0: off.
    """
    if decoder is not None and early_exit:
        raise ValueError("early_exit needs a cache whose rows can be dropped; the static decoder keeps them all")
    k = int(num_samples)
    device = prompt_ids.device
    attention = prompt_mask.long()
    prefix = shared_prefix_length(prompt_ids, prompt_mask) if share_prefix else 0
    if share_prefix and prefix >= share_prefix:  # trick: a prompt prefix shared by every row, prefilled once
        out, attention, n_tokens = _prefill_with_shared_prefix(lm, prompt_ids, attention, prefix, with_scores)
    else:
        out = lm(
            input_ids=prompt_ids,
            attention_mask=attention,
            position_ids=position_ids_from_mask(attention),
            use_cache=True,
            logits_to_keep=1,
            output_hidden_states=with_scores,
        )
        n_tokens = int(prompt_ids.numel())
    past = out.past_key_values
    logits = out.logits[:, -1, :]
    hidden = out.hidden_states[-1][:, -1, :] if with_scores else None
    if k > 1:  # trick: k responses per prompt from one prefill (the group estimators' k samples)
        past.batch_repeat_interleave(k)
        logits = logits.repeat_interleave(k, dim=0)
        hidden = hidden.repeat_interleave(k, dim=0) if hidden is not None else None
        attention = attention.repeat_interleave(k, dim=0)
        prompt_ids = prompt_ids.repeat_interleave(k, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(k, dim=0)
    batch = prompt_ids.shape[0]
    prompt_len = int(attention.shape[1])
    static_mask = None
    if decoder is not None:  # trick: static KV cache, one compiled graph for every decode step
        past, static_mask = decoder.prepare(past, attention, max_new_tokens)
    logprobs: list[torch.Tensor] = []
    entropies: list[torch.Tensor] = []
    hiddens: list[torch.Tensor] = []
    next_pos = attention.sum(dim=1, keepdim=True)  # position of the first new token on each row
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    active = torch.arange(batch, device=device)  # rows still in the model's batch (all, without early_exit)
    tokens: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteLogits(f"non-finite logits at new token {step}")
        scaled = logits.float() / temperature
        probs = torch.softmax(scaled, dim=-1)
        n_active = int(active.shape[0])
        if n_active < batch:  # finished rows draw from a point mass on pad: the generator advances as before
            full = torch.zeros((batch, probs.shape[1]), dtype=probs.dtype, device=device)
            full[:, pad_token_id] = 1.0
            full[active] = probs
            probs = full
        # sampling on CPU with the checkpointed generator keeps the stream identical across devices and resumes
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(device)
        nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)  # trick: pad after EOS
        tokens.append(nxt)
        if with_scores:  # trick: old log-probs, entropy and value inputs from the sampling pass itself
            lp = core.logprobs_from_logits(scaled.unsqueeze(1), nxt[active].unsqueeze(1)).squeeze(1)
            ent = core.entropy_from_logits(scaled)
            if n_active < batch:  # finished rows: zeros (masked out after EOS anyway)
                lp = torch.zeros(batch, dtype=lp.dtype, device=device).index_copy(0, active, lp)
                ent = torch.zeros(batch, dtype=ent.dtype, device=device).index_copy(0, active, ent)
                hidden = torch.zeros((batch, hidden.shape[1]), dtype=hidden.dtype, device=device).index_copy(
                    0, active, hidden
                )
            logprobs.append(lp)
            entropies.append(ent)
            hiddens.append(hidden)
        finished |= nxt == eos_token_id
        if bool(finished.all()):
            break
        step_ids, step_attention = nxt, attention
        if early_exit:
            keep = ~finished[active]
            if not bool(keep.all()):  # trick: early exit of finished rows (cache rows selected away, no re-pad)
                local = keep.nonzero().squeeze(1)
                past.batch_select_indices(local)
                active = active[local]
                attention = attention[local]
                next_pos = next_pos[local]
            step_ids = nxt[active]
            step_attention = attention
        if decoder is not None:
            static_mask[:, prompt_len + step] = 1
            logits, hidden = decoder.step(step_ids.unsqueeze(1), static_mask, next_pos, past, with_scores)
            next_pos = next_pos + 1
            n_tokens += int(active.shape[0])
            continue
        attention = torch.cat([step_attention, torch.ones_like(step_attention[:, :1])], dim=1)
        out = lm(
            input_ids=step_ids.unsqueeze(1),
            attention_mask=attention,
            position_ids=next_pos,
            past_key_values=past,
            use_cache=True,
            output_hidden_states=with_scores,
        )
        past = out.past_key_values
        logits = out.logits[:, -1, :]
        hidden = out.hidden_states[-1][:, -1, :] if with_scores else None
        next_pos = next_pos + 1
        n_tokens += int(active.shape[0])
    response = torch.stack(tokens, dim=1)
    return Samples(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask.long(),
        response_ids=response,
        n_forward_tokens=n_tokens,
        logprobs=torch.stack(logprobs, dim=1) if with_scores else None,
        entropy=torch.stack(entropies, dim=1) if with_scores else None,
        hidden=torch.stack(hiddens, dim=1) if with_scores else None,
    )
