"""Candidate sampling on a tiny causal LM built here (no download): batching, padding, seeding, EOS, output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.threads import one_thread  # noqa: F401 - autouse: torch on one thread

from preftune.config import parse_config
from preftune.data.validation import ValidationReport
from preftune.generation.candidates import PromptRecord, cut_at_eos, load_prompts, sample_candidates, select_fraction
from preftune.storage import Storage

EOS = "<|endoftext|>"
WORDS = "the a cat dog sat ran on under mat tree red blue quickly slowly and then User Assistant : ? .".split()


def _tiny_lm(root: Path, uniform: bool) -> str:
    """A 1-layer GPT-2 with a word-level tokenizer; ``uniform`` zeroes the head (every token equally likely)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {EOS: 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token="<unk>")
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(vocab),
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=not uniform,
    )
    model = GPT2LMHeadModel(config)
    if uniform:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    path = root / ("uniform" if uniform else "random")
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-lm")
    return {"uniform": _tiny_lm(root, True), "random": _tiny_lm(root, False)}


def _prompts(*texts: str) -> list[PromptRecord]:
    return [PromptRecord(prompt_id=f"p{i}", family="f", tags=(), prompt=t) for i, t in enumerate(texts)]


def _gen(**kw):
    return parse_config({"data": {"generation": kw}}).data.generation


def test_cut_at_eos():
    assert cut_at_eos([5, 6, 0, 7, 0, 0], {0}) == [5, 6]
    assert cut_at_eos([5, 6], {0}) == [5, 6]
    assert cut_at_eos([0, 5], {0, 9}) == []


def test_sampling_is_batched_seeded_and_cut_at_eos(models):
    prompts = _prompts("the cat sat", "a dog ran on the mat", "red tree", "blue", "the dog sat under a tree")
    gen = _gen(n_candidates=4, max_new_tokens=30, batch_size=2)
    texts, stats = sample_candidates(models["uniform"], prompts, gen, seed=1, progress=False)
    assert len(texts) == 5 and all(len(c) == 4 for c in texts)
    again, _ = sample_candidates(models["uniform"], prompts, gen, seed=1, progress=False)
    other, _ = sample_candidates(models["uniform"], prompts, gen, seed=2, progress=False)
    assert again == texts and other != texts
    # every token is equally likely, EOS included: with 20 candidates of up to 30 tokens some stop early
    assert stats.candidates == 20 and 0 < stats.new_tokens < 20 * 30
    assert all(EOS not in t for c in texts for t in c)
    assert stats.candidates_per_s > 0 and stats.tokens_per_s > 0 and stats.device == "cpu"


def test_left_padding_gives_the_same_answer_alone_and_in_a_batch(models):
    short, long = "the cat", "the dog sat on the red mat and then ran under a blue tree"
    gen = _gen(n_candidates=2, max_new_tokens=8, temperature=1e-4, batch_size=8)
    alone, _ = sample_candidates(models["random"], _prompts(short), gen, seed=0, progress=False)
    batched, _ = sample_candidates(models["random"], _prompts(long, short), gen, seed=0, progress=False)
    assert batched[1] == alone[0]  # the short prompt was left-padded next to the long one
    assert alone[0][0]  # a near-greedy answer of a random model is not empty


def test_prompts_from_jsonl_parquet_and_slices(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"id": f"s{i}", "family": "safety" if i % 2 else "benign", "prompt": f"question {i}?", "tags": ["t"]}
        for i in range(20)
    ]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"id": "x"}\n')
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    cfg = parse_config({})
    report = ValidationReport()
    from_jsonl = load_prompts(str(tmp_path / "p.jsonl"), cfg, Storage(), report)
    from_parquet = load_prompts(str(tmp_path / "p.parquet"), cfg, Storage(), ValidationReport())
    assert len(from_jsonl) == 20 and from_jsonl[3].prompt_id == "s3" and from_jsonl[3].tags == ("t",)
    assert from_jsonl[3].where == f"{tmp_path / 'p.jsonl'}:4"
    assert [(p.prompt_id, p.family, p.prompt) for p in from_jsonl] == [
        (p.prompt_id, p.family, p.prompt) for p in from_parquet
    ]
    assert report.dropped == {"schema_error": 1}
    half = select_fraction(from_jsonl, 0.5, seed=0)
    assert len(half) == 10 and {p.family for p in half} == {"safety", "benign"}
    assert select_fraction(from_jsonl, 0.5, seed=0) == half and select_fraction(from_jsonl, 0.5, seed=1) != half


def test_candidates_only_writes_the_exchange_format(models, tmp_path):
    from mlflow.tracking import MlflowClient

    from preftune.collect import generate_candidates
    from preftune.tracking import resolve_tracking_uri

    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "family": "benign", "prompt": f"the cat sat {i}"}) + "\n" for i in range(3))
    )
    cfg = parse_config(
        {
            "models": {"policy": models["uniform"]},
            "data": {
                "prompts": str(tmp_path / "prompts.jsonl"),
                "generation": {"n_candidates": 3, "max_new_tokens": 6},
            },
            "tracking": {"experiment": "test-collect"},
        }
    )
    res = generate_candidates(cfg, str(tmp_path / "out"))
    lines = [json.loads(x) for x in (tmp_path / "out" / "candidates.jsonl").read_text().splitlines()]
    assert res.items == len(lines) == 3
    rec = lines[0]
    assert rec["format"] == "preftune.candidates" and rec["version"] == 1 and rec["policy"] == models["uniform"]
    assert [c["id"] for c in rec["candidates"]] == ["c0", "c1", "c2"] and rec["prompt_id"] == "q0"
    assert rec["item_id"] and rec["created_at"].endswith("Z")
    run = MlflowClient(resolve_tracking_uri(cfg.tracking)).get_run(res.mlflow_run_id)
    assert run.data.metrics["generation.candidates"] == 9 and run.data.metrics["generation.candidates_per_s"] > 0


