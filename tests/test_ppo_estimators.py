"""The advantage estimators of preftune.ppo.estimators, each against its formula on hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from preftune.ppo import core, estimators
from preftune.ppo.config import PPOSection
from preftune.ppo.estimators import AdvantageInputs

# 2 prompts x 3 responses; rows of different lengths (mask is a prefix)
MASK = torch.tensor(
    [
        [1, 1, 1, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 1],
        [1, 0, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 0, 0],
    ]
).bool()
REWARDS = torch.tensor(
    [
        [-0.1, -0.2, 1.0, 9.0],
        [0.0, 2.0, 7.0, 7.0],
        [-0.1, 0.0, 0.1, -1.0],
        [3.0, 5.0, 5.0, 5.0],
        [0.2, -0.2, 0.5, 8.0],
        [-0.3, 0.4, 6.0, 6.0],
    ]
)
GROUPS = torch.tensor([0, 0, 0, 1, 1, 1])


def _returns() -> list[float]:
    return [sum(float(r) for r, m in zip(row, mrow, strict=True) if m) for row, mrow in zip(REWARDS, MASK, strict=True)]


def test_registry_has_the_four_estimators_with_their_needs() -> None:
    assert set(estimators.ESTIMATORS) == {"gae", "rloo", "grpo", "reinforce_pp"}
    assert estimators.get("gae").needs_critic
    assert not any(estimators.get(n).needs_critic for n in ("rloo", "grpo", "reinforce_pp"))
    assert estimators.get("rloo").min_samples_per_prompt == 2
    assert estimators.get("grpo").min_samples_per_prompt == 2
    assert estimators.get("reinforce_pp").min_samples_per_prompt == 1
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        estimators.get("ppo2")


def test_gae_entry_is_core_compute_gae() -> None:
    values = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    got = estimators.compute_advantages("gae", AdvantageInputs(REWARDS, MASK, values=values, gamma=0.9, lam=0.8))
    want = core.compute_gae(REWARDS, values, MASK, 0.9, 0.8)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="critic"):
        estimators.compute_advantages("gae", AdvantageInputs(REWARDS, MASK))


def test_rloo_is_return_minus_the_mean_of_the_others() -> None:
    adv, ret = estimators.compute_advantages("rloo", AdvantageInputs(REWARDS, MASK, group_ids=GROUPS))
    R = _returns()
    for i in range(6):
        g = [j for j in range(6) if GROUPS[j] == GROUPS[i] and j != i]
        want = R[i] - sum(R[j] for j in g) / len(g)
        assert adv[i][MASK[i]].tolist() == pytest.approx([want] * int(MASK[i].sum()), abs=1e-5)
        assert ret[i][MASK[i]].tolist() == pytest.approx([R[i]] * int(MASK[i].sum()), abs=1e-5)
    assert adv[~MASK].abs().sum() == 0 and ret[~MASK].abs().sum() == 0
    # equivalent form: k/(k-1) x (R_i - group mean); advantages of a group sum to 0
    for g in (0, 1):
        rows = (GROUPS == g).nonzero().flatten().tolist()
        mean = sum(R[i] for i in rows) / 3
        for i in rows:
            assert float(adv[i, 0]) == pytest.approx(1.5 * (R[i] - mean), abs=1e-5)
        assert sum(float(adv[i, 0]) for i in rows) == pytest.approx(0.0, abs=1e-5)


def test_grpo_standardises_the_return_within_its_group() -> None:
    adv, _ = estimators.compute_advantages("grpo", AdvantageInputs(REWARDS, MASK, group_ids=GROUPS, eps=0.0))
    R = torch.tensor(_returns())
    for g in (0, 1):
        rows = GROUPS == g
        want = (R[rows] - R[rows].mean()) / R[rows].std(unbiased=True)
        assert adv[rows, 0].tolist() == pytest.approx(want.tolist(), abs=1e-5)
    # every valid token of a response carries its response's advantage
    for i in range(6):
        assert adv[i][MASK[i]].tolist() == pytest.approx([float(adv[i, 0])] * int(MASK[i].sum()))
    # identical returns in a group: advantage 0 (eps keeps it finite), not NaN
    same = AdvantageInputs(torch.ones(4, 2), torch.ones(4, 2).bool(), group_ids=torch.tensor([0, 0, 1, 1]))
    assert torch.equal(estimators.grpo(same)[0], torch.zeros(4, 2))


@pytest.mark.parametrize("name", ["rloo", "grpo"])
def test_group_estimators_refuse_a_lone_response(name: str) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        estimators.compute_advantages(name, AdvantageInputs(REWARDS, MASK, group_ids=torch.tensor([0, 0, 0, 1, 1, 2])))
    with pytest.raises(ValueError, match="group_ids"):
        estimators.compute_advantages(name, AdvantageInputs(REWARDS, MASK))


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_is_the_whitened_reward_to_go(gamma: float) -> None:
    adv, ret = estimators.compute_advantages("reinforce_pp", AdvantageInputs(REWARDS, MASK, gamma=gamma))
    for i in range(6):
        n = int(MASK[i].sum())
        for t in range(n):
            want = sum(gamma ** (s - t) * float(REWARDS[i, s]) for s in range(t, n))
            assert float(ret[i, t]) == pytest.approx(want, abs=1e-5)
    valid = ret[MASK]
    want_adv = (valid - valid.mean()) / valid.std(unbiased=True)
    assert adv[MASK].tolist() == pytest.approx(want_adv.tolist(), abs=1e-4)
    assert adv[~MASK].abs().sum() == 0 and ret[~MASK].abs().sum() == 0


def test_group_ids_repeat_each_prompt_k_times() -> None:
    assert estimators.group_ids_for(3, 2).tolist() == [0, 0, 1, 1, 2, 2]


def test_config_validates_samples_per_prompt() -> None:
    with pytest.raises(ValueError, match="samples_per_prompt must be at least 2"):
        PPOSection(advantage_estimator="rloo")
    with pytest.raises(ValueError, match="must divide batch_size"):
        PPOSection(advantage_estimator="grpo", samples_per_prompt=3, batch_size=64)
    assert PPOSection(advantage_estimator="grpo", samples_per_prompt=4).samples_per_prompt == 4
    assert PPOSection(advantage_estimator="reinforce_pp").samples_per_prompt == 1
    with pytest.raises(ValueError, match="critic_init 'reward_model'"):
        PPOSection(critic_init="reward_model")
    assert PPOSection(critic_init="reward_model", mode="full", critic="separate").critic_init == "reward_model"
