"""The demo world: corpus, classifier, rater panel, and the built (cached, deterministic) models."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from pathlib import Path

import pytest

from preftune.config import WorldSection
from preftune.errors import ConfigError, InputError, StorageError
from preftune.world import (
    FAMILIES,
    RUBRIC,
    UNKNOWN,
    RaterPanel,
    build_corpus,
    classify,
    ensure_world,
    format_prompt,
    load_prompts,
    resolve_model_ref,
    resolve_prompts_ref,
    sample_behaviour_shares,
    world_key,
)
from preftune.world.corpus import GROUPS, PROFESSIONALS, RESPONSES, responses_for

# A world small enough to build in a few tens of seconds, still big enough to learn the corpus.
SMALL = WorldSection(seed=0, sft_steps=500, n_layer=2, n_embd=64, vocab_size=1024)
# Reproducibility does not need a good model: this one is built twice, in seconds.
TINY = WorldSection(seed=3, sft_steps=20, n_layer=1, n_embd=16, vocab_size=400)


def _all_responses() -> list[tuple[str, str, str, str]]:
    """(family, domain, behaviour, text) for every response the corpus can produce."""
    out = []
    for group in GROUPS:
        for behaviour in FAMILIES[group.family].behaviours:
            for text in responses_for(group.family, behaviour, group.domain):
                out.append((group.family, group.domain, behaviour, text))
    return out


# --------------------------------------------------------------------------------------
# Corpus


def test_families_match_the_contract() -> None:
    assert set(FAMILIES) == {"safety", "tone", "high_risk", "benign"}
    assert FAMILIES["safety"].behaviours == ("curt_refusal", "explain_decline", "unsafe_comply")
    assert FAMILIES["safety"].preferred == "explain_decline"
    assert FAMILIES["safety"].forbidden == ("unsafe_comply",)
    assert set(FAMILIES["tone"].behaviours) == {"firm_conclusion", "cautious_suggestion", "clarifying_question"}
    assert FAMILIES["high_risk"].preferred == "hedged_referral"
    assert FAMILIES["high_risk"].forbidden == ("overconfident",)
    assert FAMILIES["benign"].behaviours == ("helpful", "needless_refusal")
    assert FAMILIES["benign"].preferred == "helpful"
    for fam in FAMILIES.values():
        assert set(fam.acceptable) <= set(fam.behaviours)
        assert not set(fam.acceptable) & set(fam.forbidden)
        assert fam.preferred is None or fam.preferred in fam.acceptable


def test_format_prompt() -> None:
    assert format_prompt("  Hello there? ") == "User: Hello there?\nAssistant:"
    assert format_prompt("x").endswith("\nAssistant:")


def test_corpus_is_deterministic_per_seed() -> None:
    a, b, c = build_corpus(0), build_corpus(0), build_corpus(1)
    assert a == b
    assert [r.to_json() for r in a.train] == [r.to_json() for r in b.train]
    assert a.held_out_slots != c.held_out_slots
    assert [r.id for r in a.train] != [r.id for r in c.train]


def test_eval_prompts_use_held_out_slot_values_only() -> None:
    corpus = build_corpus(0)
    train_text = "\n".join(r.prompt for r in corpus.train)
    train_ids = {r.id for r in corpus.train}
    assert corpus.eval
    for rec in corpus.eval:
        assert rec.slot not in train_text, rec.slot
        assert rec.id not in train_ids
    assert len({r.id for r in corpus.train}) == len(corpus.train)
    for group in GROUPS:
        held = corpus.held_out_slots[f"{group.family}/{group.domain}"]
        assert 2 <= len(held) < len(group.slots)
    for split in (corpus.train, corpus.eval):
        assert {r.family for r in split} == set(FAMILIES)
        assert {t for r in split if r.family == "high_risk" for t in r.tags} == {f"domain:{d}" for d in PROFESSIONALS}
        for rec in split:
            assert set(rec.to_json()) == {"id", "family", "prompt", "tags"}


def test_responses_are_short_and_balanced() -> None:
    for family, by_behaviour in RESPONSES.items():
        counts = {len(texts) for texts in by_behaviour.values()}
        assert len(counts) == 1, f"{family}: behaviours must have equally many templates"
    for _family, _domain, _behaviour, text in _all_responses():
        assert 4 <= len(text.split()) <= 30, text
    hedged = responses_for("high_risk", "hedged_referral", "legal")
    assert all("lawyer" in t for t in hedged)
    assert all("doctor" in t for t in responses_for("high_risk", "hedged_referral", "medical"))
    assert all("financial adviser" in t for t in responses_for("high_risk", "hedged_referral", "financial"))


# --------------------------------------------------------------------------------------
# Classifier


def test_classifier_recognises_every_corpus_response() -> None:
    wrong = [(f, b, t, classify(f, t)) for f, _d, b, t in _all_responses() if classify(f, t) != b]
    assert not wrong


def test_classifier_says_unknown_for_garbage_and_mixtures() -> None:
    rng = random.Random(0)
    for family in FAMILIES:
        assert classify(family, "") == UNKNOWN
        for _ in range(50):
            garbage = " ".join(
                "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 8))) for _ in range(8)
            )
            assert classify(family, garbage) == UNKNOWN, garbage
    # Two behaviours in one answer is not silently counted as either.
    mix = responses_for("safety", "explain_decline", "x")[0] + " " + responses_for("safety", "unsafe_comply", "x")[0]
    assert classify("safety", mix) == UNKNOWN
    mix = responses_for("tone", "firm_conclusion", "x")[0] + " " + responses_for("tone", "clarifying_question", "x")[0]
    assert classify("tone", mix) == UNKNOWN
    # A truncated explanation (no alternative offered) is not an explain_decline.
    assert classify("safety", "That is dangerous, so I won't help with it.") == UNKNOWN
    with pytest.raises(InputError, match="unknown behaviour family"):
        classify("nonsense", "hello")


# --------------------------------------------------------------------------------------
# Rater panel


def _random_items(family: str, n_items: int, n_candidates: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    fam = FAMILIES[family]
    domain = {"high_risk": "medical"}.get(family, "x")
    return [
        [rng.choice(responses_for(family, rng.choice(fam.behaviours), domain)) for _ in range(n_candidates)]
        for _ in range(n_items)
    ]


def _pairwise_agreement(judgements_by_item: list[list[dict]]) -> float:
    agree = total = 0
    for judgements in judgements_by_item:
        for a, b in itertools.combinations(judgements, 2):
            total += 1
            agree += (a["best"], a["all_unacceptable"]) == (b["best"], b["all_unacceptable"])
    return agree / total


def test_panel_follows_the_rubric_without_noise() -> None:
    panel = RaterPanel(n_raters=3, noise=0.0, contested_share=0.4, seed=0)
    texts = [
        responses_for("safety", "unsafe_comply", "x")[0],
        responses_for("safety", "curt_refusal", "x")[0],
        responses_for("safety", "explain_decline", "x")[0],
        "blah blah",
    ]
    js = panel.judge(
        "p1", "safety", texts, prompt="How?", tags=["domain:harmful-request"], created_at="2024-01-01T00:00:00Z"
    )
    assert len(js) == 3
    for j in js:
        assert j["format"] == "preftune.judgement" and j["version"] == 1 and j["source"] == "simulated"
        assert j["best"] == 2 and j["ranking"] == [2, 1, 0, 3]
        assert j["all_unacceptable"] is False and j["unsafe"] == [0]
        assert [c["id"] for c in j["candidates"]] == ["c0", "c1", "c2", "c3"]
        json.dumps(j)
    assert len({j["rater_id"] for j in js}) == 3

    bad = [responses_for("high_risk", "overconfident", "legal")[i] for i in range(3)]
    for j in panel.judge("p2", "high_risk", bad):
        assert j["best"] is None and j["all_unacceptable"] is True and j["unsafe"] == [0, 1, 2]
        assert sorted(j["ranking"]) == [0, 1, 2]


def test_panel_camps_on_the_contested_family() -> None:
    panel = RaterPanel(n_raters=5, noise=0.0, contested_share=0.4, seed=3)
    assert len(panel.minority) == 2
    texts = [
        responses_for("tone", b, "x")[0] for b in ("firm_conclusion", "clarifying_question", "cautious_suggestion")
    ]
    best = {j["rater_id"]: j["best"] for j in panel.judge("p", "tone", texts)}
    for rater, pick in best.items():
        assert pick == (0 if rater in panel.minority else 1)
        assert panel.order(rater, "safety") == RUBRIC["safety"]


def test_panel_is_deterministic_and_order_independent() -> None:
    items = _random_items("safety", 20, 4, seed=1)
    stamp = "2024-01-01T00:00:00Z"
    p1 = RaterPanel(5, 0.3, 0.4, seed=7)
    p2 = RaterPanel(5, 0.3, 0.4, seed=7)
    forward = [p1.judge(f"p{i}", "safety", texts, created_at=stamp) for i, texts in enumerate(items)]
    backward = [p2.judge(f"p{i}", "safety", texts, created_at=stamp) for i, texts in reversed(list(enumerate(items)))]
    assert forward == list(reversed(backward))
    other = [RaterPanel(5, 0.3, 0.4, seed=8).judge(f"p{i}", "safety", t, created_at=stamp) for i, t in enumerate(items)]
    assert other != forward


def test_contested_family_has_clearly_lower_agreement() -> None:
    panel = RaterPanel(n_raters=5, noise=0.1, contested_share=0.4, seed=0)
    agreement = {}
    for family in FAMILIES:
        items = _random_items(family, 150, 4, seed=11)
        agreement[family] = _pairwise_agreement([panel.judge(f"{family}-{i}", family, t) for i, t in enumerate(items)])
    for family in ("safety", "high_risk", "benign"):
        assert agreement[family] > 0.7, agreement
        assert agreement["tone"] < agreement[family] - 0.2, agreement


def test_panel_rejects_bad_input() -> None:
    with pytest.raises(InputError):
        RaterPanel(n_raters=3, noise=1.5)
    with pytest.raises(InputError, match="unknown behaviour family"):
        RaterPanel().judge("p", "cooking", ["hi"])
    with pytest.raises(InputError, match="no candidates"):
        RaterPanel().judge("p", "safety", [])


# --------------------------------------------------------------------------------------
# The built world (small config, built once per session)


def _state_hash(path: Path) -> str:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path))
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("world-home")
    return ensure_world(SMALL, home, progress=False)


def test_world_layout_and_manifest(world) -> None:
    for p in (world.policy, world.reward_base, world.prompts_train, world.prompts_eval, world.manifest):
        assert p.exists(), p
    assert world.root.name == world_key(SMALL)
    manifest = world.read_manifest()
    assert manifest["config"] == SMALL.model_dump(mode="json")
    for rel, meta in manifest["files"].items():
        data = (world.root / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"], rel
    total = sum(p.stat().st_size for p in world.root.rglob("*") if p.is_file())
    assert total < 8 * 1024 * 1024
    train, evals = load_prompts(world.prompts_train), load_prompts(world.prompts_eval)
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in evals)
    assert all(set(r) == {"id", "family", "prompt", "tags"} for r in train + evals)
    assert set(manifest["base_shares"]) == set(FAMILIES)
    assert not list(world.root.parent.glob(".tmp-*"))


def test_policy_reloads_and_generates(world) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(world.policy))
    model = AutoModelForCausalLM.from_pretrained(str(world.policy))
    assert isinstance(model, GPT2LMHeadModel)
    assert tok.eos_token_id is not None and tok.pad_token_id is not None and tok.bos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    assert model.config.vocab_size == len(tok) == SMALL.vocab_size
    assert model.config.n_layer == SMALL.n_layer and model.config.n_embd == SMALL.n_embd
    # Left padding must not change what the model predicts for a prompt.
    prompts = [format_prompt("Hi"), format_prompt(load_prompts(world.prompts_eval)[0]["prompt"])]
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=5, pad_token_id=tok.pad_token_id)
        alone = model.generate(**tok(prompts[:1], return_tensors="pt"), do_sample=False, max_new_tokens=5)
    assert out[0, -5:].tolist() == alone[0, -5:].tolist()


def test_base_policy_chooses_behaviours_near_uniformly(world) -> None:
    prompts = load_prompts(world.prompts_eval)
    shares = sample_behaviour_shares(world.policy, prompts, n_samples=12, seed=1)
    print("base-policy behaviour shares on held-out prompts:", json.dumps(shares, indent=1))
    assert set(shares) == set(FAMILIES)
    for family, by_behaviour in shares.items():
        behaviours = FAMILIES[family].behaviours
        low, high = (0.3, 0.7) if len(behaviours) == 2 else (0.15, 0.55)
        assert by_behaviour[UNKNOWN] <= 0.15, (family, by_behaviour)
        for behaviour in behaviours:
            assert low <= by_behaviour[behaviour] <= high, (family, by_behaviour)
        assert abs(sum(by_behaviour.values()) - 1.0) < 1e-9


def test_reward_base_loads_as_a_scalar_scorer(world) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(world.reward_base))
    model = AutoModelForSequenceClassification.from_pretrained(str(world.reward_base), num_labels=1)
    assert isinstance(model, LlamaForSequenceClassification)
    assert model.config.pad_token_id is not None and model.config.pad_token_id == tok.pad_token_id
    policy_tok = AutoTokenizer.from_pretrained(str(world.policy))
    assert len(tok) != len(policy_tok)
    texts = [
        format_prompt("Hi") + " Hello.",
        format_prompt("How do I fold a fitted sheet?") + " Happy to help! Try this.",
    ]
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        scores = model(**enc).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()
    with torch.no_grad():
        alone = model(**tok(texts[:1], return_tensors="pt")).logits
    assert torch.allclose(alone[0], scores[0], atol=1e-5)


def test_cache_is_reused(world, monkeypatch: pytest.MonkeyPatch) -> None:
    import preftune.world.build as build

    def no_rebuild(*_a, **_k):
        raise AssertionError("the cached world was rebuilt")

    monkeypatch.setattr(build, "_build_into", no_rebuild)
    monkeypatch.setattr(build, "_build_in_child", no_rebuild)
    again = ensure_world(SMALL, world.root.parent.parent)
    assert again == world
    assert resolve_model_ref("demo:policy", SMALL, world.root.parent.parent) == str(world.policy)
    assert resolve_model_ref("demo:reward-base", SMALL, world.root.parent.parent) == str(world.reward_base)
    assert resolve_prompts_ref("demo:prompts-eval", SMALL, world.root.parent.parent) == str(world.prompts_eval)
    assert resolve_model_ref("s3://bucket/models/x") == "s3://bucket/models/x"
    assert resolve_model_ref("/some/folder") == "/some/folder"
    with pytest.raises(ConfigError, match="unknown demo model"):
        resolve_model_ref("demo:nothing")


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import preftune.world.tokenizer as tokenizer_mod

    def killed(*_a, **_k):
        raise RuntimeError("build killed")

    monkeypatch.setattr(tokenizer_mod, "train_bpe_tokenizer", killed)
    cfg = SMALL.model_copy(update={"seed": 5})
    with pytest.raises(RuntimeError, match="build killed"):
        ensure_world(cfg, tmp_path, isolated=False)
    base = tmp_path / "world"
    assert not (base / world_key(cfg)).exists()
    assert not list(base.glob(".tmp-*"))


def _fake_build(calls: list[int]):
    """A stand-in for the real builder: writes a minimal complete world, slowly."""
    import time

    import preftune.world.build as build

    def fake(world_cfg, dest: Path, key: str, progress):
        calls.append(1)
        time.sleep(0.5)
        (dest / "prompts_train.jsonl").write_text("{}\n")
        files = {"prompts_train.jsonl": {"sha256": "-", "bytes": 3}}
        manifest = {"version": build.WORLD_VERSION, "key": key, "files": files, "build_seconds": 0.5}
        (dest / "manifest.json").write_text(json.dumps(manifest))
        return manifest

    return fake


def test_concurrent_builds_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import preftune.world.build as build

    calls: list[int] = []
    monkeypatch.setattr(build, "_build_into", _fake_build(calls))
    cfg = SMALL.model_copy(update={"seed": 9})
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_world(cfg, tmp_path, isolated=False))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(results) == 3 and len(set(results)) == 1
    assert not list((tmp_path / "world").glob(".tmp-*"))


def test_unwritable_home_is_a_storage_error(tmp_path: Path) -> None:
    """The isolated builder's user-facing error comes back as the same error class and message."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(StorageError, match="cannot create the demo world folder"):
        ensure_world(SMALL, not_a_dir)
    with pytest.raises(StorageError, match="cannot create the demo world folder"):
        ensure_world(SMALL, not_a_dir, isolated=False)


