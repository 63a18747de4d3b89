"""The PPO trainer on tiny models built here: sampling, reference, masking, learning, guards, state."""

from __future__ import annotations

import copy
import os
import signal
from pathlib import Path

import pytest
import torch

from preftune.errors import ExitCode, PreftuneError
from preftune.ppo import core
from preftune.ppo.checkpoint import CheckpointStore
from preftune.ppo.config import PPOSection
from preftune.ppo.policy import ActorCritic
from preftune.ppo.sampling import sample
from preftune.ppo.trainer import PPOTrainer, PromptItem, Terminated, UpdateEvent, install_sigterm
from preftune.storage import Storage

PROMPTS = [
    PromptItem(p, "toy", f"p{i}")
    for i, p in enumerate(
        ["hi", "how do I bake bread", "tell me a joke", "what is the capital of France", "help me", "write a haiku"]
    )
]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from preftune.ppo import toy

    torch.set_num_threads(1)
    # a larger init scale: logits of useful size, so LoRA changes move the distribution
    return toy.build_policy(tmp_path_factory.mktemp("policy"), eos_boost=3.0, initializer_range=0.3)


def load(policy_dir: Path) -> tuple[object, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(policy_dir), AutoTokenizer.from_pretrained(policy_dir)


def settings(**kw: object) -> PPOSection:
    base = dict(
        updates=4,
        batch_size=8,
        mini_batch_size=4,
        max_new_tokens=8,
        lr=1e-2,
        progress=False,
        missing_eos_penalty=None,
        exclude_families=[],
        warmup_updates=0,
    )
    base.update(kw)
    return PPOSection(**base)  # type: ignore[arg-type]


def length_reward(tok: object):
    """Shorter is better: the policy can learn it by raising EOS."""

    def fn(prompts: list[str], responses: list[str]) -> torch.Tensor:
        return torch.tensor([-len(tok(r)["input_ids"]) / 8.0 for r in responses])  # type: ignore[operator]

    return fn


def make_trainer(policy_dir: Path, *, mode: str = "lora", critic: str = "shared", reward=None, **kw: object):
    torch.manual_seed(0)  # LoRA's A matrices are drawn from the global generator
    model, tok = load(policy_dir)
    s = settings(mode=mode, critic=critic, **kw)
    actor = ActorCritic(model, mode=mode, critic=critic, temperature=s.temperature, lora_r=8, lora_alpha=16)
    store = kw.pop("store", None) if "store" in kw else None
    trainer = PPOTrainer(
        s, actor, tok, reward or length_reward(tok), PROMPTS, seed=0, device=torch.device("cpu"), checkpoints=store
    )
    return trainer


# -- sampling and the reference ------------------------------------------------------------


def test_cached_left_padded_sampling_matches_unpadded_greedy_generate(policy_dir: Path) -> None:
    model, tok = load(policy_dir)
    model.eval()
    tok.padding_side = "left"
    texts = ["User: hi\nAssistant:", "User: how do I bake bread today, please\nAssistant:"]
    enc = tok(texts, padding=True, return_tensors="pt")
    assert enc["attention_mask"][0, 0] == 0  # the short prompt is left-padded
    out = sample(
        model,
        enc["input_ids"],
        enc["attention_mask"],
        max_new_tokens=6,
        temperature=1e-4,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        generator=torch.Generator().manual_seed(0),
    )
    mask = core.response_mask(out.response_ids, tok.eos_token_id)
    for i, text in enumerate(texts):
        ids = tok(text, return_tensors="pt")["input_ids"]
        ref = model.generate(
            ids, do_sample=False, max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )[0, ids.shape[1] :]
        got = out.response_ids[i][mask[i]]
        assert got.tolist() == ref[: len(got)].tolist()


@pytest.mark.parametrize("from_sampling", [True, False])
def test_rollout_logprobs_agree_with_the_sampling_distribution(policy_dir: Path, from_sampling: bool) -> None:
    """Rollout log-probs and values (from the sampling pass, or from a full left-padded forward)
    equal those of each row scored alone."""
    trainer = make_trainer(policy_dir, logprobs_from_sampling=from_sampling)
    with torch.no_grad():
        trainer.actor.value_head.summary.weight.normal_(0, 0.1)  # non-zero values to compare
    ro = trainer.rollout(PROMPTS[:3], update=1)
    actor = trainer.actor
    for i in range(3):
        p = ro.prompt_ids[i][ro.prompt_mask[i].bool()]
        r = ro.response_ids[i][ro.mask[i]]
        seq = torch.cat([p, r]).unsqueeze(0)
        with torch.no_grad():
            logits, values = actor.policy_forward(seq, torch.ones_like(seq), len(r))
        lp = core.logprobs_from_logits(logits, r.unsqueeze(0))[0]
        assert torch.allclose(lp, ro.logprobs[i][ro.mask[i]], atol=1e-5)
        assert torch.allclose(values[0], ro.values[i][ro.mask[i]], atol=1e-5)
    # at initialisation the LoRA adapter is a no-op: KL to the reference is 0 (up to float rounding
    # between the cached sampling pass and the reference's full pass)
    assert float(ro.kl.abs().max()) < 1e-5


def test_reference_is_the_base_with_the_adapter_disabled(policy_dir: Path) -> None:
    model, tok = load(policy_dir)
    fresh, _ = load(policy_dir)
    actor = ActorCritic(model, mode="lora", critic="shared", temperature=1.0, lora_r=4, lora_alpha=8)
    with torch.no_grad():
        for n, p in actor.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    seq = tok(["User: hi\nAssistant: hello"], return_tensors="pt")["input_ids"]
    att = torch.ones_like(seq)
    pol, _ = actor.policy_forward(seq, att, 3)
    ref = actor.ref_logits(seq, att, 3)
    base = fresh(input_ids=seq, attention_mask=att).logits[:, -4:-1]
    assert torch.allclose(ref, base, atol=1e-5)
    assert not torch.allclose(pol, base, atol=1e-3)
    # one copy of the base weights: the reference shares them with the policy
    assert actor.ref_model is None


def test_full_mode_keeps_a_frozen_reference_copy(policy_dir: Path) -> None:
    trainer = make_trainer(policy_dir, mode="full", updates=1)
    ref_before = copy.deepcopy(trainer.actor.ref_model.state_dict())
    trainer.train()
    for k, v in trainer.actor.ref_model.state_dict().items():
        assert torch.equal(v, ref_before[k])
    assert any(
        not torch.equal(p, ref_before[n.removeprefix("model.")])
        for n, p in trainer.actor.named_parameters()
        if n.startswith("model.")
    )


def test_separate_critic_adapter_trains_both_adapters(policy_dir: Path) -> None:
    trainer = make_trainer(policy_dir, critic="separate", updates=2)
    before = trainer.actor.trainable_state()
    assert any(".critic." in n for n in before) and any(".default." in n for n in before)
    trainer.train()
    after = trainer.actor.trainable_state()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(".critic." in n for n in changed), "critic adapter did not train"
    assert any(".default." in n and "lora_B" in n for n in changed), "policy adapter did not train"
    assert any(n.startswith("value_head.") for n in changed)


# -- masking --------------------------------------------------------------------------------


def test_tokens_after_eos_do_not_change_the_loss_or_gradients(policy_dir: Path) -> None:
    trainer = make_trainer(policy_dir)
    ro = trainer.rollout(PROMPTS, update=1)
    rows = torch.arange(ro.batch_size)
    assert bool((~ro.mask).any()), "need some padding after EOS for this test"

    def grads(r) -> dict[str, torch.Tensor]:
        trainer.actor.zero_grad(set_to_none=True)
        stats = trainer._micro_step(r, rows, update=1)
        g = {n: p.grad.clone() for n, p in trainer.actor.trainable_named_parameters() if p.grad is not None}
        return {"loss": stats["policy_loss"] + stats["value_loss"], **g}

    a = grads(ro)
    garbage = copy.copy(ro)
    noise = torch.randint(0, 200, ro.response_ids.shape)
    garbage.response_ids = torch.where(ro.mask, ro.response_ids, noise)
    garbage.advantages = torch.where(ro.mask, ro.advantages, torch.full_like(ro.advantages, 1e3))
    garbage.returns = torch.where(ro.mask, ro.returns, torch.full_like(ro.returns, -1e3))
    garbage.logprobs = torch.where(ro.mask, ro.logprobs, torch.full_like(ro.logprobs, 5.0))
    b = grads(garbage)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


# -- learning -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_ppo_raises_the_reward(policy_dir: Path, mode: str) -> None:
    trainer = make_trainer(policy_dir, mode=mode, updates=12, batch_size=16, mini_batch_size=8)
    res = trainer.train()
    rewards = [h["ppo/reward_mean"] for h in res.history]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.2, rewards
    assert res.history[-1]["ppo/kl"] > 0.0  # it moved away from the reference, and the KL is reported


def test_mixed_precision_bf16_autocasts_on_cpu_and_still_learns(policy_dir: Path, monkeypatch) -> None:
    """ppo.mixed_precision 'bf16' autocasts on any device (docs/ppo.md); 'auto' stays fp32 on CPU; asking for
    bf16 on a GPU without it is a config error, not a silent fp32 run."""
    import contextlib

    from preftune.errors import ConfigError
    from preftune.ppo.rollout import autocast_for

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: False)
    with pytest.raises(ConfigError, match="no bf16 support"):
        autocast_for(torch.device("cuda"), settings(mixed_precision="bf16"))
    assert autocast_for(torch.device("cuda"), settings(mixed_precision="auto")) is contextlib.nullcontext
    monkeypatch.undo()

    a = torch.ones(4, 4)
    with autocast_for(torch.device("cpu"), settings(mixed_precision="bf16"))():
        assert (a @ a).dtype == torch.bfloat16
    for mode in ("auto", "no"):
        with autocast_for(torch.device("cpu"), settings(mixed_precision=mode))():
            assert (a @ a).dtype == torch.float32
    trainer = make_trainer(policy_dir, updates=12, batch_size=16, mini_batch_size=8, mixed_precision="bf16")
    res = trainer.train()
    rewards = [h["ppo/reward_mean"] for h in res.history]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2, rewards
    assert all(p.dtype == torch.float32 for p in trainer.actor.parameters())  # weights stay fp32


