"""The PPO math on small hand-made tensors, each function against its textbook formula."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.ppo import core


def test_response_mask_stops_after_first_eos_and_keeps_it() -> None:
    eos = 9
    ids = torch.tensor([[5, 6, eos, 7, eos], [5, 6, 7, 8, 1], [eos, 3, 3, 3, 3]])
    mask = core.response_mask(ids, eos)
    assert mask.tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, True],
        [True, False, False, False, False],
    ]
    assert core.ends_with_eos(ids, eos).tolist() == [True, False, True]
    assert core.last_token_index(mask).tolist() == [2, 4, 0]


def test_masked_mean_var_whiten_ignore_masked_positions() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert core.masked_mean(x, m).item() == pytest.approx(valid.mean().item())
    assert core.masked_var(x, m).item() == pytest.approx(valid.var(unbiased=True).item())
    assert core.masked_var(x, m, unbiased=False).item() == pytest.approx(valid.var(unbiased=False).item())
    assert core.masked_mean(x, m, dim=1).tolist() == pytest.approx([2.0, 4.5])
    w = core.masked_whiten(x, m)
    vals = w[m.bool()]
    assert vals.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert vals.var(unbiased=True).item() == pytest.approx(1.0, rel=1e-4)
    assert w[~m.bool()].abs().sum().item() == 0.0  # masked positions are zeroed, never leak
    # shift_mean=False keeps the mean and makes the spread 1 (TRL's reward whitening)
    w2 = core.masked_whiten(x, m, shift_mean=False)
    assert w2[m.bool()].mean().item() == pytest.approx(valid.mean().item(), rel=1e-5)
    assert w2[m.bool()].std().item() == pytest.approx(1.0, rel=1e-4)


def test_logprobs_and_entropy_from_logits() -> None:
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, -1.0, 0.5]]])
    tokens = torch.tensor([[3, 0]])
    lp = core.logprobs_from_logits(logits, tokens)
    p2 = torch.softmax(logits[0, 1], -1)
    assert lp[0, 0].item() == pytest.approx(math.log(0.25))
    assert lp[0, 1].item() == pytest.approx(math.log(p2[0].item()))
    ent = core.entropy_from_logits(logits)
    assert ent[0, 0].item() == pytest.approx(math.log(4))
    assert ent[0, 1].item() == pytest.approx(-(p2 * p2.log()).sum().item(), rel=1e-6)


def test_kl_estimators_match_schulman_formulas() -> None:
    lp = torch.tensor([-1.0, -2.0, -0.5])  # policy
    ref = torch.tensor([-1.5, -1.0, -0.5])  # reference
    log_r = ref - lp  # log q/p
    assert core.kl_per_token(lp, ref, "k1").tolist() == pytest.approx((-log_r).tolist())
    assert core.kl_per_token(lp, ref, "k2").tolist() == pytest.approx((0.5 * log_r**2).tolist())
    k3 = core.kl_per_token(lp, ref, "k3")
    assert k3.tolist() == pytest.approx(((log_r.exp() - 1) - log_r).tolist())
    assert bool((k3 >= 0).all())  # k3 is never negative
    assert core.kl_per_token(lp, lp, "k1").abs().sum().item() == 0.0
    with pytest.raises(ValueError):
        core.kl_per_token(lp, ref, "k4")  # type: ignore[arg-type]


def test_kl_estimators_are_unbiased_on_samples() -> None:
    """k1 and k3 estimate KL(p||q) without bias: their sample mean approaches the exact KL."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.3, 0.3, 0.4])
    exact = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    lp, lq = p.log()[x], q.log()[x]
    assert core.kl_per_token(lp, lq, "k1").mean().item() == pytest.approx(exact, abs=0.01)
    assert core.kl_per_token(lp, lq, "k3").mean().item() == pytest.approx(exact, abs=0.01)


def test_fixed_kl_controller_never_moves() -> None:
    ctl = core.FixedKLController(0.1)
    ctl.update(100.0, 64)
    assert ctl.value == 0.1


def test_adaptive_kl_controller_follows_ziegler() -> None:
    ctl = core.AdaptiveKLController(0.2, target=6.0, horizon=10_000, error_clip=0.2)
    ctl.update(current_kl=9.0, n_steps=256)  # error = 9/6 - 1 = 0.5, clipped to 0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10_000))
    before = ctl.value
    ctl.update(current_kl=5.4, n_steps=256)  # error = -0.1 (inside the clip)
    assert ctl.value == pytest.approx(before * (1 - 0.1 * 256 / 10_000))
    # KL on target: no change; state round-trips
    v = ctl.value
    ctl.update(6.0, 1000)
    assert ctl.value == pytest.approx(v)
    other = core.AdaptiveKLController(1.0, 6.0, 10_000, 0.2)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value


