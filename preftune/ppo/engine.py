"""Rollout engines: prompts and sampling settings in; tokens, log-probs and finish reasons out.

:class:`RolloutEngine` is the seam between the trainer and whatever generates its rollouts -- the
same line OpenRLHF and verl draw around vLLM/SGLang. An engine

- :meth:`~RolloutEngine.generate`: given left-padded prompt ids and :class:`SamplingParams`,
  returns a :class:`Generation`: the sampled token ids, the per-token log-probs under the sampling
  policy (``softmax(logits / T)``), the entropies and the value-head inputs when it can give them
  for free (``None`` otherwise: the trainer then recomputes log-probs and values in one no-grad
  pass, as it must for a serving engine whose numerics are not the trainer's), and why each row
  stopped (``"stop"``: EOS; ``"length"``: ``max_new_tokens``);
- :meth:`~RolloutEngine.sync`: called after every update, so the engine samples from the new
  weights (a no-op for an engine that shares the trainer's modules; a serving engine loads the new
  LoRA adapter here).

:class:`KVCacheEngine` is the first engine: the trainer's own modules, the KV-cache sampler of
:mod:`preftune.ppo.sampling`, and a few speed options, each measured on its own in
``docs/benchmarks.md``:

- ``merge_lora``: the LoRA adapter folded into the base weights for the rollout (``W + s*B@A`` per
  adapted layer, computed once per rollout with peft's ``get_delta_weight``) and the adapter path
  disabled, so a decode step costs what the base model costs. The original weight tensors are put
  back afterwards (not peft's ``unmerge``, which subtracts the delta again and leaves rounding in
  the base -- and the base is the reference policy). The update still runs the unmerged adapter;
  the sampled tokens and old log-probs come from the merged pass, which agrees with the unmerged
  one to float rounding (about 1e-6 in the log-probs on CPU fp32; tested), not bit for bit.
- ``early_exit``: finished rows leave the decode batch (their cache rows are selected away); the
  same tokens and random stream, log-probs to float rounding (~1e-6 on CPU: smaller GEMMs round
  differently), so it is off by default to keep the demo's figures to the digit.
- ``num_samples=k`` (``ppo.rollout_share_prefill``): ``k`` responses per prompt from one prefill
  when the batch holds each prompt ``k`` times in a row (the group estimators); the same tokens,
  log-probs to float rounding (tested).
- ``dtype="bf16"``: CPU/GPU autocast to bfloat16 for the rollout only (the update stays fp32);
  log-probs within a stated tolerance, not identical.
- ``compile`` (``ppo.rollout_compile``): the decode steps on a static KV cache, the one-token step
  compiled by ``torch.compile`` (:mod:`preftune.ppo.static_decode`; eager fallback logged once);
  the same tokens, log-probs to float rounding (~1e-6; tested). Not with ``early_exit``.
- ``length_batching`` (``ppo.rollout_length_batching``): when a rollout takes several forward
  chunks (``batch_size`` rows each), the prompts are grouped by length, longest first, and each
  chunk's left padding is cut to its own longest prompt, so short prompts do not pay for the
  longest one's columns in the prefill and in every decode step's attention. The output rows come
  back in the input order. The chunks draw from the random stream in the new order, so the samples
  are another (seeded, resumable) draw, not the same tokens. With one chunk it changes nothing.
- ``share_prefix=n`` (``ppo.rollout_share_prefix``): a prefix of at least ``n`` tokens that every
  prompt of a chunk starts with (a chat template's system text) is prefilled once and its KV cache
  copied to every row (:func:`preftune.ppo.sampling.sample`); the same random draws, log-probs to
  float rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from preftune.ppo.sampling import sample
from preftune.ppo.static_decode import StaticDecoder


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float
    eos_token_id: int
    pad_token_id: int
    num_samples: int = 1  # responses per prompt row (one prefill each)
    with_scores: bool = True  # also return log-probs, entropies and value-head inputs (when the engine can)
    batch_size: int = 64  # rows per forward (ppo.forward_batch_size)


@dataclass
class Generation:
    """One generation per output row; output row ``i * num_samples + j`` is prompt ``i``'s ``j``-th response."""

    response_ids: torch.Tensor  # (rows, R): sampled tokens, pad after EOS
    finish_reasons: list[str]  # "stop" (emitted EOS) or "length" (hit max_new_tokens)
    n_forward_tokens: int
    logprobs: torch.Tensor | None = None  # (rows, R) float32 under softmax(logits / T), None: trainer recomputes
    entropy: torch.Tensor | None = None  # (rows, R)
    hidden: torch.Tensor | None = None  # (rows, R, H): the last hidden state before each token (shared critic)


class RolloutEngine(Protocol):
    """Generates rollouts for the trainer; :meth:`sync` after each update makes it sample from the new weights."""

    def generate(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams, generator: torch.Generator
    ) -> Generation: ...

    def sync(self) -> None: ...


def finish_reasons(response_ids: torch.Tensor, eos_token_id: int) -> list[str]:
    return ["stop" if bool(row) else "length" for row in (response_ids == eos_token_id).any(dim=1)]


