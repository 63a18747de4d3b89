"""The adaptive KL controller: Ziegler's linear step as before, the log step, the horizon tied to the run's length."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from preftune.ppo import core, setup
from preftune.ppo.config import PPOSection
from preftune.ppo.toy import TOY_PROMPTS

# -- the arithmetic ----------------------------------------------------------------------------------


def test_linear_step_is_ziegler_unchanged() -> None:
    """The same numbers as before the log step existed (tests/test_ppo_core.py holds the original check)."""
    ctl = core.AdaptiveKLController(0.2, target=6.0, horizon=10_000, error_clip=0.2)
    assert ctl.step == "linear"
    ctl.update(current_kl=9.0, n_steps=256)  # error 0.5, clipped to 0.2
    assert ctl.value == 0.2 * (1.0 + 0.2 * 256 / 10_000)
    before = ctl.value
    ctl.update(current_kl=5.4, n_steps=256)  # error -0.1
    assert ctl.value == before * (1.0 + (5.4 / 6.0 - 1.0) * 256 / 10_000)
    ctl.update(current_kl=0.0, n_steps=64)  # error -1, clipped to -0.2: a linear step down is smaller than up's inverse
    assert ctl.value == before * (1.0 + (5.4 / 6.0 - 1.0) * 256 / 10_000) * (1.0 - 0.2 * 64 / 10_000)


def test_log_step_is_symmetric_and_bounded_by_the_clip() -> None:
    up = core.AdaptiveKLController(0.1, target=2.0, horizon=100, error_clip=0.2, step="log")
    up.update(current_kl=50.0, n_steps=16)  # error 24 -> clipped to +0.2
    assert up.value == pytest.approx(0.1 * math.exp(0.2 * 16 / 100), rel=1e-12)
    assert up.value == pytest.approx(0.1 * up.max_factor(16), rel=1e-12)
    up.update(current_kl=0.0, n_steps=16)  # error -1 -> clipped to -0.2: exactly back where it started
    assert up.value == pytest.approx(0.1, rel=1e-12)
    inside = core.AdaptiveKLController(0.1, target=2.0, horizon=100, error_clip=0.2, step="log")
    inside.update(current_kl=2.2, n_steps=16)  # error 0.1, inside the clip
    assert inside.value == pytest.approx(0.1 * math.exp(0.1 * 16 / 100), rel=1e-12)
    # never negative, however far down it is pushed; the linear step goes through zero
    log_down = core.AdaptiveKLController(0.1, target=2.0, horizon=10, error_clip=1.0, step="log")
    lin_down = core.AdaptiveKLController(0.1, target=2.0, horizon=10, error_clip=1.0)
    for _ in range(3):
        log_down.update(0.0, 16)
        lin_down.update(0.0, 16)
    assert log_down.value == pytest.approx(0.1 * math.exp(-3 * 1.6), rel=1e-12) and log_down.value > 0
    assert lin_down.value < 0  # (1 - 1.6) per update: why the log step exists


def test_ramped_target_rises_linearly_then_holds() -> None:
    ctl = core.AdaptiveKLController(0.1, target=4.0, horizon=100, error_clip=0.2, step="log", ramp_updates=4)
    assert [ctl.target_at(u) for u in (1, 2, 4, 9)] == [1.0, 2.0, 4.0, 4.0]
    ctl.update(current_kl=1.1, n_steps=16)  # update 1: target 1.0, error +0.1 (against the full target: -0.725)
    assert ctl.value == pytest.approx(0.1 * math.exp(0.1 * 16 / 100), rel=1e-12)
    ziegler = core.AdaptiveKLController(0.1, target=4.0, horizon=100, error_clip=0.2, step="log")
    ziegler.update(current_kl=1.1, n_steps=16)
    assert ziegler.value == pytest.approx(0.1 * math.exp(-0.2 * 16 / 100), rel=1e-12)
    s = PPOSection(kl_target_ramp=0.25, updates=40)
    assert setup.make_kl_controller(s).ramp_updates == 10  # type: ignore[union-attr]


def test_log_pd_step_equals_the_log_step_without_damping() -> None:
    kls = [0.0, 0.4, 1.5, 3.0, 9.0, 30.0, 12.0, 5.5, 4.9, 2.0, -0.1]
    log = core.AdaptiveKLController(0.05, 5.0, 48.0, 0.2, step="log", ramp_updates=4)
    pd0 = core.AdaptiveKLController(0.05, 5.0, 48.0, 0.2, step="log_pd", ramp_updates=4, damping=0.0)
    for kl in kls:
        log.update(kl, 16)
        pd0.update(kl, 16)
        assert pd0.value == log.value  # the same float, update by update
    assert pd0.max_factor(16) == log.max_factor(16) == math.exp(0.2 * 16 / 48.0)


def test_log_pd_damping_brakes_when_the_error_already_shrinks() -> None:
    """KL above the target but falling towards it: the derivative term cuts the step up (to nothing when the KL
    falls fast enough); KL above and still rising: the step stays the clipped maximum."""

    def ctl(damping: float) -> core.AdaptiveKLController:
        return core.AdaptiveKLController(0.1, 2.0, 100.0, 0.2, step="log_pd", damping=damping)

    first = ctl(1.0)
    first.update(3.0, 16)  # no previous error: the plain log step (error +0.5, clipped to +0.2)
    assert first.value == pytest.approx(0.1 * math.exp(0.2 * 16 / 100), rel=1e-12)
    assert first.smoothed_log_error == pytest.approx(math.log(3.0 / 2.0), rel=1e-12)

    falling, log = ctl(1.0), core.AdaptiveKLController(0.1, 2.0, 100.0, 0.2, step="log")
    for c in (falling, log):
        c.update(4.0, 16)
        c.update(3.6, 16)  # error +0.8 -> clipped +0.2; log error falls by log(3.6/4) = -0.105
    u = 0.2 + math.log(3.6 / 4.0)
    assert 0 < u < 0.2
    assert falling.value == pytest.approx(log.value / math.exp(0.2 * 16 / 100) * math.exp(u * 16 / 100), rel=1e-12)
    assert falling.value < log.value  # damped: a smaller step up than the log step's

    fast = ctl(2.0)
    fast.update(8.0, 16)
    fast.update(4.0, 16)  # halving: 0.2 + 2 x log(0.5) = -1.19 -> clipped to -0.2: beta comes DOWN while still above
    assert fast.value == pytest.approx(0.1 * math.exp(0.2 * 16 / 100) * math.exp(-0.2 * 16 / 100), rel=1e-12)

    rising, log = ctl(1.0), core.AdaptiveKLController(0.1, 2.0, 100.0, 0.2, step="log")
    for c in (rising, log):
        c.update(1.0, 16)
        c.update(1.5, 16)  # below the target but rising towards it: the step down shrinks (here it turns up)
    assert rising.value > log.value
    below = ctl(1.0)
    below.update(1.5, 16)
    below.update(1.0, 16)  # below and falling further: clipped to the most the log step would do
    assert below.value == pytest.approx(0.1 * math.exp(-2 * 0.2 * 16 / 100), rel=1e-12)


def test_log_pd_smoothing_filters_the_derivative() -> None:
    """The derivative is taken of an exponential average of the log error: a one-batch jump moves it by only
    ``smoothing`` of the jump; smoothing 1 is the raw difference."""
    c = core.AdaptiveKLController(0.1, 2.0, 100.0, 0.2, step="log_pd", damping=1.0, smoothing=0.25)
    c.update(4.0, 16)  # first update: the average starts at the first log error
    assert c.smoothed_log_error == pytest.approx(math.log(2.0), rel=1e-12)
    before = c.value
    c.update(3.0, 16)  # error +0.5 -> +0.2; raw change log(3/4) = -0.288 would give u = -0.088, filtered: -0.072
    s = math.log(2.0) + 0.25 * (math.log(1.5) - math.log(2.0))
    assert c.smoothed_log_error == pytest.approx(s, rel=1e-12)
    assert c.value == pytest.approx(before * math.exp((0.2 + s - math.log(2.0)) * 16 / 100), rel=1e-12)
    raw = core.AdaptiveKLController(0.1, 2.0, 100.0, 0.2, step="log_pd", damping=1.0)
    raw.update(4.0, 16)
    raw.update(3.0, 16)
    assert raw.value < c.value  # the raw derivative brakes harder on the same one-batch drop


def test_log_pd_floors_the_kl_for_its_log() -> None:
    """k1 estimates can be 0 or negative: the log error reads them as error_clip x target."""
    c = core.AdaptiveKLController(0.1, 2.0, 100.0, 0.2, step="log_pd", damping=1.0)
    c.update(-0.3, 16)
    assert c.smoothed_log_error == pytest.approx(math.log(0.2), rel=1e-12)
    c.update(0.0, 16)
    assert c.smoothed_log_error == pytest.approx(math.log(0.2), rel=1e-12) and math.isfinite(c.value)


def test_unknown_step_is_refused() -> None:
    with pytest.raises(ValueError, match="'linear', 'log' or 'log_pd'"):
        core.AdaptiveKLController(0.1, 2.0, 100, 0.2, step="exp")  # type: ignore[arg-type]


def test_auto_horizon_follows_the_run_length_and_sets_the_reach() -> None:
    s = PPOSection(kl_horizon="auto", kl_controller_step="log", updates=80, batch_size=64, kl_horizons_per_run=20)
    assert setup.kl_horizon(s) == 80 * 64 / 20
    ctl = setup.make_kl_controller(s)
    assert isinstance(ctl, core.AdaptiveKLController) and ctl.step == "log"
    for _ in range(s.updates):
        ctl.update(1e6, s.batch_size)  # far above target every update: the most the run can move it
    assert ctl.value == pytest.approx(s.kl_coef * math.exp(s.kl_error_clip * s.kl_horizons_per_run), rel=1e-9)
    # the defaults keep Ziegler's controller: linear step, horizon 2000 responses
    d = setup.make_kl_controller(PPOSection())
    assert isinstance(d, core.AdaptiveKLController) and (d.step, d.horizon) == ("linear", 2000.0)


@pytest.mark.parametrize(
    "field",
    [
        {"kl_horizon": 0},
        {"kl_horizon": "soon"},
        {"kl_controller_step": "exp"},
        {"kl_horizons_per_run": 0},
        {"kl_target_ramp": 1.5},
        {"kl_damping": -1.0},
        {"kl_damping_smoothing": 0.0},
        {"kl_damping_smoothing": 1.5},
    ],
)
def test_config_refuses_bad_controller_settings(field: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match=next(iter(field))):
        PPOSection(**field)  # type: ignore[arg-type]


@pytest.mark.parametrize("step", ["log", "log_pd"])
def test_state_dict_resumes_the_log_controller_exactly(step: core.KLStep) -> None:
    """The value, the place on the target's ramp and (log_pd) the last log error all come back."""
    a = core.AdaptiveKLController(0.05, 2.0, 123.4, 0.2, step=step, ramp_updates=5, damping=1.5, smoothing=0.5)
    b = core.AdaptiveKLController(0.05, 2.0, 123.4, 0.2, step=step, ramp_updates=5, damping=1.5, smoothing=0.5)
    fresh = core.AdaptiveKLController(0.05, 2.0, 123.4, 0.2, step=step, ramp_updates=5, damping=1.5, smoothing=0.5)
    kls = [0.0, 0.5, 3.1, 1.4, 2.2, 1.9]
    for kl in kls[:3]:
        a.update(kl, 16)
    b.load_state_dict(dict(a.state_dict()))
    fresh.load_state_dict({"value": a.value, "n_updates": a.n_updates})  # what a checkpoint without the memory gives
    for kl in kls[3:]:
        a.update(kl, 16)
        b.update(kl, 16)
        fresh.update(kl, 16)
    assert (b.value, b.n_updates, b.smoothed_log_error) == (a.value, a.n_updates, a.smoothed_log_error)
    assert b.n_updates == 6
    if step == "log_pd":
        assert a.smoothed_log_error is not None and fresh.value != a.value  # without the memory: another run
    else:
        assert a.smoothed_log_error is None and fresh.value == a.value
    old = core.AdaptiveKLController(0.05, 2.0, 123.4, 0.2)
    old.load_state_dict({"value": 0.07})  # a checkpoint from before the ramp
    assert (old.value, old.n_updates) == (0.07, 0)