def test_approx_kl_bound_stops_the_epochs_early(policy_dir: Path) -> None:
    trainer = make_trainer(policy_dir, updates=1, ppo_epochs=4, approx_kl_stop=1e-9, lr=5e-2)
    res = trainer.train()
    h = res.history[-1]
    assert h["ppo/early_stopped"] == 1.0
    assert h["ppo/optimizer_steps"] < 4 * 2  # 4 epochs x 2 mini-batches without the bound


def test_adaptive_kl_coefficient_moves_and_is_logged(policy_dir: Path) -> None:
    trainer = make_trainer(policy_dir, updates=3, kl_target=0.5, kl_horizon=40, kl_coef=0.1, kl_error_clip=0.2)
    res = trainer.train()
    h = res.history
    assert h[0]["ppo/kl_coef"] == 0.1
    for prev, nxt in zip(h, h[1:], strict=False):  # each coefficient follows from the previous rollout's KL (Ziegler)
        error = min(max(prev["ppo/kl"] / 0.5 - 1, -0.2), 0.2)
        assert nxt["ppo/kl_coef"] == pytest.approx(prev["ppo/kl_coef"] * (1 + error * 8 / 40))
    assert h[1]["ppo/kl_coef"] < 0.1  # KL 0 at the start (adapter is a no-op): below target, beta shrinks


