"""The rollout engine: the KV-cache engine's speed options against the plain sampler, on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from preftune.ppo import core
from preftune.ppo.engine import KVCacheEngine, SamplingParams, finish_reasons, merged_lora
from preftune.ppo.policy import ActorCritic
from preftune.ppo.sampling import sample

TEXTS = ["User: hi\nAssistant:", "User: how do I bake bread today, please\nAssistant:", "User: a joke\nAssistant:"]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from preftune.ppo import toy

    torch.set_num_threads(1)
    return toy.build_policy(tmp_path_factory.mktemp("policy"), eos_boost=3.0, initializer_range=0.3)


def _load(policy_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    tok = AutoTokenizer.from_pretrained(policy_dir)
    tok.padding_side = "left"
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    return model, tok, enc["input_ids"], enc["attention_mask"]


def _sample(model, tok, ids, mask, seed: int = 0, **kw):
    gen = torch.Generator().manual_seed(seed)
    out = sample(
        model,
        ids,
        mask,
        max_new_tokens=12,
        temperature=1.0,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        generator=gen,
        with_scores=True,
        **kw,
    )
    return out, gen.get_state()


def test_early_exit_samples_the_same_tokens_and_leaves_the_generator_where_it_was(policy_dir: Path) -> None:
    model, tok, ids, mask = _load(policy_dir)
    plain, state_plain = _sample(model, tok, ids, mask)
    early, state_early = _sample(model, tok, ids, mask, early_exit=True)
    resp_mask = core.response_mask(plain.response_ids, tok.eos_token_id)
    lengths = resp_mask.sum(dim=1)
    assert len(set(lengths.tolist())) > 1  # rows finish at different steps, so rows really left the batch
    assert early.n_forward_tokens < plain.n_forward_tokens
    assert torch.equal(early.response_ids, plain.response_ids)
    assert torch.equal(state_early, state_plain)  # the random stream advanced exactly as before
    # on the response tokens: the same numbers up to float rounding (smaller batches, other GEMM blocking)
    for got, want in ((early.logprobs, plain.logprobs), (early.entropy, plain.entropy)):
        assert torch.allclose(got * resp_mask, want * resp_mask, atol=1e-5, rtol=0)
    assert torch.allclose(early.hidden[resp_mask], plain.hidden[resp_mask], atol=1e-5, rtol=0)


def test_k_samples_from_one_prefill_equal_k_prefills(policy_dir: Path) -> None:
    model, tok, ids, mask = _load(policy_dir)
    k = 3
    repeated, _ = _sample(model, tok, ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0), seed=5)
    shared, _ = _sample(model, tok, ids, mask, seed=5, num_samples=k)
    assert shared.response_ids.shape[0] == ids.shape[0] * k
    assert shared.n_forward_tokens < repeated.n_forward_tokens
    assert torch.equal(shared.prompt_ids, ids.repeat_interleave(k, 0))
    assert torch.equal(shared.response_ids, repeated.response_ids)
    # the same tokens; log-probs equal up to float rounding (a k-times smaller prefill batch blocks its GEMMs
    # differently on CPU), so this is not bit-identical
    assert torch.allclose(shared.logprobs, repeated.logprobs, atol=1e-5, rtol=0)
    assert len({tuple(r) for r in shared.response_ids[:k].tolist()}) > 1  # k different responses to one prompt


def test_merged_lora_matches_the_adapter_and_restores_the_exact_weights(policy_dir: Path) -> None:
    model, tok, ids, mask = _load(policy_dir)
    torch.manual_seed(0)
    actor = ActorCritic(model, mode="lora", critic="shared", temperature=1.0, lora_r=8, lora_alpha=16)
    with torch.no_grad():  # a trained-looking adapter (B starts at zero: merging it would prove nothing)
        for n, p in actor.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    before = {n: p.detach().clone() for n, p in actor.model.named_parameters()}
    seq = torch.cat([ids, ids[:, -4:]], dim=1)
    attn = torch.cat([mask, torch.ones_like(mask[:, -4:])], dim=1)
    with torch.no_grad():
        want, _ = actor.policy_forward(seq, attn, 4)
        ref = actor.ref_logits(seq, attn, 4)
        with merged_lora(actor.model) as n_merged:
            got, _ = actor.policy_forward(seq, attn, 4)
        assert n_merged > 0
        assert not torch.allclose(want, ref, atol=1e-3)  # the adapter does change the policy
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
        assert torch.equal(actor.ref_logits(seq, attn, 4), ref)  # the reference (adapter off) is untouched
    for n, p in actor.model.named_parameters():
        assert torch.equal(p, before[n]), n  # bit-exact restore (not peft's subtract-again unmerge)


def test_engine_with_merged_lora_samples_what_the_adapter_samples(policy_dir: Path) -> None:
    model, tok, ids, mask = _load(policy_dir)
    torch.manual_seed(0)
    actor = ActorCritic(model, mode="lora", critic="shared", temperature=1.0, lora_r=8, lora_alpha=16)
    with torch.no_grad():
        for n, p in actor.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    params = SamplingParams(12, 1.0, tok.eos_token_id, tok.pad_token_id, batch_size=2)
    plain = KVCacheEngine(actor.policy_lm).generate(ids, mask, params, torch.Generator().manual_seed(1))
    merged = KVCacheEngine(actor.policy_lm, merge_lora=True).generate(
        ids, mask, params, torch.Generator().manual_seed(1)
    )
    assert torch.equal(merged.response_ids, plain.response_ids)
    assert torch.allclose(merged.logprobs, plain.logprobs, atol=1e-4, rtol=0)
    assert merged.finish_reasons == plain.finish_reasons


@pytest.mark.parametrize("k", [1, 2])
def test_length_batching_cuts_the_padding_and_returns_the_rows_in_order(policy_dir: Path, k: int) -> None:
    """Near-greedy sampling (T 1e-4) makes each row's tokens independent of the random draws, so the rows with
    length batching must be the rows without it, in the input order, from fewer forward tokens."""
    model, tok, ids, mask = _load(policy_dir)
    assert len(set(mask.sum(dim=1).tolist())) == 3  # three prompt lengths
    params = SamplingParams(12, 1e-4, tok.eos_token_id, tok.pad_token_id, num_samples=k, batch_size=k)
    plain = KVCacheEngine(model).generate(ids, mask, params, torch.Generator().manual_seed(3))
    grouped = KVCacheEngine(model, length_batching=True).generate(ids, mask, params, torch.Generator().manual_seed(3))
    assert grouped.n_forward_tokens < plain.n_forward_tokens  # the short prompts' chunks lost their padding
    assert torch.equal(grouped.response_ids, plain.response_ids)
    assert grouped.finish_reasons == plain.finish_reasons
    resp_mask = core.response_mask(plain.response_ids, tok.eos_token_id)
    assert torch.allclose(grouped.hidden[resp_mask], plain.hidden[resp_mask], atol=1e-4, rtol=0)
    assert torch.allclose(grouped.logprobs * resp_mask, plain.logprobs * resp_mask, atol=1e-4, rtol=0)
    # one chunk: nothing to group, the very same rollout (the same draws, bit for bit)
    whole = SamplingParams(12, 1.0, tok.eos_token_id, tok.pad_token_id, num_samples=k, batch_size=64)
    a = KVCacheEngine(model).generate(ids, mask, whole, torch.Generator().manual_seed(4))
    b = KVCacheEngine(model, length_batching=True).generate(ids, mask, whole, torch.Generator().manual_seed(4))
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)


SYSTEM = "System: you are a careful assistant; answer briefly, kindly and safely, and say when you do not know.\n"


@pytest.mark.parametrize(("k", "static"), [(1, False), (2, False), (1, True)])
def test_a_shared_prompt_prefix_is_prefilled_once_and_samples_the_same_rows(
    policy_dir: Path, k: int, static: bool
) -> None:
    from preftune.ppo.sampling import shared_prefix_length
    from preftune.ppo.static_decode import StaticDecoder

    model, tok, _, _ = _load(policy_dir)
    enc = tok([SYSTEM + t for t in TEXTS], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    alone = tok(SYSTEM.rstrip("\n"), return_tensors="pt")["input_ids"].shape[1]
    prefix = shared_prefix_length(ids, mask)
    assert prefix >= alone - 1 > 10  # the system text (up to its last token, which may merge with the next)
    dec = (lambda: StaticDecoder(model, bucket=16, compile_step=False)) if static else (lambda: None)
    plain, state_plain = _sample(model, tok, ids, mask, seed=6, num_samples=k, decoder=dec())
    shared, state_shared = _sample(model, tok, ids, mask, seed=6, num_samples=k, decoder=dec(), share_prefix=8)
    assert shared.n_forward_tokens == plain.n_forward_tokens - (len(TEXTS) - 1) * prefix - (
        int(mask.shape[1] - mask.sum(dim=1).max())  # plain also ran the longest row's (zero) left padding
    ) * len(TEXTS)
    assert torch.equal(shared.response_ids, plain.response_ids)
    assert torch.equal(state_shared, state_plain)
    resp_mask = core.response_mask(plain.response_ids, tok.eos_token_id)
    for got, want in ((shared.logprobs, plain.logprobs), (shared.entropy, plain.entropy)):
        assert torch.allclose(got * resp_mask, want * resp_mask, atol=1e-4, rtol=0)
    assert torch.allclose(shared.hidden[resp_mask], plain.hidden[resp_mask], atol=1e-4, rtol=0)
    # a minimum longer than what the rows share: the plain prefill, the very same numbers
    off, _ = _sample(model, tok, ids, mask, seed=6, num_samples=k, decoder=dec(), share_prefix=prefix + 1)
    assert torch.equal(off.response_ids, plain.response_ids) and torch.equal(off.logprobs, plain.logprobs)


def test_bf16_rollout_log_probs_stay_within_the_stated_tolerance(policy_dir: Path) -> None:
    model, tok, ids, mask = _load(policy_dir)
    params = SamplingParams(12, 1.0, tok.eos_token_id, tok.pad_token_id)
    out = KVCacheEngine(model, dtype="bf16").generate(ids, mask, params, torch.Generator().manual_seed(2))
    resp_mask = core.response_mask(out.response_ids, tok.eos_token_id)
    R = out.response_ids.shape[1]
    seq = torch.cat([ids, out.response_ids], dim=1)
    attn = torch.cat([mask, resp_mask.long()], dim=1)
    actor = ActorCritic(model, mode="full", critic="none", temperature=1.0)
    with torch.no_grad():
        logits, _ = actor.policy_forward(seq, attn, R)
    fp32 = core.logprobs_from_logits(logits, out.response_ids)
    diff = ((out.logprobs - fp32).abs() * resp_mask).max()
    assert float(diff) < 0.1  # docs/ppo.md: bf16 rollout log-probs within 0.1 nats per token of fp32


def test_finish_reasons_and_chunking_do_not_change_the_rows(policy_dir: Path) -> None:
    model, tok, ids, mask = _load(policy_dir)
    params = SamplingParams(3, 1.0, tok.eos_token_id, tok.pad_token_id, batch_size=8)
    out = KVCacheEngine(model).generate(ids, mask, params, torch.Generator().manual_seed(3))
    want = ["stop" if tok.eos_token_id in row else "length" for row in out.response_ids.tolist()]
    assert out.finish_reasons == want == finish_reasons(out.response_ids, tok.eos_token_id)
    assert set(want) <= {"stop", "length"}


# -- the engine inside the rollout --------------------------------------------------------------


def _maker(policy_dir: Path, engine=None, **kw):
    from preftune.ppo.config import PPOSection
    from preftune.ppo.distributed import DistContext
    from preftune.ppo.guards import Guards
    from preftune.ppo.rollout import RolloutMaker

    model, tok, _, _ = _load(policy_dir)
    base = dict(batch_size=8, mini_batch_size=4, max_new_tokens=8, progress=False, missing_eos_penalty=None)
    s = PPOSection(**{**base, **kw})  # type: ignore[arg-type]
    torch.manual_seed(0)
    actor = ActorCritic(model, mode="lora", critic="shared", temperature=1.0, lora_r=8, lora_alpha=16)

    def reward(prompts, responses):
        return torch.tensor([-len(r) / 8.0 for r in responses])

    guards = Guards(s, DistContext.of(), lambda: None)
    return RolloutMaker(
        s,
        actor,
        tok,
        reward,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
        guards=guards,
        engine=engine(actor) if engine else None,
    )


def _items(k: int):
    from preftune.ppo.rollout import PromptItem

    prompts = ["hi", "how do I bake bread", "tell me a joke", "write a haiku"]
    return [PromptItem(p, "toy", f"p{i}") for i, p in enumerate(prompts) for _ in range(k)]


def test_rollout_shares_the_prefill_of_repeated_prompts(policy_dir: Path) -> None:
    items = _items(2)
    shared = _maker(policy_dir, samples_per_prompt=2, forward_batch_size=4).make(items, 1, 0.05)
    apart = _maker(policy_dir, samples_per_prompt=2, forward_batch_size=4, rollout_share_prefill=False)
    each = apart.make(items, 1, 0.05)
    assert torch.equal(shared.prompt_ids, each.prompt_ids)
    assert torch.equal(shared.response_ids, each.response_ids)
    assert torch.allclose(shared.logprobs, each.logprobs, atol=1e-5, rtol=0)
    assert shared.responses == each.responses


class _ServingLikeEngine:
    """An engine that, like vLLM, returns tokens only: the trainer must recompute log-probs and values."""

    def __init__(self, actor) -> None:
        self.inner = KVCacheEngine(actor.policy_lm)
        self.synced = 0

    def sync(self) -> None:
        self.synced += 1

    def generate(self, prompt_ids, prompt_mask, params, generator):
        gen = self.inner.generate(prompt_ids, prompt_mask, params, generator)
        gen.logprobs = gen.entropy = gen.hidden = None
        return gen


def test_the_rollout_passes_length_batching_and_the_shared_prefix_to_its_engine(policy_dir: Path) -> None:
    """The two options from the config to a whole rollout: chunks of 2 over 8 prompts of four lengths that all
    start with the toy chat template's text. Near-greedy sampling (T 1e-4) makes each response a function of its
    prompt alone, so the rows must be the plain rollout's, each with its own prompt."""
    from preftune.ppo.sampling import shared_prefix_length

    items = _items(2)
    plain = _maker(policy_dir, forward_batch_size=2, temperature=1e-4).make(items, 1, 0.05)
    maker = _maker(
        policy_dir, forward_batch_size=2, temperature=1e-4, rollout_length_batching=True, rollout_share_prefix=1
    )
    assert maker.engine.length_batching and maker.engine.share_prefix == 1
    assert shared_prefix_length(plain.prompt_ids[:2], plain.prompt_mask[:2]) >= 1  # the template's text is shared
    both = maker.make(items, 1, 0.05)
    assert torch.equal(both.prompt_ids, plain.prompt_ids)
    assert torch.equal(both.response_ids, plain.response_ids) and both.responses == plain.responses
    assert len(set(plain.responses)) > 1  # different prompts, different answers: a row swap would show
    assert torch.isfinite(both.logprobs).all() and torch.isfinite(both.advantages).all()


