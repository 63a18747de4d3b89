"""The advantage estimators of preftune.ppo.estimators, each against its formula on hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from preftune.ppo import core, estimators
from preftune.ppo.config import PPOSection
from preftune.ppo.estimators import AdvantageInputs
from preftune.ppo.toy import TOY_PROMPTS

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


@pytest.mark.parametrize(
    "mode,critic", [("lora", "shared"), ("lora", "separate"), ("full", "shared"), ("full", "separate")]
)
def test_critic_parameters_and_values_leave_the_policy_alone(toy_policy, mode: str, critic: str) -> None:
    actor = _actor(toy_policy, mode, critic)
    own = dict(actor.critic_named_parameters())
    assert "value_head.summary.weight" in own
    if critic == "shared":
        assert set(own) == {"value_head.summary.weight", "value_head.summary.bias"}
    else:
        assert len(own) > 2 and all("critic" in n or n.startswith("value_head.") for n in own)
    ids = torch.tensor([[5, 6, 7, 8]])
    actor.critic_values(ids, torch.ones_like(ids), 2).sum().backward()
    for n, p in actor.trainable_named_parameters():
        has_grad = p.grad is not None and bool(p.grad.abs().sum() > 0)
        if n not in own:
            assert not has_grad, n  # the policy gets no gradient from the critic's loss
    assert own["value_head.summary.bias"].grad is not None
    assert _actor(toy_policy, mode, "none").critic_named_parameters() == []


# -- the estimators inside the trainer, on the toy world ----------------------------------------


def _trainer(policy_dir, estimator: str, *, critic: str = "shared", mode: str = "lora", **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.ppo.policy import ActorCritic
    from preftune.ppo.trainer import PPOTrainer, PromptItem

    k = 4 if estimator in ("rloo", "grpo") else 1
    base = dict(
        updates=10,
        batch_size=16,
        mini_batch_size=8,
        max_new_tokens=8,
        lr=1e-2,
        progress=False,
        missing_eos_penalty=None,
        warmup_updates=0,
        advantage_estimator=estimator,
        samples_per_prompt=k,
        mode=mode,
        critic=critic,
    )
    base.update(kw)
    s = PPOSection(**base)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    layout = s.critic if estimators.get(estimator).needs_critic else "none"
    actor = ActorCritic(model, mode=mode, critic=layout, temperature=1.0, lora_r=8, lora_alpha=16)

    def shorter(prompts: list[str], responses: list[str]) -> torch.Tensor:
        return torch.tensor([-len(tok(r)["input_ids"]) / 8.0 for r in responses])

    items = [PromptItem(p, "toy", f"p{i}") for i, p in enumerate(TOY_PROMPTS)]
    return PPOTrainer(s, actor, tok, shorter, items, seed=0, device=torch.device("cpu"))


@pytest.mark.parametrize("estimator", ["gae", "rloo", "grpo", "reinforce_pp"])
def test_each_estimator_raises_the_reward_on_the_toy_world_within_the_kl_guard(toy_policy, estimator: str) -> None:
    trainer = _trainer(toy_policy, estimator, kl_hard_limit=20.0)
    res = trainer.train()
    rewards = [h["ppo/reward_mean"] for h in res.history]
    assert len(rewards) == 10
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2, rewards
    kls = [h["ppo/kl"] for h in res.history]
    assert 0.0 < kls[-1] and max(kls) <= 20.0  # it moved, and never past the guard (which would have stopped it)


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "reinforce_pp"])
def test_each_estimator_is_stopped_by_the_kl_guard(toy_policy, estimator: str) -> None:
    from preftune.errors import ExitCode, PreftuneError

    trainer = _trainer(toy_policy, estimator, updates=6, lr=5e-2, kl_hard_limit=0.05)
    with pytest.raises(PreftuneError, match="kl_hard_limit") as err:
        trainer.train()
    assert err.value.exit_code == ExitCode.TRAINING_DIVERGED


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "reinforce_pp"])
def test_a_critic_free_run_allocates_and_trains_no_value_head(toy_policy, estimator: str) -> None:
    trainer = _trainer(toy_policy, estimator, updates=1)
    named = dict(trainer.actor.named_parameters())
    assert not any("value_head" in n for n in named)
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert len(in_optimizer) == len(trainer.actor.trainable_named_parameters())
    n_opt = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    assert n_opt == trainer.actor.n_trainable()
    gae = _trainer(toy_policy, "gae", updates=1)
    head = sum(p.numel() for n, p in gae.actor.trainable_named_parameters() if n.startswith("value_head."))
    assert n_opt == sum(p.numel() for g in gae.optimizer.param_groups for p in g["params"]) - head
    res = trainer.train()
    assert res.history[-1]["ppo/value_loss"] == 0.0
    state = trainer.state_dict()
    assert not any("value_head" in n for n in state["trainable"])


def test_a_critic_free_estimator_refuses_an_actor_with_a_value_head(toy_policy) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.errors import PreftuneError
    from preftune.ppo.policy import ActorCritic
    from preftune.ppo.trainer import PPOTrainer, PromptItem

    model = AutoModelForCausalLM.from_pretrained(toy_policy)
    tok = AutoTokenizer.from_pretrained(toy_policy)
    actor = ActorCritic(model, mode="lora", critic="shared", temperature=1.0)
    s = PPOSection(advantage_estimator="rloo", samples_per_prompt=2, batch_size=4, mini_batch_size=2, progress=False)
    with pytest.raises(PreftuneError, match="critic-free"):
        PPOTrainer(
            s, actor, tok, lambda p, r: torch.zeros(len(r)), [PromptItem("hi")], seed=0, device=torch.device("cpu")
        )


def test_group_rollouts_hold_k_copies_of_each_prompt(toy_policy) -> None:
    trainer = _trainer(toy_policy, "grpo", updates=1)
    items = trainer._next_items()
    assert len(items) == 16
    for g in range(4):
        assert len({it.prompt_id for it in items[4 * g : 4 * g + 4]}) == 1
    assert len({it.prompt_id for it in items[::4]}) == 4


def test_grpo_resume_reproduces_the_uninterrupted_run(toy_policy) -> None:
    import copy

    straight = _trainer(toy_policy, "grpo", updates=4).train().history
    first = _trainer(toy_policy, "grpo", updates=4)
    first.s = first.s.model_copy(update={"updates": 2})
    first.train()
    resumed = _trainer(toy_policy, "grpo", updates=4)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    got = resumed.train().history
    for w, g in zip(straight, got, strict=True):
        for key in ("ppo/reward_mean", "ppo/kl", "ppo/policy_loss", "ppo/kl_coef"):
            assert g[key] == pytest.approx(w[key], abs=1e-6), (key, w["update"])


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_critic_warmup_trains_the_critic_with_the_policy_frozen(toy_policy, critic: str) -> None:
    trainer = _trainer(toy_policy, "gae", critic=critic, updates=1, critic_warmup_updates=3, lr=1e-2)
    own = {n for n, _ in trainer.actor.critic_named_parameters()}
    before = {n: p.detach().clone() for n, p in trainer.actor.trainable_named_parameters()}
    losses = trainer.warmup_critic()
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    for n, p in trainer.actor.trainable_named_parameters():
        if n in own:
            continue
        assert torch.equal(p.detach(), before[n]), n  # the policy did not move
    assert not torch.equal(trainer.actor.value_head.summary.bias.detach(), before["value_head.summary.bias"])
    assert trainer.update_idx == 0  # warm-up updates do not count in ppo.updates


def test_critic_warmup_runs_once_before_the_first_update_and_is_logged(toy_policy) -> None:
    trainer = _trainer(toy_policy, "gae", updates=2, critic_warmup_updates=2)
    res = trainer.train()
    assert len(res.history) == 2 and len(trainer.warmup_losses) == 2
    assert res.history[0]["ppo/critic_warmup_loss_last"] == trainer.warmup_losses[-1]
    assert "ppo/critic_warmup_loss_last" not in res.history[1]


def test_ppo_step_with_a_critic_free_estimator_publishes_no_value_head(tmp_path) -> None:
    import json

    import mlflow

    from preftune.config import parse_config
    from preftune.ppo import toy
    from preftune.ppo.artifacts import read_metadata
    from preftune.ppo.step import run_ppo

    policy = toy.build_policy(tmp_path / "policy", eos_boost=3.0, initializer_range=0.3)
    reward = toy.build_reward_model(tmp_path / "reward", per_family={"toy": 0.9})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "family": "toy", "prompt": p}) + "\n" for i, p in enumerate(TOY_PROMPTS))
    )
    ppo = {
        "prompts": str(prompts),
        "updates": 2,
        "batch_size": 8,
        "mini_batch_size": 4,
        "max_new_tokens": 6,
        "threads": 1,
        "progress": False,
        "log_model": False,
        "advantage_estimator": "grpo",
        "samples_per_prompt": 4,
    }
    cfg = parse_config(
        {
            "run": {"seed": 0, "name": "est-test"},
            "models": {"policy": str(policy)},
            "ppo": ppo,
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        }
    )
    out = tmp_path / "out"
    res = run_ppo(cfg, str(reward), str(out))
    assert res.updates == 2
    meta = read_metadata(out)
    assert meta["critic"] == "none" and meta["advantage_estimator"] == "grpo"
    assert not (out / "value_head.pt").exists()
    run = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(res.mlflow_run_id)
    assert run.data.params["ppo.resolved.critic_start"] == "none"
    assert run.data.params["ppo.advantage_estimator"] == "grpo"


def test_a_run_with_critic_warmup_resumes_like_the_uninterrupted_run(toy_policy) -> None:
    import copy

    straight = _trainer(toy_policy, "gae", updates=3, critic_warmup_updates=2).train().history
    first = _trainer(toy_policy, "gae", updates=3, critic_warmup_updates=2)
    first.s = first.s.model_copy(update={"updates": 1})
    first.train()
    resumed = _trainer(toy_policy, "gae", updates=3, critic_warmup_updates=2)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    got = resumed.train().history  # no second warm-up: the checkpoint holds the warmed-up critic
    assert resumed.warmup_losses == []
    for w, g in zip(straight, got, strict=True):
        for key in ("ppo/reward_mean", "ppo/kl", "ppo/policy_loss", "ppo/value_loss"):
            assert g[key] == pytest.approx(w[key], abs=1e-6), (key, w["update"])
