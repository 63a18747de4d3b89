"""The PPO math, pure and small: masks, whitening, KL estimators and controllers, GAE, losses.

Everything here works on plain tensors of shape ``(batch, response_tokens)`` with a 0/1 (or
bool) ``mask`` that is 1 on the response tokens that count (up to and including the first EOS)
and 0 on padding and on anything sampled after EOS. No model, no config object, no I/O: the
trainer passes numbers in and gets tensors back, and ``tests/test_ppo_core.py`` checks each
function against its textbook formula on hand-made tensors.

References: CleanRL's ``ppo.py``; Huang et al., "The N Implementation Details of RLHF with PPO"
(2024); Ziegler et al., "Fine-Tuning Language Models from Human Preferences" (2019); Schulman,
"Approximating KL Divergence" (2020).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

KLEstimator = Literal["k1", "k2", "k3"]
KLStep = Literal["linear", "log", "log_pd"]


# ---------------------------------------------------------------------------------------
# Masks


def response_mask(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 on every response token up to and including the first EOS, 0 after it (bool, same shape).

    Tokens sampled after EOS (a batch keeps generating until its last row stops) are not part of
    the response: they get no reward, no KL, no value target and no gradient.
    """
    is_eos = response_ids == eos_token_id
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS strictly before each position
    return eos_before == 0


