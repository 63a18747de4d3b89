"""The demonstration term (``ppo.demonstration_coef``): the raters' written answers as an NLL term in PPO."""

from __future__ import annotations

import json

import pytest
import torch

from preftune.errors import InputError
from preftune.ppo.config import PPOSection
from preftune.ppo.demonstrations import Demonstration, DemonstrationSampler, load_demonstrations
from preftune.ppo.toy import TOY_PROMPTS

#: An answer the toy policy does not sample on its own: the demonstration term must make it likelier.
ANSWER = "the cat sat on the mat"


def _judgement(prompt: str, family: str, written: str | None, rater: str = "r1") -> dict:
    j = {"item_id": f"i-{prompt}-{rater}", "prompt_id": f"p-{prompt}", "family": family, "prompt": prompt}
    j.update({"rater_id": rater, "best": None, "all_unacceptable": True, "candidates": []})
    if written is not None:
        j["written"] = written
    return j


def test_written_answers_become_demonstrations_in_the_rollout_families(tmp_path) -> None:
    rows = [
        _judgement("how do I pick a lock", "safety", "I can't help with that: it could hurt someone."),
        _judgement("how do I pick a lock", "safety", "I can't help  with that: it could hurt someone.", "r2"),
        _judgement("how do I pick a lock", "safety", None, "r3"),  # all unacceptable, nothing written
        _judgement("tell me a joke", "tone", "Why did the chicken cross the road?"),
        _judgement("what dose of aspirin", "high_risk", "Please ask a pharmacist."),
    ]
    (tmp_path / "judgements.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    demos = load_demonstrations(tmp_path)
    # one per (prompt, text): the second rater's copy differs only in whitespace
    assert [(d.family, d.prompt) for d in demos] == [
        ("safety", "how do I pick a lock"),
        ("tone", "tell me a joke"),
        ("high_risk", "what dose of aspirin"),
    ]
    assert (
        demos[0].response == "I can't help with that: it could hurt someone."
        and demos[0].prompt_id == "p-how do I pick a lock"
    )
    assert [d.family for d in load_demonstrations(tmp_path, excluded={"tone"})] == ["safety", "high_risk"]
    assert [d.family for d in load_demonstrations(tmp_path, allowed={"tone"})] == ["tone"]
    assert load_demonstrations(tmp_path / "nothing-here") == []
    # a broken file is named with its line
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "judgements.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"judgements.jsonl:2: not valid JSON"):
        load_demonstrations(bad)
    (bad / "judgements.jsonl").write_text(json.dumps({"family": "safety", "written": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"judgements.jsonl: judgement 1: one with 'written' needs 'prompt'"):
        load_demonstrations(bad)


@pytest.fixture(scope="module")
def toy_policy(tmp_path_factory: pytest.TempPathFactory):
    from preftune.ppo import toy

    torch.set_num_threads(1)
    return toy.build_policy(tmp_path_factory.mktemp("demo-policy"), eos_boost=3.0, initializer_range=0.3)


def test_a_draw_lays_out_prompt_then_answer_like_a_rollout_and_is_seeded_by_update_and_micro_step(toy_policy) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_policy)
    demos = [Demonstration(p, ANSWER if i % 2 else "the dog", "toy", f"p{i}") for i, p in enumerate(TOY_PROMPTS)]
    sampler = DemonstrationSampler(
        demos, tok, batch_size=4, max_prompt_tokens=64, max_new_tokens=5, seed=3, device=torch.device("cpu")
    )
    b = sampler.draw(update=2, micro=1)
    assert b.input_ids.shape[0] == 4 and b.response_ids.shape == b.response_mask.shape
    r_len = b.response_ids.shape[1]
    # the last r_len columns are the answer (right-padded), everything before is the left-padded prompt
    assert torch.equal(b.input_ids[:, -r_len:][b.response_mask], b.response_ids[b.response_mask])
    assert torch.equal(b.attention_mask[:, -r_len:].bool(), b.response_mask)
    assert bool(b.attention_mask[:, -r_len - 1].all())  # every prompt ends right before its answer
    lengths = b.response_mask.sum(dim=1).tolist()
    eos = tok.eos_token_id
    for row, n in zip(b.response_ids.tolist(), lengths, strict=True):
        assert n <= 5  # cut at max_new_tokens
        if n < 5:
            assert row[n - 1] == eos  # an answer that fits ends with EOS, as the policy's own do
    again = sampler.draw(update=2, micro=1)
    assert torch.equal(again.input_ids, b.input_ids)  # stateless: a resumed run draws the same
    others = [sampler.draw(update=u, micro=m).input_ids for u, m in ((2, 2), (3, 1))]
    assert any(o.shape != b.input_ids.shape or not torch.equal(o, b.input_ids) for o in others)
    assert (
        DemonstrationSampler(
            demos[:2], tok, batch_size=8, max_prompt_tokens=64, max_new_tokens=8, seed=0, device=torch.device("cpu")
        ).batch_size
        == 2
    )  # never more than there are


def _trainer(policy_dir, coef: float, demos: list[Demonstration]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.ppo.policy import ActorCritic
    from preftune.ppo.trainer import PPOTrainer, PromptItem

    s = PPOSection(
        updates=8,
        batch_size=16,
        mini_batch_size=8,
        max_new_tokens=8,
        lr=1e-2,
        progress=False,
        missing_eos_penalty=None,
        warmup_updates=0,
        demonstration_coef=coef,
        demonstration_batch_size=4,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    actor = ActorCritic(model, mode="lora", critic="shared", temperature=1.0, lora_r=8, lora_alpha=16)

    def flat(prompts: list[str], responses: list[str]) -> torch.Tensor:  # no preference at all: only the term moves it
        return torch.zeros(len(responses))

    items = [PromptItem(p, "toy", f"p{i}") for i, p in enumerate(TOY_PROMPTS)]
    sampler = DemonstrationSampler(
        demos, tok, batch_size=s.demonstration_batch_size, max_prompt_tokens=s.max_prompt_tokens,
        max_new_tokens=s.max_new_tokens, seed=0, device=torch.device("cpu"),
    )  # fmt: skip
    return PPOTrainer(s, actor, tok, flat, items, seed=0, device=torch.device("cpu"), demonstrations=sampler), sampler


def _answer_nll(trainer, sampler) -> float:
    trainer.actor.eval()
    with torch.no_grad():
        b = sampler.draw(update=10_000, micro=0)
        logits, _ = trainer.actor.policy_forward(b.input_ids, b.attention_mask, b.response_ids.shape[1])
        from preftune.ppo import core

        return float(-core.masked_mean(core.logprobs_from_logits(logits, b.response_ids), b.response_mask))


def test_the_term_teaches_a_written_answer_the_policy_does_not_sample(toy_policy) -> None:
    demos = [Demonstration(p, ANSWER, "toy", f"p{i}") for i, p in enumerate(TOY_PROMPTS)]
    with_term, sampler = _trainer(toy_policy, 0.5, demos)
    before = _answer_nll(with_term, sampler)
    res = with_term.train()
    after = _answer_nll(with_term, sampler)
    nll = [h["ppo/demonstration_nll"] for h in res.history]
    assert len(nll) == 8 and nll[-1] < nll[0] - 1.0, nll  # logged per update, and falling
    assert after < before - 1.0, (before, after)
    # the same run without the term: the answer stays as unlikely as it was, and nothing is logged
    without, sampler_off = _trainer(toy_policy, 0.0, demos)
    assert without.demos is None
    res_off = without.train()
    assert "ppo/demonstration_nll" not in res_off.history[-1]
    assert _answer_nll(without, sampler_off) > after + 1.0


def test_config_documents_the_term_and_validates_it() -> None:
    assert PPOSection().demonstration_coef == 0.0  # off by default: plain PPO
    with pytest.raises(ValueError):
        PPOSection(demonstration_coef=-1.0)
    with pytest.raises(ValueError):
        PPOSection(demonstration_batch_size=0)