def test_extra_prompts_are_added_whole_without_duplicates(models, tmp_path):
    from preftune.collect import generate_candidates

    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "family": "benign", "prompt": f"the cat sat {i}"}) + "\n" for i in range(4))
    )
    # observe's hard cases: one new prompt, one already in the prompt set
    (tmp_path / "hard_cases.jsonl").write_text(
        json.dumps({"id": "observed-1", "family": "safety", "prompt": "a new jailbreak", "tags": ["observed"]})
        + "\n"
        + json.dumps({"id": "observed-2", "family": "benign", "prompt": "the cat sat 0"})
        + "\n"
    )
    cfg = parse_config(
        {
            "models": {"policy": models["uniform"]},
            "data": {
                "prompts": str(tmp_path / "prompts.jsonl"),
                "extra_prompts": [str(tmp_path / "hard_cases.jsonl")],
                "generation": {"n_candidates": 2, "max_new_tokens": 4},
            },
            "tracking": {"experiment": "test-collect"},
        }
    )
    res = generate_candidates(cfg, str(tmp_path / "out"))
    lines = [json.loads(x) for x in (tmp_path / "out" / "candidates.jsonl").read_text().splitlines()]
    assert res.items == 5 and lines[-1]["prompt_id"] == "observed-1" and lines[-1]["family"] == "safety"
    assert res.validation["dropped"] == {"duplicate": 1}


def _extra_prompts_data(tmp_path: Path, usual: list[str], hard: str, max_new_tokens: int) -> dict:
    """A data section: the usual prompts (benign) and one observed hard case (safety) as extra prompts with 5
    candidates against the usual 2."""
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "family": "benign", "prompt": p}) + "\n" for i, p in enumerate(usual))
    )
    (tmp_path / "hard_cases.jsonl").write_text(
        json.dumps({"id": "observed-1", "family": "safety", "prompt": hard}) + "\n"
    )
    gen = {"n_candidates": 2, "max_new_tokens": max_new_tokens}
    return {
        "prompts": str(tmp_path / "prompts.jsonl"),
        "extra_prompts": [str(tmp_path / "hard_cases.jsonl")],
        "generation": gen,
        "extra_generation": {**gen, "n_candidates": 5},
    }


def _generate(policy: str, data: dict, tmp_path: Path):
    """generate_candidates on ``data`` with ``policy``: its result and the candidates file's records."""
    from preftune.collect import generate_candidates

    cfg = parse_config({"models": {"policy": policy}, "data": data, "tracking": {"experiment": "test-collect"}})
    res = generate_candidates(cfg, str(tmp_path / "out"))
    return res, [json.loads(x) for x in (tmp_path / "out" / "candidates.jsonl").read_text().splitlines()]


def test_extra_prompts_have_their_own_candidate_settings(models, tmp_path):
    """data.extra_generation: observe's hard cases get more candidates than the usual prompts."""
    data = _extra_prompts_data(tmp_path, [f"the cat sat {i}" for i in range(3)], "a new jailbreak", 4)
    res, lines = _generate(models["uniform"], data, tmp_path)
    assert [len(r["candidates"]) for r in lines] == [2, 2, 2, 5] and lines[-1]["prompt_id"] == "observed-1"
    assert res.generation["candidates"] == 11 and res.generation["prompts"] == 4


def test_extra_policies_share_the_extra_prompts_candidates(models, tmp_path):
    """data.extra_policies: the hard cases' candidates split between models.policy (the remainder first) and each
    further policy (e.g. a rejected candidate, whose answers the raters must rank), each with its own seed."""
    from preftune.errors import ConfigError, InputError

    data = {
        **_extra_prompts_data(tmp_path, ["the cat sat"], "a dog ran on the mat", 6),
        "extra_policies": [models["random"]],
    }
    res, lines = _generate(models["uniform"], data, tmp_path)
    assert [len(r["candidates"]) for r in lines] == [2, 5]
    hard = _prompts("a dog ran on the mat")
    own, _ = sample_candidates(models["uniform"], hard, _gen(n_candidates=3, max_new_tokens=6), seed=1)
    further, _ = sample_candidates(models["random"], hard, _gen(n_candidates=2, max_new_tokens=6), seed=2)
    assert [c["text"] for c in lines[1]["candidates"]] == own[0] + further[0]
    assert res.generation["candidates"] == 7 and res.generation["prompts"] == 2
    with pytest.raises(InputError, match=r"data.extra_policies\[0\] = .*no such folder"):  # names its setting
        _generate(models["uniform"], {**data, "extra_policies": [str(tmp_path / "no-such-policy")]}, tmp_path / "bad")
    assert not (tmp_path / "bad" / "out").exists()  # nothing half-written
    with pytest.raises(ConfigError, match="at least one each"):
        parse_config({"data": {**data, "extra_generation": data["generation"], "extra_policies": ["a", "b"]}})
