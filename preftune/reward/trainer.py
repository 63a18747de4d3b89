"""The pairwise reward-model training loop.

A plain PyTorch loop rather than ``transformers.Trainer``: the step needs exactly one batched
forward per pair batch (chosen and rejected concatenated, then split), weighted pairs,
early stopping with best-weight restore and figures in MLflow, and nothing else; a small loop
is faster (see ``benchmarks/reward_bench.py``) and easier to reason about than a general one.

Memory stays flat over an epoch at real sizes (``docs/benchmarks.md``: a 22 M-parameter MiniLM
on HH-RLHF with ``max_length`` 256): a batch of long pairs is cut into micro-batches under a
token budget (``reward.max_tokens_per_forward``; the gradient is the same), attention dropout is
off so PyTorch's fused attention kernels apply (no ``heads x length x length`` probability
tensors kept for the backward pass), and on glibc large freed blocks go back to the OS instead of
fragmenting the heap (:func:`release_freed_memory`). Gradient checkpointing and bf16 autocast
are options.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from preftune.reward.config import RewardSection
from preftune.reward.data import TokenizedPairs
from preftune.reward.losses import bradley_terry_loss
from preftune.reward.metrics import pairwise_accuracy
from preftune.scoring.batching import length_bucketed_batches, pad_right
from preftune.scoring.model import rewards_of

MetricsCallback = Callable[[dict[str, float], int], None]

log = logging.getLogger(__name__)

MAX_GRAD_NORM = 1.0
LOG_EVERY = 10  # optimiser steps between training-metric records
MIN_IMPROVEMENT = 1e-4  # eval-loss decrease that counts as an improvement for early stopping


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    margin: float  # mean r_c - r_r
    chosen: np.ndarray
    rejected: np.ndarray


@dataclass
class FitResult:
    optimizer_steps: int
    pairs_seen: int
    seconds: float
    best_step: int | None
    best_val_loss: float | None
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def pairs_per_second(self) -> float:
        return self.pairs_seen / self.seconds if self.seconds > 0 else float("nan")


class DivergedError(RuntimeError):
    """The loss became NaN or infinite."""


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_MMAP_THRESHOLD_BYTES = 1 << 20
_malloc_tuned = False


def release_freed_memory() -> None:
    """On glibc: serve allocations over 1 MiB with mmap (returned to the OS when freed) and trim the heap.

    Why: glibc raises its mmap threshold dynamically (up to 32 MiB) after the first large free,
    so the activation tensors of a training step (a few MiB each, a different shape every
    length-grouped batch) land in the heap and fragment it; resident memory then grows batch
    after batch although PyTorch frees everything. A fixed threshold stops that. No-op elsewhere.
    """
    global _malloc_tuned
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to do
        return
    if not _malloc_tuned:
        _malloc_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))
    libc.malloc_trim(0)


def micro_batches(idx: np.ndarray, width: int, max_tokens: int) -> list[np.ndarray]:
    """Split pair indices so one forward (2 rows per pair, padded to ``width``) stays under ``max_tokens``."""
    per = max(1, max_tokens // max(2 * width, 1))
    return [idx[i : i + per] for i in range(0, len(idx), per)]


def disable_dropout(model: Any) -> int:
    """Set every dropout probability to 0 (modules and attention configs); returns how many modules changed.

    Reward models are usually trained without dropout (it adds noise to a pairwise difference of
    two forwards that should see the same network) and without attention dropout PyTorch's fused
    attention kernels apply on CPU and GPU, which keep no attention-probability tensors.
    """
    n = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout) and mod.p > 0:
            mod.p = 0.0
            n += 1
        for attr in ("dropout_prob", "attention_dropout"):
            if isinstance(getattr(mod, attr, None), float) and getattr(mod, attr) > 0:
                setattr(mod, attr, 0.0)
                n += 1
    cfg = getattr(model, "config", None)
    for key in ("attention_probs_dropout_prob", "hidden_dropout_prob", "attention_dropout", "dropout", "resid_pdrop"):
        if cfg is not None and isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, 0.0)
    return n


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``reward.precision`` on ``device``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():  # auto
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class PairwiseRewardTrainer:
    """Trains a one-output sequence classifier with the (weighted, conservative) BT loss.

    ``settings`` is the run config's ``reward`` section itself (:class:`preftune.reward.config.RewardSection`:
    one place for the knobs and their defaults); ``seed`` (the run seed) orders the batches.
    """

    def __init__(
        self,
        model: Any,
        pad_token_id: int,
        settings: RewardSection,
        device: torch.device,
        *,
        seed: int = 0,
        on_metrics: MetricsCallback | None = None,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.s = settings
        self.seed = seed
        self.device = device
        self.on_metrics = on_metrics
        self.progress = progress
        self._autocast = autocast_for(device, settings.precision)

    # -- forward ---------------------------------------------------------------------------

    def _batch_tensors(self, data: TokenizedPairs, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [data.chosen[i] for i in idx] + [data.rejected[i] for i in idx]
        ids, mask = pad_right(seqs, self.pad_token_id)
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)

    def pair_rewards(self, data: TokenizedPairs, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen and rejected rewards of the pairs ``idx`` from ONE forward over 2*len(idx) rows."""
        ids, mask = self._batch_tensors(data, idx)
        with self._autocast:
            rewards = rewards_of(self.model, ids, mask, self.s.pooling)
        return rewards[: len(idx)], rewards[len(idx) :]

    def _width(self, data: TokenizedPairs, idx: np.ndarray) -> int:
        return max(max(len(data.chosen[i]), len(data.rejected[i])) for i in idx)

    def _split(self, data: TokenizedPairs, idx: np.ndarray) -> list[np.ndarray]:
        return micro_batches(idx, self._width(data, idx), self.s.max_tokens_per_forward)

    @torch.inference_mode()
    def predict(self, data: TokenizedPairs, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rewards of every pair's chosen and rejected text, in the data's order."""
        was_training = self.model.training
        self.model.eval()
        chosen = np.zeros(len(data), dtype=np.float32)
        rejected = np.zeros(len(data), dtype=np.float32)
        try:
            for batch in length_bucketed_batches(data.lengths(), batch_size or 2 * self.s.batch_size, rng=None):
                for idx in self._split(data, batch):
                    r_c, r_r = self.pair_rewards(data, idx)
                    chosen[idx] = r_c.float().cpu().numpy()
                    rejected[idx] = r_r.float().cpu().numpy()
        finally:
            self.model.train(was_training)
        return chosen, rejected

    def evaluate(self, data: TokenizedPairs, batch_size: int | None = None) -> EvalResult:
        chosen, rejected = self.predict(data, batch_size)
        loss = bradley_terry_loss(
            torch.from_numpy(chosen),
            torch.from_numpy(rejected),
            margin=self.s.margin,
            label_smoothing=self.s.label_smoothing,
            weights=torch.from_numpy(data.weights),
        ).item()
        return EvalResult(
            loss=float(loss),
            accuracy=pairwise_accuracy(chosen, rejected),
            margin=float(np.mean(chosen - rejected)),
            chosen=chosen,
            rejected=rejected,
        )

    # -- training --------------------------------------------------------------------------

    def _optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.s.lr)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        """Copy of the trainable weights (all of them in full mode; adapters + head with LoRA)."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad}

    def _restore(self, snap: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in snap.items():
                params[n].copy_(t.to(params[n].device))

    def _emit(self, metrics: dict[str, float], step: int) -> None:
        if self.on_metrics is not None:
            self.on_metrics(metrics, step)

    def fit(self, train: TokenizedPairs, val: TokenizedPairs | None = None) -> FitResult:
        """Train; with ``val``, evaluate every ``eval_every`` steps, stop early, keep the best weights."""
        from transformers import get_linear_schedule_with_warmup

        s = self.s
        rng = np.random.default_rng(self.seed)
        lengths = train.lengths()
        batches_per_epoch = math.ceil(len(train) / s.batch_size)
        steps_per_epoch = math.ceil(batches_per_epoch / s.grad_accum)
        total_steps = steps_per_epoch * s.epochs
        optimizer = self._optimizer()
        scheduler = get_linear_schedule_with_warmup(
            optimizer, num_warmup_steps=int(round(s.warmup_ratio * total_steps)), num_training_steps=total_steps
        )
        weights = torch.from_numpy(train.weights)

        best_loss: float | None = None
        best_step: int | None = None
        best_snap: dict[str, torch.Tensor] | None = None
        bad_evals = 0
        stopped_early = False
        history: list[dict[str, float]] = []
        step = 0
        pairs_seen = 0
        window = {"loss": 0.0, "weight": 0.0, "correct": 0.0, "n": 0, "margin": 0.0}

        def run_eval() -> bool:
            """Evaluate on ``val``; True when training should stop."""
            nonlocal best_loss, best_step, best_snap, bad_evals
            res = self.evaluate(val)  # type: ignore[arg-type]
            release_freed_memory()
            rec = {"reward.val.loss": res.loss, "reward.val.accuracy": res.accuracy, "reward.val.margin": res.margin}
            self._emit(rec, step)
            history.append({"step": float(step), **rec})
            if best_loss is None or res.loss < best_loss - MIN_IMPROVEMENT:
                best_loss, best_step, best_snap, bad_evals = res.loss, step, self._snapshot(), 0
                return False
            bad_evals += 1
            return s.early_stopping_patience > 0 and bad_evals >= s.early_stopping_patience

        release_freed_memory()
        self.model.train()
        t0 = time.perf_counter()
        bar = tqdm(  # optimiser steps, with elapsed < remaining (the ETA) and the rate
            total=total_steps,
            desc="train-reward",
            unit="step",
            dynamic_ncols=True,
            disable=not self.progress,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
        )
        try:
            for _epoch in range(s.epochs):
                batches = length_bucketed_batches(lengths, s.batch_size, rng)
                for g in range(0, len(batches), s.grad_accum):
                    group = batches[g : g + s.grad_accum]
                    total_w = float(sum(weights[idx].sum() for idx in group))
                    for idx in (m for b in group for m in self._split(train, b)):
                        r_c, r_r = self.pair_rewards(train, idx)
                        w = weights[idx].to(self.device)
                        loss_sum = bradley_terry_loss(
                            r_c, r_r, margin=s.margin, label_smoothing=s.label_smoothing, weights=w, reduction="sum"
                        )
                        (loss_sum / total_w).backward()
                        with torch.no_grad():
                            window["loss"] += float(loss_sum)
                            window["weight"] += float(w.sum())
                            window["correct"] += float((r_c > r_r).float().sum() + 0.5 * (r_c == r_r).float().sum())
                            window["margin"] += float((r_c - r_r).sum())
                            window["n"] += len(idx)
                        pairs_seen += len(idx)
                    if not math.isfinite(window["loss"]):
                        raise DivergedError(f"reward-model loss became {window['loss']} at optimiser step {step + 1}")
                    torch.nn.utils.clip_grad_norm_(
                        [p for p in self.model.parameters() if p.requires_grad], MAX_GRAD_NORM
                    )
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    bar.update(1)
                    if step % LOG_EVERY == 0 or step == total_steps:
                        elapsed = time.perf_counter() - t0
                        eta = elapsed / step * (total_steps - step)
                        rec = {
                            "reward.train.loss": window["loss"] / max(window["weight"], 1e-12),
                            "reward.train.accuracy": window["correct"] / max(window["n"], 1),
                            "reward.train.margin": window["margin"] / max(window["n"], 1),
                            "reward.train.lr": scheduler.get_last_lr()[0],
                            "reward.train.pairs_per_s": pairs_seen / max(elapsed, 1e-9),
                            "reward.train.eta_s": eta,
                        }
                        self._emit(rec, step)
                        history.append({"step": float(step), **rec})
                        if not (self.progress and sys.stderr.isatty()):
                            log.info(
                                "train-reward: step %d/%d, %.1f pairs/s, loss %.3f, ETA %s (without evaluations)",
                                step,
                                total_steps,
                                rec["reward.train.pairs_per_s"],
                                rec["reward.train.loss"],
                                time.strftime("%H:%M:%S", time.gmtime(eta)),
                            )
                        bar.set_postfix(
                            loss=f"{rec['reward.train.loss']:.3f}", acc=f"{rec['reward.train.accuracy']:.2f}"
                        )
                        window = dict.fromkeys(window, 0.0)
                        window["n"] = 0
                    if val is not None and len(val) and step % s.eval_every == 0 and step < total_steps:
                        if run_eval():
                            stopped_early = True
                            break
                release_freed_memory()
                if stopped_early:
                    break
            if val is not None and len(val) and not stopped_early:
                run_eval()
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
        if best_snap is not None and best_step != step:
            self._restore(best_snap)
        self.model.eval()
        return FitResult(
            optimizer_steps=step,
            pairs_seen=pairs_seen,
            seconds=seconds,
            best_step=best_step,
            best_val_loss=best_loss,
            stopped_early=stopped_early,
            history=history,
        )