def test_an_engine_without_log_probs_gets_them_recomputed_by_the_trainer(policy_dir: Path) -> None:
    items = _items(1) * 2
    maker = _maker(policy_dir, engine=_ServingLikeEngine)
    got = maker.make(items, 1, 0.05)
    want = _maker(policy_dir, logprobs_from_sampling=False).make(items, 1, 0.05)
    assert maker.engine.synced == 1  # the engine is synced before every rollout (= after every update)
    assert torch.equal(got.response_ids, want.response_ids)
    assert torch.equal(got.logprobs, want.logprobs) and torch.equal(got.values, want.values)


# -- static KV cache + compiled decode step (ppo.rollout_compile) ---------------------------------


def _static_vs_eager(policy_dir: Path, compile_step: bool, seed: int = 4, num_samples: int = 1):
    from preftune.ppo.static_decode import StaticDecoder

    model, tok, ids, mask = _load(policy_dir)
    eager, state_eager = _sample(model, tok, ids, mask, seed=seed, num_samples=num_samples)
    decoder = StaticDecoder(model, bucket=16, compile_step=compile_step)
    static, state_static = _sample(model, tok, ids, mask, seed=seed, num_samples=num_samples, decoder=decoder)
    return tok, eager, state_eager, static, state_static, decoder