# -- state, guards, signals -----------------------------------------------------------------


def test_state_dict_resume_reproduces_the_uninterrupted_run(policy_dir: Path) -> None:
    straight = make_trainer(policy_dir, updates=4)
    want = straight.train().history
    first = make_trainer(policy_dir, updates=4)
    first.s = first.s.model_copy(update={"updates": 2})
    first.train()
    state = first.state_dict()
    resumed = make_trainer(policy_dir, updates=4)
    resumed.load_state_dict(copy.deepcopy(state))
    got = resumed.train().history
    assert len(got) == 4
    for w, g in zip(want, got, strict=True):
        for k in ("ppo/reward_mean", "ppo/kl", "ppo/policy_loss", "ppo/value_loss", "ppo/kl_coef", "ppo/lr"):
            assert g[k] == pytest.approx(w[k], abs=1e-6), (k, w["update"])


def test_nan_reward_stops_with_diverged_and_keeps_last_checkpoint(policy_dir: Path, tmp_path: Path) -> None:
    calls = {"n": 0}
    model, tok = load(policy_dir)
    base_reward = length_reward(tok)

    def reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
        calls["n"] += 1
        r = base_reward(prompts, responses)
        if calls["n"] == 3:
            r[1] = float("nan")
        return r

    store = CheckpointStore(str(tmp_path / "ckpt"), Storage(), keep=2, fingerprint="t")
    s = settings(updates=5, checkpoint_every=1)
    actor = ActorCritic(model, mode="lora", critic="shared", temperature=1.0, lora_r=4, lora_alpha=8)
    trainer = PPOTrainer(s, actor, tok, reward, PROMPTS, seed=0, device=torch.device("cpu"), checkpoints=store)
    with pytest.raises(PreftuneError) as err:
        trainer.train()
    assert err.value.exit_code == ExitCode.TRAINING_DIVERGED
    assert "update 3/5" in err.value.message and "non-finite" in err.value.message
    assert "update-000002" in err.value.message
    latest = store.latest()
    assert latest is not None and latest.update == 2
    assert (tmp_path / "ckpt" / "update-000002" / "state.pt").is_file()
    assert not (tmp_path / "ckpt" / "update-000003").exists()


