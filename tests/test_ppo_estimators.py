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


# -- the critic: none for critic-free runs, or started from the reward model ---------------------


@pytest.fixture(scope="module")
def toy_policy(tmp_path_factory: pytest.TempPathFactory):
    from preftune.ppo import toy

    torch.set_num_threads(1)
    return toy.build_policy(tmp_path_factory.mktemp("est-policy"), eos_boost=3.0, initializer_range=0.3)


def _actor(policy_dir, mode: str, critic: str):
    from transformers import AutoModelForCausalLM

    from preftune.ppo.policy import ActorCritic

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    return ActorCritic(model, mode=mode, critic=critic, temperature=1.0, lora_r=4, lora_alpha=8)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_critic_free_actor_has_no_value_head(toy_policy, mode: str, tmp_path) -> None:
    from transformers import AutoTokenizer

    actor = _actor(toy_policy, mode, "none")
    assert actor.value_head is None
    assert not any("value_head" in n for n, _ in actor.named_parameters())
    assert not any(n.startswith("value_head") for n in actor.trainable_state())
    with_head = _actor(toy_policy, mode, "shared")
    head = sum(p.numel() for n, p in with_head.trainable_named_parameters() if n.startswith("value_head."))
    assert head > 0 and actor.n_trainable() == with_head.n_trainable() - head
    ids = torch.tensor([[5, 6, 7, 8]])
    logits, values = actor.policy_forward(ids, torch.ones_like(ids), 2)
    assert values is None and logits.shape[:2] == (1, 2)
    with pytest.raises(RuntimeError):
        actor.critic_forward(ids, torch.ones_like(ids), 2)
    tok = AutoTokenizer.from_pretrained(toy_policy)
    actor.save_policy(tmp_path / "out", tok, merged=True)
    assert not (tmp_path / "out" / "value_head.pt").exists()


def _reward_like_policy(policy_dir, tmp_path):
    """A GPT-2 sequence classifier with the policy's config and tokenizer (random weights, another seed)."""
    from transformers import AutoConfig, AutoTokenizer, GPT2ForSequenceClassification

    cfg = AutoConfig.from_pretrained(policy_dir)
    cfg.num_labels = 1
    torch.manual_seed(7)
    rm = GPT2ForSequenceClassification(cfg).eval()
    with torch.no_grad():
        rm.score.weight.normal_(0, 0.5)
    return rm, AutoTokenizer.from_pretrained(policy_dir)


def test_separate_full_critic_starts_as_the_reward_model(toy_policy, tmp_path) -> None:
    from preftune.ppo.policy import start_critic

    rm, tok = _reward_like_policy(toy_policy, tmp_path)
    actor = _actor(toy_policy, "full", "separate")
    assert start_critic(actor, "auto", rm, tok, tok, reward_stats=(0.5, 2.0)) == "reward_model"
    ids = torch.tensor([[5, 6, 7, 8, 9], [4, 4, 3, 2, 1]])
    attn = torch.ones_like(ids)
    values = actor.critic_forward(ids, attn, 3)  # value before response token t = RM score of the text up to t-1
    with torch.no_grad():
        for cut, col in ((2, 0), (3, 1), (4, 2)):
            want = (rm(input_ids=ids[:, :cut], attention_mask=attn[:, :cut]).logits.squeeze(-1) - 0.5) / 2.0
            assert values[:, col].tolist() == pytest.approx(want.tolist(), abs=1e-4)
    # the policy itself is untouched: its trunk is not the reward model's
    assert not torch.equal(actor.model.transformer.h[0].mlp.c_fc.weight, rm.transformer.h[0].mlp.c_fc.weight)


@pytest.mark.parametrize("mode,critic", [("lora", "shared"), ("lora", "separate"), ("full", "shared")])
def test_critic_sharing_the_policy_trunk_keeps_the_zero_start(toy_policy, tmp_path, mode: str, critic: str) -> None:
    from preftune.errors import ConfigError
    from preftune.ppo.policy import start_critic

    rm, tok = _reward_like_policy(toy_policy, tmp_path)
    actor = _actor(toy_policy, mode, critic)
    assert start_critic(actor, "auto", rm, tok, tok) == "zero"
    assert float(actor.value_head.summary.weight.detach().abs().sum()) == 0.0
    with pytest.raises(ConfigError, match="critic_init"):
        start_critic(actor, "reward_model", rm, tok, tok)


def test_reward_model_with_another_tokenizer_does_not_fit(toy_policy, tmp_path) -> None:
    from preftune.ppo import toy
    from preftune.ppo.policy import reward_model_fits_critic

    rm, tok = _reward_like_policy(toy_policy, tmp_path)
    other = toy.toy_tokenizer(vocab_size=300)
    actor = _actor(toy_policy, "full", "separate")
    assert reward_model_fits_critic(actor, rm, tok, tok) is None
    assert "tokenizer" in (reward_model_fits_critic(actor, rm, tok, other) or "")
