"""The decode step on a static KV cache, compiled with ``torch.compile`` (``ppo.rollout_compile``).

The eager sampler grows a ``DynamicCache`` by one column per new token, so every decode step has
new tensor shapes and nothing can be compiled ahead. Here the prompt is prefilled as before (eager,
the same forward as the eager sampler, so the first token's distribution is the same), its cache
is copied into a transformers ``StaticCache`` of fixed length, and every later step is the same
one-token forward over fixed shapes: ``(rows, 1)`` token ids, a ``(rows, cache_len)`` padding mask
(zeros past the current position), ``(rows, 1)`` positions. That step is what ``torch.compile``
compiles once per (rows, cache length) and reuses for every token and every rollout.

The cache length is ``prompt + max_new_tokens`` rounded up to a multiple of
``ppo.rollout_compile_bucket``, so prompt batches of slightly different lengths share one
compiled graph. The positions past the current token are masked out, so they only cost attention
FLOPs over zeros; the log-probs agree with the eager sampler to float rounding (the softmax over
the longer, masked row sums in another order; ~1e-6 on CPU fp32, tested), and the sampled tokens
are the same in the tests.

Fallback: when ``torch.compile`` is missing, or compiling or running the compiled step fails
(no C++ compiler, an unsupported Python, a model dynamo cannot trace), the same static-cache step
runs eagerly; the reason is logged once per process. The cache counters are restored before the
eager retry, so a failed compiled call leaves nothing behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

_WARNED: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        log.warning("rollout_compile: the compiled decode step is unavailable (%s); decoding eagerly", reason)


def cache_length(prompt_len: int, max_new_tokens: int, bucket: int) -> int:
    """``prompt_len + max_new_tokens`` rounded up to a multiple of ``bucket``."""
    need = prompt_len + max_new_tokens
    return -(-need // bucket) * bucket


def static_from_dynamic(dynamic: Any, config: Any, max_cache_len: int) -> Any:
    """A ``StaticCache`` of ``max_cache_len`` positions holding a copy of ``dynamic``'s keys and values."""
    from transformers import StaticCache

    static = StaticCache(config=config, max_cache_len=max_cache_len)
    if len(static.layers) != len(dynamic.layers):
        raise ValueError(f"cache layers differ: static {len(static.layers)}, dynamic {len(dynamic.layers)}")
    for src, dst in zip(dynamic.layers, static.layers, strict=True):
        keys, values = src.keys, src.values
        dst.lazy_initialization(keys, values)
        length = keys.shape[2]
        dst.keys[:, :, :length].copy_(keys)
        dst.values[:, :, :length].copy_(values)
        dst.cumulative_length.fill_(length)
    return static


class StaticDecoder:
    """One-token decode steps on a ``StaticCache``; compiled with ``torch.compile`` unless that fails.

    Kept by the engine for the whole run: the compiled graphs (one per rows x cache length) are
    reused by every rollout.
    """

    def __init__(self, lm: Any, *, bucket: int, compile_step: bool = True) -> None:
        self.lm = lm
        self.bucket = bucket
        self.compiled: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None
        self.failed: str | None = None
        self.compile_step = compile_step
        if compile_step:
            compile_fn = getattr(torch, "compile", None)
            if compile_fn is None:
                self._fail("this torch has no torch.compile")
            else:
                try:
                    self.compiled = compile_fn(self._step, dynamic=False)
                except Exception as err:  # noqa: BLE001 - any failure means: decode eagerly
                    self._fail(f"torch.compile raised {type(err).__name__}: {err}")

    @property
    def is_compiled(self) -> bool:
        """True while the compiled step is in use (False after a failure, or when compiling was not asked)."""
        return self.compiled is not None

    def _fail(self, reason: str) -> None:
        self.failed = reason
        self.compiled = None
        _warn_once(reason)

    def _step(
        self, token: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, cache: Any, with_hidden: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.lm(
            input_ids=token,
            attention_mask=mask,
            position_ids=position,
            cache=cache,
            use_cache=True,
            output_hidden_states=with_hidden,
        )
        hidden = out.hidden_states[-1][:, -1, :] if with_hidden else None
        return out.logits[:, -1, :], hidden

    def prepare(self, dynamic: Any, prompt_mask: torch.Tensor, max_new_tokens: int) -> tuple[Any, torch.Tensor]:
        """The static cache and its ``(rows, cache_len)`` padding mask (prompt mask, then zeros) after a prefill."""
        prompt_len = int(prompt_mask.shape[1])
        length = cache_length(prompt_len, max_new_tokens, self.bucket)
        config = self.lm.config
        static = static_from_dynamic(dynamic, config, length)
        mask = torch.zeros((prompt_mask.shape[0], length), dtype=prompt_mask.dtype, device=prompt_mask.device)
        mask[:, :prompt_len] = prompt_mask
        return static, mask

    def step(
        self, token: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, cache: Any, with_hidden: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (rows, vocab) and last hidden state (rows, H) or None for one new token per row."""
        if self.compiled is not None:
            counters = [layer.cumulative_length.clone() for layer in cache.layers]
            try:
                logits, hidden = self.compiled(token, mask, position, cache, with_hidden)
                # the compiled graph's outputs live in buffers it reuses: copy before the next step overwrites them
                return logits.clone(), hidden.clone() if hidden is not None else None
            except Exception as err:  # noqa: BLE001 - compile errors surface at the first call
                for layer, counter in zip(cache.layers, counters, strict=True):
                    layer.cumulative_length.copy_(counter)
                self._fail(f"the compiled decode step raised {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        return self._step(token, mask, position, cache, with_hidden)