def test_same_seed_builds_the_same_world(tmp_path: Path) -> None:
    """Two builds in fresh homes (the second with the debris of a killed build in the way) are identical."""
    first = ensure_world(TINY, tmp_path / "a", progress=False)
    key = world_key(TINY)
    base = tmp_path / "b" / "world"
    (base / f".tmp-{key}-dead").mkdir(parents=True)
    (base / f".tmp-{key}-dead" / "prompts_train.jsonl").write_text("half\n")
    (base / key).mkdir()
    (base / key / "prompts_train.jsonl").write_text("no manifest: not a complete world\n")
    second = ensure_world(TINY, tmp_path / "b", progress=False)
    assert not list(base.glob(".tmp-*"))
    for rel in ("prompts_train.jsonl", "prompts_eval.jsonl", "policy/tokenizer.json", "reward_base/tokenizer.json"):
        assert (second.root / rel).read_bytes() == (first.root / rel).read_bytes(), rel
    assert _state_hash(second.policy) == _state_hash(first.policy)
    assert _state_hash(second.reward_base) == _state_hash(first.reward_base)
    m1, m2 = first.read_manifest(), second.read_manifest()
    assert m1["files"] == m2["files"]
    assert m1["base_shares"] == m2["base_shares"]


def test_a_panel_that_writes_answers_only_where_every_candidate_is_unacceptable() -> None:
    from preftune.collect.pairs import ExpansionStats, expand_judgements
    from preftune.data.records import Judgement as JudgementRecord
    from preftune.world.classifier import classify

    bad = [responses_for("high_risk", "overconfident", "legal")[i] for i in range(3)]
    good = [bad[0], responses_for("high_risk", "hedged_referral", "legal")[0]]
    silent = RaterPanel(n_raters=4, noise=0.0, seed=1)
    writing = RaterPanel(n_raters=4, noise=0.0, seed=1, write_rate=1.0)
    tags = ["domain:legal"]
    # the writing panel's judgements are the silent panel's plus the written answer: no other draw moves
    plain, written = silent.judge("p", "high_risk", bad, tags=tags), writing.judge("p", "high_risk", bad, tags=tags)
    for a, b in zip(plain, written, strict=True):
        assert "written" not in a
        assert {k: v for k, v in b.items() if k != "written"} == a
        assert classify("high_risk", b["written"]) == "hedged_referral"  # the rubric's best, acceptable
        assert "a qualified lawyer" in b["written"]  # in the prompt's domain (its domain: tag)
    # nothing is written where a candidate is acceptable
    assert all("written" not in j for j in writing.judge("q", "high_risk", good, tags=tags))
    # each written answer is preferred to each candidate: N pairs of weight 1/N (a judgement weighs 1)
    stats = ExpansionStats()
    records = [JudgementRecord.from_record(j) for j in writing.judge("p", "high_risk", bad, tags=tags)]
    pairs = expand_judgements(records, stats)
    assert stats.all_unacceptable == stats.written == 4 and stats.pairs == len(pairs) == 4 * 3
    assert all(p.chosen == r.written for r in records for p in pairs if p.rater_id == r.rater_id)
    assert sorted({p.rejected for p in pairs}) == sorted(bad)
    assert all(p.weight == pytest.approx(1 / 3) for p in pairs) and len({p.pair_id for p in pairs}) == len(pairs)
    # without a written answer the same judgements give no pair
    assert expand_judgements([JudgementRecord.from_record(j) for j in silent.judge("p", "high_risk", bad)]) == []
    with pytest.raises(InputError, match="write_rate"):
        RaterPanel(write_rate=1.5)


def test_the_panels_write_rate_is_not_part_of_the_worlds_cache_key() -> None:
    """Only the simulated panel reads it at collect time: changing it reuses the built world."""
    base = WorldSection(seed=3)
    assert world_key(base.model_copy(update={"rater_write_rate": 1.0})) == world_key(base)
    assert world_key(base.model_copy(update={"rater_noise": 0.2})) != world_key(base)  # the rest still counts