def test_per_token_rewards_put_score_on_last_valid_token() -> None:
    kl = torch.tensor([[0.5, 0.1, 0.2, 9.0], [0.3, 0.3, 0.3, 0.3]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    scores = torch.tensor([2.0, -1.0])
    rewards, non_score = core.per_token_rewards(scores, kl, mask, kl_coef=0.1)
    expected = torch.tensor([[-0.05, -0.01, -0.02 + 2.0, 0.0], [-0.03, -0.03, -0.03, -0.03 - 1.0]])
    assert torch.allclose(rewards, expected)
    assert non_score[0, 3].item() == 0.0  # nothing after EOS


def _gae_direct(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """A_t = sum_l (gamma*lam)^l * delta_{t+l}, delta_t = r_t + gamma*V_{t+1} - V_t, V after the end = 0."""
    T = len(rewards)
    v_next = values[1:] + [0.0]
    deltas = [rewards[t] + gamma * v_next[t] - values[t] for t in range(T)]
    return [sum((gamma * lam) ** k * deltas[t + k] for k in range(T - t)) for t in range(T)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_the_direct_sum(gamma: float, lam: float) -> None:
    gen = torch.Generator().manual_seed(1)
    rewards = torch.randn(3, 6, generator=gen)
    values = torch.randn(3, 6, generator=gen)
    lengths = [6, 4, 1]
    mask = torch.zeros(3, 6, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    # garbage after the end must not matter
    rewards_noisy = torch.where(mask, rewards, torch.full_like(rewards, 1e3))
    values_noisy = torch.where(mask, values, torch.full_like(values, -1e3))
    adv, ret = core.compute_gae(rewards_noisy, values_noisy, mask, gamma, lam)
    for i, n in enumerate(lengths):
        want = _gae_direct(rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam)
        assert adv[i, :n].tolist() == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert ret[i, :n].tolist() == pytest.approx(
            [a + v for a, v in zip(want, values[i, :n].tolist(), strict=True)], abs=1e-5
        )
        assert adv[i, n:].abs().sum().item() == 0.0


def test_gae_with_lambda_one_is_the_monte_carlo_return_minus_value() -> None:
    rewards = torch.tensor([[0.0, -0.1, 1.0]])
    values = torch.tensor([[0.3, 0.2, 0.1]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv, ret = core.compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert ret[0].tolist() == pytest.approx([0.9, 0.9, 1.0])
    assert adv[0].tolist() == pytest.approx([0.6, 0.7, 0.9])


def test_policy_loss_matches_clipped_surrogate_formula() -> None:
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    new = torch.tensor([[-0.5, -1.5, -1.05, 0.0]])  # ratios e^.5, e^-.5, e^-.05, e^1 (last is masked)
    adv = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0]]).bool()
    eps = 0.2
    out = core.policy_loss(new, old, adv, mask, eps)
    ratio = (new - old).exp()[0, :3]
    a = adv[0, :3]
    per_token = torch.max(-a * ratio, -a * ratio.clamp(1 - eps, 1 + eps))
    assert out.loss.item() == pytest.approx(per_token.mean().item())
    # by hand: token 0 clipped at 1.2 (A>0), token 1 clipped at 0.8 (A<0), token 2 inside
    assert per_token.tolist() == pytest.approx([-1.2, 1.6, -0.5 * math.exp(-0.05)], rel=1e-6)
    assert out.clip_frac.item() == pytest.approx(2 / 3)
    log_r = (new - old)[0, :3]
    assert out.approx_kl.item() == pytest.approx(((log_r.exp() - 1) - log_r).mean().item())
    # gradient flows only through unclipped tokens
    new_req = new.clone().requires_grad_(True)
    core.policy_loss(new_req, old, adv, mask, eps).loss.backward()
    g = new_req.grad[0]
    assert g[0].item() == 0.0 and g[1].item() == 0.0 and g[3].item() == 0.0
    assert g[2].item() == pytest.approx(-0.5 * math.exp(-0.05) / 3)


def test_policy_loss_is_minus_advantage_when_nothing_moved() -> None:
    lp = torch.tensor([[-1.0, -2.0]])
    adv = torch.tensor([[0.5, -1.5]])
    out = core.policy_loss(lp, lp, adv, torch.ones(1, 2, dtype=torch.bool), 0.2)
    assert out.loss.item() == pytest.approx(0.5)  # mean(-A) = mean(-0.5, 1.5)
    assert out.approx_kl.item() == 0.0 and out.clip_frac.item() == 0.0 and out.ratio_mean.item() == 1.0


def test_value_loss_matches_clipped_formula() -> None:
    old_v = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    new_v = torch.tensor([[0.5, -0.1, 1.1, 0.0]])
    returns = torch.tensor([[1.0, -1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]]).bool()
    out = core.value_loss(new_v, old_v, returns, mask, 0.2)
    v_clip = old_v + (new_v - old_v).clamp(-0.2, 0.2)
    per = torch.max((new_v - returns) ** 2, (v_clip - returns) ** 2)[0, :3]
    assert out.loss.item() == pytest.approx(0.5 * per.mean().item())
    # token 0: unclipped 0.25, clipped (0.2-1)^2=0.64 -> 0.64; token 1: 0.81 vs 0.81; token 2: 1.21 vs 1.21
    assert per.tolist() == pytest.approx([0.64, 0.81, 1.21])
    assert out.clip_frac.item() == pytest.approx(1 / 3)


def test_lr_multiplier_warmup_then_decay() -> None:
    f = core.lr_multiplier
    assert [f(u, 10, 2, "linear", 0.0) for u in (0, 1)] == [0.5, 1.0]
    assert f(2, 10, 2, "linear", 0.0) == 1.0
    assert f(6, 10, 2, "linear", 0.0) == pytest.approx(0.5)
    assert f(10, 10, 2, "linear", 0.1) == pytest.approx(0.1)
    assert f(6, 10, 2, "cosine", 0.0) == pytest.approx(0.5)
    assert f(9, 10, 0, "constant", 0.0) == 1.0
    with pytest.raises(ValueError):
        f(5, 10, 0, "exponential", 0.0)