def _assert_same_rollout(tok, eager, state_eager, static, state_static) -> None:
    resp_mask = core.response_mask(eager.response_ids, tok.eos_token_id)
    assert len(set(resp_mask.sum(dim=1).tolist())) > 1  # rows of different lengths: the mask really matters
    assert torch.equal(static.response_ids, eager.response_ids)
    assert torch.equal(state_static, state_eager)
    assert static.n_forward_tokens == eager.n_forward_tokens
    # the softmax over the longer (masked) static row sums in another order: float rounding, not bit for bit
    for got, want in ((static.logprobs, eager.logprobs), (static.entropy, eager.entropy)):
        assert torch.allclose(got * resp_mask, want * resp_mask, atol=1e-5, rtol=0)
    assert torch.allclose(static.hidden[resp_mask], eager.hidden[resp_mask], atol=1e-5, rtol=0)


def test_static_cache_decode_samples_what_the_eager_sampler_samples(policy_dir: Path) -> None:
    _assert_same_rollout(*_static_vs_eager(policy_dir, compile_step=False)[:5])


def test_static_cache_decode_with_k_samples_from_one_prefill(policy_dir: Path) -> None:
    tok, eager, s1, static, s2, _ = _static_vs_eager(policy_dir, compile_step=False, num_samples=2)
    assert static.response_ids.shape[0] == 2 * len(TEXTS)
    _assert_same_rollout(tok, eager, s1, static, s2)