def _pad_cat(ts: Sequence[torch.Tensor], length: int, value: float) -> torch.Tensor:
    pad = torch.nn.functional.pad
    return torch.cat([pad(t, (0, 0) * (t.dim() - 2) + (0, length - t.shape[1]), value=value) for t in ts])


@contextlib.contextmanager
def merged_lora(peft_model: Any) -> Iterator[int]:
    """The active LoRA adapter folded into the base weights, the adapter path off; exact weights restored after.

    Yields the number of layers merged. Works on the live peft model (no copy of the model): each
    adapted layer's base weight tensor is swapped for ``W + delta`` and swapped back.
    """
    from peft.tuners.lora import LoraLayer

    swapped: list[tuple[Any, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for module in peft_model.modules():
                if not isinstance(module, LoraLayer) or module.merged:
                    continue
                names = [a for a in module.active_adapters if a in module.lora_A]
                if not names:
                    continue
                base = module.get_base_layer()
                original = base.weight.data
                merged = original.clone()
                for name in names:
                    merged += module.get_delta_weight(name).to(merged.dtype)
                base.weight.data = merged
                swapped.append((base, original))
        with peft_model.disable_adapter():
            yield len(swapped)
    finally:
        for base, original in swapped:
            base.weight.data = original


class KVCacheEngine:
    """The trainer's own policy and the KV-cache sampler (:func:`preftune.ppo.sampling.sample`)."""

    def __init__(
        self,
        lm: Any,
        *,
        merge_lora: bool = False,
        early_exit: bool = False,
        dtype: Literal["fp32", "bf16"] = "fp32",
        autocast: Any = contextlib.nullcontext,
        compile: bool = False,
        compile_bucket: int = 64,
        length_batching: bool = False,
        share_prefix: int = 0,
    ) -> None:
        if compile and early_exit:
            raise ValueError("compile (a static KV cache) and early_exit cannot be combined: turn one of them off")
        self.lm = lm
        # one decoder for the whole run: its compiled graphs are reused by every rollout
        self.decoder = StaticDecoder(lm, bucket=compile_bucket) if compile else None
        self.merge_lora = merge_lora and hasattr(lm, "disable_adapter") and hasattr(lm, "peft_config")
        self.early_exit = early_exit
        self.dtype = dtype
        self.autocast = autocast
        self.length_batching = length_batching
        self.share_prefix = share_prefix

    def sync(self) -> None:
        """Nothing to copy: the engine samples with the trainer's live modules (merging happens per rollout)."""

    def _precision(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype == "bf16":
            device = next(self.lm.parameters()).device.type
            return torch.autocast(device, dtype=torch.bfloat16)
        return self.autocast()

    def generate(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams, generator: torch.Generator
    ) -> Generation:
        k = params.num_samples
        rows = max(1, params.batch_size // k)  # prompt rows per forward: rows * k output rows
        n = prompt_ids.shape[0]
        order = None
        if self.length_batching and n > rows:  # trick: chunks of similar prompt length, each cut to its longest
            order = torch.argsort(prompt_mask.sum(dim=1), descending=True, stable=True)
            prompt_ids, prompt_mask = prompt_ids[order], prompt_mask[order]
        merging = merged_lora(self.lm) if self.merge_lora else contextlib.nullcontext()
        chunks = []
        with merging, self._precision():
            for start in range(0, n, rows):
                sl = slice(start, start + rows)
                ids, mask = prompt_ids[sl], prompt_mask[sl]
                if order is not None:  # left padding: the chunk's longest prompt ends the columns it needs
                    width = max(1, int(mask.sum(dim=1).max()))
                    ids, mask = ids[:, -width:], mask[:, -width:]
                chunks.append(
                    sample(
                        self.lm,
                        ids,
                        mask,
                        max_new_tokens=params.max_new_tokens,
                        temperature=params.temperature,
                        eos_token_id=params.eos_token_id,
                        pad_token_id=params.pad_token_id,
                        generator=generator,
                        with_scores=params.with_scores,
                        num_samples=k,
                        early_exit=self.early_exit,
                        decoder=self.decoder,
                        share_prefix=self.share_prefix,
                    )
                )
        R = max(c.response_ids.shape[1] for c in chunks)
        back = None
        if order is not None:  # output row (sorted prompt j, sample s) -> the input order again
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(n, device=order.device)
            back = (inverse.repeat_interleave(k) * k + torch.arange(k, device=order.device).repeat(n)).cpu()

        def cat(ts: Sequence[torch.Tensor], value: float) -> torch.Tensor:
            out = _pad_cat(ts, R, value)
            return out if back is None else out[back.to(out.device)]

        response_ids = cat([c.response_ids for c in chunks], params.pad_token_id)
        with_scores = params.with_scores
        return Generation(
            response_ids=response_ids,
            finish_reasons=finish_reasons(response_ids, params.eos_token_id),
            n_forward_tokens=sum(c.n_forward_tokens for c in chunks),
            logprobs=cat([c.logprobs for c in chunks], 0.0) if with_scores else None,
            entropy=cat([c.entropy for c in chunks], 0.0) if with_scores else None,
            hidden=cat([c.hidden for c in chunks], 0.0) if with_scores else None,
        )