def ends_with_eos(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """True for rows that contain an EOS (the response stopped by itself, not at max_new_tokens)."""
    return (response_ids == eos_token_id).any(dim=1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each row (where the sequence-level reward is placed)."""
    lengths = mask.long().sum(dim=1)
    return (lengths - 1).clamp(min=0)


# ---------------------------------------------------------------------------------------
# Masked statistics


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (values * mask).sum() if dim is None else (values * mask).sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the positions where ``mask`` is 1 (token-level mean when ``dim`` is None)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim=dim) / mask.sum(dim=dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked positions (Bessel-corrected by default)."""
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n > 1:
            var = var * n / (n - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions; ``shift_mean=False`` keeps the mean (unit spread).

    Positions outside the mask are returned as 0 so they cannot leak into a later sum.
    """
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# ---------------------------------------------------------------------------------------
# Log-probabilities and entropy


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under ``logits`` (batch, T, vocab) for ``tokens`` (batch, T), computed in float32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution per position: logsumexp(z) - sum softmax(z) * z."""
    logits = logits.float()
    probs = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


# ---------------------------------------------------------------------------------------
# KL to the reference


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of the sampled tokens.

    With log r = log q(x) - log p(x) for x ~ p (p: policy, q: reference), Schulman's estimators:
    k1 = -log r (unbiased, can be negative), k2 = (log r)^2 / 2 (low variance, biased),
    k3 = (r - 1) - log r (unbiased, never negative).
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:  # noqa: ARG002 (same interface as adaptive)
        return None

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019), eq. 2: a proportional controller that steers the KL towards a target.

    e = clip(KL / target - 1, -error_clip, +error_clip), then with ``step``

    - ``"linear"`` (Ziegler; TRL, OpenRLHF and verl do the same): beta <- beta * (1 + e * n_steps / horizon);
    - ``"log"``: beta <- beta * exp(e * n_steps / horizon), the same proportional step in log beta: as fast down
      as up (x and / by the same factor), never negative, and over ``R`` responses beta moves by at most
      e^(error_clip * R / horizon) either way;
    - ``"log_pd"``: the log step with a derivative (damping) term, u = clip(e + damping * (s - s_prev),
      -error_clip, +error_clip) and beta <- beta * exp(u * n_steps / horizon), where d = log(max(KL, error_clip
      * target) / target) is the log error, unclipped, and s <- s + smoothing * (d - s) its exponential average
      (the derivative's filter: one batch's KL is noisy). The KL answers beta several updates late (beta
      integrates e and the KL integrates beta), and a derivative term is the phase lead that damps such a loop:
      it holds beta while the KL already moves towards the target fast enough. ``damping`` 0 is the ``"log"``
      step; ``smoothing`` 1 differentiates the raw log error.

    With ``ramp_updates`` > 0 the target of the ``u``-th update is ``target * min(1, u / ramp_updates)``: a
    reference trajectory. The policy starts AT the reference, so its first KLs are near 0 whatever the
    coefficient; against the full target those updates only push the coefficient down (windup), and a low start
    then lets the KL run away before the controller turns. ``ramp_updates`` 0: the fixed target (Ziegler).

    ``current_kl`` is the mean KL per response (nats), ``n_steps`` the responses in the batch, ``horizon`` in
    responses (a float: it may be derived from the run's length, see ``preftune.ppo.setup``).
    """

    def __init__(
        self,
        init_kl_coef: float,
        target: float,
        horizon: float,
        error_clip: float,
        step: KLStep = "linear",
        ramp_updates: float = 0.0,
        damping: float = 0.0,
        smoothing: float = 1.0,
    ) -> None:
        if step not in ("linear", "log", "log_pd"):
            raise ValueError(f"unknown KL controller step {step!r}; expected 'linear', 'log' or 'log_pd'")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)
        self.error_clip = float(error_clip)
        self.step = step
        self.ramp_updates = float(ramp_updates)
        self.n_updates = 0  # updates seen: where on the target's ramp the next one is (checkpointed)
        self.damping = float(damping)
        self.smoothing = float(smoothing)
        self.smoothed_log_error: float | None = None  # log_pd: the filtered log error so far (checkpointed)

    def target_at(self, update: int) -> float:
        """The target of the ``update``-th update (1-based)."""
        if self.ramp_updates <= 0:
            return self.target
        return self.target * min(1.0, update / self.ramp_updates)

    def update(self, current_kl: float, n_steps: int) -> None:
        self.n_updates += 1
        target = self.target_at(self.n_updates)
        proportional_error = min(max(current_kl / target - 1.0, -self.error_clip), self.error_clip)
        if self.step == "log_pd":
            log_error = math.log(max(current_kl, self.error_clip * target) / target)  # floor: k1 KL may be <= 0
            prev = log_error if self.smoothed_log_error is None else self.smoothed_log_error
            self.smoothed_log_error = prev + self.smoothing * (log_error - prev)  # trick: filtered derivative
            change = self.smoothed_log_error - prev
            u = proportional_error + self.damping * change  # trick: derivative term damps the lagged KL (PD)
            u = min(max(u, -self.error_clip), self.error_clip)  # trick: same clip as P: the reach is unchanged
            self.value *= math.exp(u * n_steps / self.horizon)
        elif self.step == "log":
            self.value *= math.exp(proportional_error * n_steps / self.horizon)
        else:
            self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def max_factor(self, n_steps: int) -> float:
        """The most one update of ``n_steps`` responses can multiply the coefficient by (up; down is the
        reciprocal for ``log``, ``1 - error_clip * n_steps / horizon`` for ``linear``)."""
        x = self.error_clip * n_steps / self.horizon
        return 1.0 + x if self.step == "linear" else math.exp(x)

    def state_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "n_updates": self.n_updates, "smoothed_log_error": self.smoothed_log_error}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.value = float(state["value"])  # type: ignore[arg-type]
        self.n_updates = int(state.get("n_updates") or 0)  # checkpoints from before the ramp: only the ramp reads it
        smoothed = state.get("smoothed_log_error")  # checkpoints from before log_pd: no derivative on the next update
        self.smoothed_log_error = None if smoothed is None else float(smoothed)


KLController = FixedKLController | AdaptiveKLController


def per_token_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards per token: -kl_coef * KL on every response token, plus the score on the last one.

    Returns ``(rewards, non_score_rewards)``; both are 0 outside ``mask``.
    """
    mask_f = mask.to(kl.dtype)
    non_score = -kl_coef * kl * mask_f  # trick: KL penalty in the reward, per token
    rewards = non_score.clone()
    last = last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype) * mask_f[rows, last]  # trick: score only at the final token
    return rewards, non_score


# ---------------------------------------------------------------------------------------
# Advantages


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's valid tokens; returns (advantages, returns).

    The valid tokens of a row are a prefix (response up to EOS). The state after the last valid
    token is terminal, so it bootstraps with value 0; padded positions get advantage 0 and
    return = value (i.e. no value loss there once masked).
    """
    mask_f = mask.to(values.dtype)
    values = values * mask_f
    rewards = rewards * mask_f
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_mask = mask_f[:, t + 1] if t + 1 < T else torch.zeros_like(mask_f[:, t])
        next_value = values[:, t + 1] * next_mask if t + 1 < T else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * next_mask * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * mask_f
    returns = advantages + values
    return advantages, returns


# ---------------------------------------------------------------------------------------
# Losses


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor
    clip_frac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> PolicyLossOutput:
    """Clipped surrogate: mean over valid tokens of max(-A * r, -A * clip(r, 1 - eps, 1 + eps))."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # trick: clipped surrogate
    loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    with torch.no_grad():
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)  # trick: k3 approx KL (CleanRL)
        clip_frac = masked_mean(((ratio - 1.0).abs() > clip_range).to(ratio.dtype), mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLossOutput(loss=loss, clip_frac=clip_frac, approx_kl=approx_kl, ratio_mean=ratio_mean)


@dataclass
class ValueLossOutput:
    loss: torch.Tensor
    clip_frac: torch.Tensor


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> ValueLossOutput:
    """Clipped value loss: 0.5 * mean over valid tokens of max((v - R)^2, (v_clipped - R)^2)."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (v_clipped - returns) ** 2  # trick: value clipping around the rollout's values
    loss = 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask)
    return ValueLossOutput(loss=loss, clip_frac=clip_frac)


# ---------------------------------------------------------------------------------------
# Learning-rate schedule


def lr_multiplier(update: int, total_updates: int, warmup_updates: int, schedule: str, min_ratio: float) -> float:
    """Learning rate of ``update`` (0-based) as a share of the peak: linear warm-up, then decay."""
    if warmup_updates > 0 and update < warmup_updates:
        return (update + 1) / warmup_updates
    if schedule == "constant":
        return 1.0
    span = max(1, total_updates - warmup_updates)
    progress = min(1.0, max(0.0, (update - warmup_updates) / span))
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}")
    return min_ratio + (1.0 - min_ratio) * decay
