"""Critic warm-up (``ppo.critic_warmup_updates``): critic-only updates before PPO update 1, the policy frozen.

Only the critic's own parameters (the value head; the critic adapter or copy of a separate critic)
are in the warm-up's optimiser and get gradients, and its target is the Monte-Carlo return, so the
first PPO update takes its advantages against a critic that already predicts the reward. The
rollouts consume prompts and random streams like updates (a checkpoint after update 1 resumes
exactly) but do not count in ``ppo.updates``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from preftune.ppo import core, estimators
from preftune.ppo.config import PPOSection
from preftune.ppo.distributed import DistContext
from preftune.ppo.guards import Guards, all_finite
from preftune.ppo.policy import ActorCritic
from preftune.ppo.rollout import Rollout
from preftune.ppo.setup import MiniBatches


def warmup_critic(
    s: PPOSection,
    actor: ActorCritic,
    next_rollout: Callable[[], Rollout],
    kl_coef: float,
    batches: MiniBatches,
    guards: Guards,
    dist: DistContext,
    autocast: Callable[[], Any],
) -> list[float]:
    """``s.critic_warmup_updates`` critic-only updates on fresh rollouts; returns each one's mean value loss."""
    params = [p for _, p in actor.critic_named_parameters()]
    opt = torch.optim.AdamW(params, lr=s.lr * s.value_head_lr_ratio, eps=s.adam_eps)
    losses: list[float] = []
    for _ in range(s.critic_warmup_updates):
        ro = next_rollout()
        rewards, _ = core.per_token_rewards(ro.scores, ro.kl, ro.mask, kl_coef)
        if s.whiten_rewards:
            rewards = core.masked_whiten(rewards, ro.mask, shift_mean=False)
        target = estimators.reward_to_go(rewards, ro.mask, s.gamma)  # trick: Monte-Carlo returns as the target
        actor.train()
        total, n = 0.0, 0
        for _epoch in range(s.ppo_epochs):
            for mb in batches.epoch(ro.batch_size):
                opt.zero_grad(set_to_none=True)
                micros = batches.micro_batches(mb)
                for micro in micros:
                    loss = critic_loss(actor, ro, target, micro, autocast)
                    guards.check(0, None if all_finite(loss) else f"critic warm-up loss became {float(loss)}")
                    (loss / s.grad_accum_steps).backward()
                    total += float(loss.detach()) / len(micros)
                dist.average_gradients(params)
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                opt.step()
                n += 1
        losses.append(dist.mean(total / max(1, n)))
    return losses


def critic_loss(
    actor: ActorCritic, ro: Rollout, target: torch.Tensor, idx: torch.Tensor, autocast: Callable[[], Any]
) -> torch.Tensor:
    mask = ro.mask[idx]
    r_len = int(mask.sum(dim=1).max())
    mask = mask[:, :r_len]
    seq = torch.cat([ro.prompt_ids[idx], ro.response_ids[idx, :r_len]], dim=1)
    attn = torch.cat([ro.prompt_mask[idx], mask.long()], dim=1)
    with autocast():
        values = actor.critic_values(seq, attn, r_len).float()  # the policy's trunk gets no gradient
    return 0.5 * core.masked_mean((values - target[idx, :r_len]) ** 2, mask)  # trick: plain MSE in the warm-up