# -- on the toy world ---------------------------------------------------------------------------------
#
# The toy policy (preftune/ppo/toy.py) rewarded for short responses at 1/80 per token: with a FIXED coefficient
# its KL after 30 updates is about 3.3 nats at 0.01, 2.9 at 0.03, 0.2 at 0.1 and 0.0 at 0.3 (the toy's KL
# saturates near 3.3 once the responses are as short as they get). The target, 3 nats, is one the toy reaches.

TARGET, TOLERANCE, UPDATES = 3.0, 0.25, 30  # KL within 25% of the target: mean of the last 5 rollouts


@pytest.fixture(scope="module")
def toy_policy(tmp_path_factory: pytest.TempPathFactory):
    from preftune.ppo import toy

    torch.set_num_threads(1)
    return toy.build_policy(tmp_path_factory.mktemp("klc-policy"), eos_boost=3.0, initializer_range=0.3)


def _trainer(policy_dir, **kw: object):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.ppo.policy import ActorCritic
    from preftune.ppo.trainer import PPOTrainer, PromptItem

    s = PPOSection(
        **{  # type: ignore[arg-type]
            "updates": UPDATES,
            "batch_size": 16,
            "mini_batch_size": 8,
            "max_new_tokens": 8,
            "lr": 3e-3,
            "progress": False,
            "missing_eos_penalty": None,
            "warmup_updates": 0,
            "kl_hard_limit": 1e6,
            "length_drift_guard": "off",
            "kl_controller": "adaptive",
            "kl_target": TARGET,
            **kw,
        }
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    actor = ActorCritic(model, mode="lora", critic="shared", temperature=1.0, lora_r=8, lora_alpha=16)

    def shorter(prompts: list[str], responses: list[str]) -> torch.Tensor:
        return torch.tensor([-len(tok(r)["input_ids"]) / 80.0 for r in responses])

    items = [PromptItem(p, "toy", f"p{i}") for i, p in enumerate(TOY_PROMPTS)]
    return PPOTrainer(s, actor, tok, shorter, items, seed=0, device=torch.device("cpu"))


def _run(policy_dir, **kw: object) -> tuple[PPOSection, list[dict[str, float]], float]:
    trainer = _trainer(policy_dir, **kw)
    res = trainer.train()
    return trainer.s, res.history, trainer.kl_ctl.value


def _final_kl(history: list[dict[str, float]]) -> float:
    return sum(h["ppo/kl"] for h in history[-5:]) / 5


@pytest.mark.parametrize("start", [0.01, 0.3])
def test_log_step_with_auto_horizon_reaches_the_target_from_either_end(toy_policy, start: float) -> None:
    s, history, final = _run(toy_policy, kl_coef=start, kl_controller_step="log", kl_horizon="auto")
    assert len(history) == UPDATES
    assert abs(_final_kl(history) - TARGET) <= TOLERANCE * TARGET, ([h["ppo/kl"] for h in history], final)
    reach = math.exp(s.kl_error_clip * s.kl_horizons_per_run)
    assert start / reach <= final <= start * reach


@pytest.mark.parametrize(
    "start",
    [
        0.01,
        pytest.param(
            0.3,
            marks=pytest.mark.xfail(
                strict=True,
                reason="overdamped on the toy: measured 1.88 nats against 3 +- 0.75 (damping 1: 2.53); "
                "beta holds at ~0.03 while the toy's KL creeps up by ~10% per update, then beta comes down too slowly",
            ),
        ),
    ],
)
def test_log_pd_step_with_auto_horizon_reaches_the_target_from_either_end(toy_policy, start: float) -> None:
    """The same check as the log step's, for the damped step at its defaults (damping 2, smoothing 0.3). From 0.3
    it does not pass (strict xfail: it fails loudly if a change makes it pass, so the mark is then removed)."""
    s, history, final = _run(toy_policy, kl_coef=start, kl_controller_step="log_pd", kl_horizon="auto")
    assert (len(history), s.kl_damping, s.kl_damping_smoothing) == (UPDATES, 2.0, 0.3)
    assert abs(_final_kl(history) - TARGET) <= TOLERANCE * TARGET, ([h["ppo/kl"] for h in history], final)
    reach = math.exp(s.kl_error_clip * s.kl_horizons_per_run)
    assert start / reach <= final <= start * reach


def test_ziegler_linear_step_cannot_move_far_enough_in_the_same_run(toy_policy) -> None:
    """Ziegler's step at the default horizon (2000 responses) over 30 updates of 16: at most x(1 +- 0.0016) per
    update. From 0.3 the coefficient stays near 0.3, where the toy's KL stays near 0: far from the target."""
    s, history, final = _run(toy_policy, kl_coef=0.3)
    assert (s.kl_controller_step, s.kl_horizon) == ("linear", 2000)
    step = s.kl_error_clip * s.batch_size / s.kl_horizon
    slack = 1e-9  # the KL sits below 0.8 x target every update, so the lower bound is met exactly (up to rounding)
    assert 0.3 * (1 - step) ** UPDATES * (1 - slack) <= final <= 0.3 * (1 + step) ** UPDATES
    assert final < 0.3  # it did move (down: the KL was below the target), only not far
    assert abs(_final_kl(history) - TARGET) > TOLERANCE * TARGET, [h["ppo/kl"] for h in history]


@pytest.mark.parametrize("step", ["log", "log_pd"])
def test_trainer_resume_keeps_the_log_controller_and_its_ramp_exactly(toy_policy, step: str) -> None:
    """A run stopped after 3 of 6 updates and resumed from its state_dict ends like the uninterrupted run: the
    coefficient, the place on the target's ramp and (log_pd) the filtered log error come back with the checkpoint."""
    import copy

    kw = {
        "kl_controller_step": step,
        "kl_damping_smoothing": 0.5,
        "updates": 6,
        "lr": 1e-2,  # the KL reaches about 1.3 nats by update 4: past the ramp's early targets, short of the last
        "kl_coef": 0.01,
        "kl_target": 2.0,
        "kl_horizon": "auto",
        "kl_target_ramp": 1.0,
    }
    want = _trainer(toy_policy, **kw).train().history
    first = _trainer(toy_policy, **kw)
    first.s = first.s.model_copy(update={"updates": 3})
    first.train()
    state = first.state_dict()
    assert state["kl_ctl"]["n_updates"] == 3
    assert (state["kl_ctl"]["smoothed_log_error"] is None) == (step == "log")
    resumed = _trainer(toy_policy, **kw)
    resumed.load_state_dict(copy.deepcopy(state))
    got = resumed.train().history
    assert len(got) == 6
    assert len({h["ppo/kl_coef"] for h in want}) == 6  # the coefficient moved every update
    for w, g in zip(want, got, strict=True):
        for k in ("ppo/kl_coef", "ppo/kl", "ppo/reward_mean", "ppo/policy_loss"):
            assert g[k] == pytest.approx(w[k], rel=1e-9, abs=1e-9), (k, w["update"])