def test_nan_weights_are_caught_as_non_finite_logits(policy_dir: Path) -> None:
    trainer = make_trainer(policy_dir, updates=2)
    with torch.no_grad():
        next(p for n, p in trainer.actor.named_parameters() if "lora_B" in n).fill_(float("nan"))
    with pytest.raises(PreftuneError) as err:
        trainer.train()
    assert err.value.exit_code == ExitCode.TRAINING_DIVERGED
    assert "update 1/2" in err.value.message


def test_kl_past_the_hard_limit_stops_the_run(policy_dir: Path) -> None:
    trainer = make_trainer(policy_dir, updates=6, kl_hard_limit=0.05, lr=5e-2, kl_coef=0.0)
    with pytest.raises(PreftuneError) as err:
        trainer.train()
    assert err.value.exit_code == ExitCode.TRAINING_DIVERGED
    assert "kl_hard_limit" in err.value.message


def test_sigterm_writes_a_checkpoint_then_exits(policy_dir: Path, tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ckpt"), Storage(), keep=2, fingerprint="t")
    trainer = make_trainer(policy_dir, updates=6, checkpoint_every=10)
    trainer.checkpoints = store

    class Killer:
        def on_update(self, event: UpdateEvent) -> None:
            if event.update == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled by the installed handler

    trainer.callbacks.append(Killer())
    undo = install_sigterm(trainer)
    try:
        with pytest.raises(Terminated) as err:
            trainer.train()
    finally:
        undo()
    assert err.value.exit_code == 143
    assert "after update 2/6" in err.value.message
    latest = store.latest()
    assert latest is not None and latest.update == 2
    assert signal.getsignal(signal.SIGTERM) is not None


def test_prompt_sampler_balances_families_and_resumes_exactly() -> None:
    from preftune.ppo.trainer import PromptSampler

    groups = [list(range(0, 2)), list(range(2, 12))]  # a family of 2 prompts and one of 10
    sampler = PromptSampler(groups, seed=3)
    first = sampler.take(8)
    assert sum(i < 2 for i in first) == 4  # half of every batch from each family
    assert sorted(first[0::2][:2]) == [0, 1]  # the small family cycles through all its prompts
    state = sampler.state_dict()
    want = sampler.take(10)
    again = PromptSampler(groups, seed=3)
    again.load_state_dict(state)
    assert again.take(10) == want
    plain = PromptSampler([list(range(12))], seed=3)
    seen = plain.take(12)
    assert sorted(seen) == list(range(12))  # one pass = a permutation