def test_cache_length_rounds_up_to_the_bucket() -> None:
    from preftune.ppo.static_decode import cache_length

    assert cache_length(10, 32, 64) == 64
    assert cache_length(33, 32, 64) == 128
    assert cache_length(32, 32, 64) == 64
    assert cache_length(5, 3, 1) == 8


def test_a_failing_compile_falls_back_to_the_eager_static_step_logged_once(
    policy_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from preftune.ppo import static_decode

    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler here")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(static_decode, "_WARNED", set())
    with caplog.at_level("WARNING", logger="preftune.ppo.static_decode"):
        tok, eager, s1, static, s2, decoder = _static_vs_eager(policy_dir, compile_step=True)
        _static_vs_eager(policy_dir, compile_step=True)  # a second decoder: no second warning
    assert not decoder.is_compiled and "no C++ compiler here" in (decoder.failed or "")
    _assert_same_rollout(tok, eager, s1, static, s2)  # the failed first call left the cache as it was
    warnings = [r for r in caplog.records if "rollout_compile" in r.getMessage()]
    assert len(warnings) == 1


def test_compile_and_early_exit_are_refused_together() -> None:
    from pydantic import ValidationError

    from preftune.ppo.config import PPOSection

    with pytest.raises(ValidationError, match="rollout_early_exit"):
        PPOSection(rollout_compile=True, rollout_early_exit=True)
    with pytest.raises(ValueError, match="early_exit"):
        KVCacheEngine(torch.nn.Linear(1, 1), compile=True, early_exit=True)


@pytest.mark.slow
def test_compiled_decode_step_samples_what_the_eager_sampler_samples(policy_dir: Path) -> None:
    """The real torch.compile (tens of seconds on CPU): the same tokens, log-probs to float rounding."""
    tok, eager, s1, static, s2, decoder = _static_vs_eager(policy_dir, compile_step=True)
    if decoder.failed:
        pytest.skip(f"torch.compile is unavailable here: {decoder.failed}")
    assert decoder.is_compiled
    _assert_same_rollout(tok, eager, s1, static, s2)


def test_rollout_with_compile_on_keeps_the_rollout(policy_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ppo.rollout_compile through the rollout maker (eager static step here: the compile itself is tested above)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the static step, run eagerly
    items = _items(1) * 2
    got = _maker(policy_dir, rollout_compile=True, rollout_compile_bucket=8).make(items, 1, 0.05)
    want = _maker(policy_dir).make(items, 1, 0.05)
    assert torch.equal(got.response_ids, want.response_ids)
    assert torch.allclose(got.logprobs, want.logprobs, atol=1e-5, rtol=0)
    assert torch.allclose(got.values, want.values, atol=1e-5, rtol=0)
    assert got.responses == want.responses
