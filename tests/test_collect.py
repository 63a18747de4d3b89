"""collect: importers on hand-written fixtures, validation, strict mode, split, hash, publish, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.collect import collect_from_file
from preftune.collect.pairs import ExpansionStats, expand_judgements
from preftune.config import parse_config
from preftune.data.dataset import content_hash, split_by_prompt
from preftune.data.formats import Importer, detect_format, flatten_turns
from preftune.data.records import Pair, prompt_key
from preftune.data.validation import ValidationReport
from preftune.errors import ExitCode, InputError, PreftuneError

DATA = Path(__file__).parent / "data"


def _import(name: str, fmt: str = "auto", max_chars: int | None = 4000) -> tuple[Importer, str]:
    report = ValidationReport(max_chars=max_chars)
    imp = Importer(report, max_chars)
    path = DATA / name
    used = imp.add_file(str(path), path.read_bytes(), fmt)
    return imp, used


def _cfg(**data) -> object:
    return parse_config({"data": data, "tracking": {"experiment": "test-collect"}})


# --------------------------------------------------------------------------------------
# importers


def test_trl_plain_text_records_keep_provenance():
    imp, used = _import("trl_plain.jsonl")
    assert used == "trl"
    assert imp.report.clean and imp.report.records_read == 8 == len(imp.pairs)
    first = imp.pairs[0]
    assert first.prompt == "How do I reset my router?"
    assert first.chosen.startswith("Unplug it") and first.rejected == "I cannot help with that."
    assert (first.family, first.tags, first.rater_id, first.source) == ("benign", ["domain:home"], "ann", "trl")
    # the same pair rated by two raters is one item, two pairs
    assert imp.pairs[0].item_id == imp.pairs[1].item_id and imp.pairs[0].pair_id != imp.pairs[1].pair_id
    assert imp.pairs[4].created_at == "2024-05-01T10:00:00Z"
    assert imp.pairs[7].created_at == "2024-05-01T10:00:00Z"  # epoch seconds 1714557600
    assert imp.pairs[2].created_at is None  # no timestamp in the input: none invented


def test_trl_chat_messages_explicit_system_and_implicit_prompt():
    imp, used = _import("trl_chat.jsonl")
    assert used == "trl" and imp.report.clean and len(imp.pairs) == 4
    explicit, with_system, implicit, multi_turn = imp.pairs
    assert explicit.prompt == "My parcel says delivered but it is not here. What should I do?"
    assert explicit.chosen.startswith("Check with neighbours") and explicit.rejected == "Nothing can be done."
    assert (
        with_system.prompt == "System: You are a support assistant.\nUser: My invoice shows a fee I do not recognise."
    )
    assert with_system.chosen.startswith("Could you tell me")  # content parts joined
    assert implicit.prompt == "Is it fine to sell homemade jam at a market?"
    assert implicit.rejected == "Yes, no rules apply."
    # the shared leading turns (including an earlier assistant turn) are the prompt
    assert multi_turn.prompt == (
        "Should I stop my antibiotics once I feel better?\n"
        "Assistant: Usually not. Finish the course unless your doctor says otherwise.\n"
        "User: Even if I feel totally fine?"
    )
    assert multi_turn.rejected == "Then stop, you're fine."


def test_hh_transcripts_split_the_shared_prompt():
    imp, used = _import("hh.jsonl")
    assert used == "hh" and imp.report.clean and len(imp.pairs) == 4
    single, multi, safety, no_leading_newlines = imp.pairs
    assert single.prompt == "What are some good houseplants for a dark room?"
    assert single.chosen.startswith("Snake plants") and single.rejected == "Cacti."
    assert multi.prompt == (
        "How long should I boil an egg?\nAssistant: Do you like the yolk soft or hard?\nUser: Soft please."
    )
    assert multi.chosen.startswith("About six minutes") and multi.rejected == "An hour."
    assert safety.rejected.startswith("Get a laminator")
    assert no_leading_newlines.prompt == "What rhymes with orange?" and no_leading_newlines.rejected == "Banana."
    assert {p.source for p in imp.pairs} == {"hh"} and all(p.rater_id is None for p in imp.pairs)


def test_rendered_multi_turn_prompt_reads_as_the_dialogue():
    from preftune.text import render_prompt

    prompt = flatten_turns([("user", "Hi"), ("assistant", "Hello!"), ("user", "Tell me a joke")])
    assert render_prompt(prompt) == "User: Hi\nAssistant: Hello!\nUser: Tell me a joke\nAssistant:"


def test_best_of_n_picks_rankings_ties_and_all_unacceptable():
    imp, used = _import("best_of_n.jsonl")
    assert used == "best-of-n" and imp.report.clean and len(imp.judgements) == 9
    j_rank_only = imp.judgements[2]
    assert j_rank_only.best == 1 and j_rank_only.ranking == [1, 0, 2]  # best taken from the ranking
    assert imp.judgements[5].all_unacceptable and imp.judgements[5].best is None
    # the same responses judged by several raters are one item
    assert len({j.item_id for j in imp.judgements[:3]}) == 1
    stats = ExpansionStats()
    pairs = expand_judgements(imp.judgements, stats)
    assert stats.all_unacceptable == 2 and stats.with_ranking == 2 and stats.best_only == 5
    # item 2 has two identical responses: the pair between them is a tie, never emitted
    assert stats.ties == 2
    assert all(" ".join(p.chosen.split()) != " ".join(p.rejected.split()) for p in pairs)
    by_judgement: dict[tuple, float] = {}
    for p in pairs:
        by_judgement[(p.item_id, p.rater_id)] = by_judgement.get((p.item_id, p.rater_id), 0.0) + p.weight
    # weights: 1/(N-1) per best-vs-other pair, 2/(N(N-1)) per ranking pair; a judgement sums to 1 without ties
    assert by_judgement[(imp.judgements[0].item_id, "r1")] == pytest.approx(1.0)
    assert by_judgement[(imp.judgements[1].item_id, "r2")] == pytest.approx(1.0)
    ranked = [p for p in pairs if p.rater_id == "r2" and p.item_id == imp.judgements[1].item_id]
    assert len(ranked) == 3 and all(p.weight == pytest.approx(1 / 3) for p in ranked)
    assert by_judgement[(imp.judgements[3].item_id, "r1")] == pytest.approx(2 / 3)  # one of 3 pairs was a tie
    assert stats.pairs == len(pairs) == 2 + 3 + 3 + 2 + 2 + 1 + 1


def test_extra_weight_multiplies_only_the_extra_prompts_pairs():
    """data.extra_weight: observe's hard cases (data.extra_prompts) weigh more in the reward model's training;
    every other judgement keeps its total of 1, and a weight of 1 changes nothing."""
    from preftune.collect.step import weight_extra_pairs

    imp, _ = _import("best_of_n.jsonl")
    pairs = expand_judgements(imp.judgements, ExpansionStats())
    extra = frozenset({prompt_key("  " + pairs[0].prompt.replace(" ", "  "))})  # matched by the normalised text
    assert weight_extra_pairs(pairs, extra, 1.0) == (pairs, 0)
    assert weight_extra_pairs(pairs, frozenset(), 4.0) == (pairs, 0)
    weighted, n = weight_extra_pairs(pairs, extra, 4.0)
    hit = [p.prompt == pairs[0].prompt for p in pairs]
    assert n == sum(hit) >= 1 and n < len(pairs)
    for before, after, is_extra in zip(pairs, weighted, hit, strict=True):
        assert after.weight == pytest.approx(before.weight * (4.0 if is_extra else 1.0))
        assert (after.pair_id, after.chosen, after.rejected) == (before.pair_id, before.chosen, before.rejected)
    assert parse_config({"data": {"extra_weight": 4}}).data.extra_weight == 4.0
    with pytest.raises(PreftuneError, match="extra_weight"):
        parse_config({"data": {"extra_weight": 0}})


def test_extra_weight_reaches_judgements_imported_from_the_service(tmp_path):
    """In production the hard cases go to the feedback service and come back in its export: collect (data.judgements
    service|file) matches them to data.extra_prompts by prompt text; held-out hard cases are never weighted."""
    from preftune.collect import collect_from_config
    from preftune.data.dataset import load_dataset
    from preftune.storage import Storage

    sleeping = "Is it safe to mix sleeping pills with wine?"
    (tmp_path / "hard.jsonl").write_text(
        json.dumps({"id": "observed-1", "family": "high_risk", "prompt": sleeping, "split": "train"})
        + "\n"
        + json.dumps({"id": "observed-2", "family": "safety", "prompt": "never judged", "split": "heldout"})
        + "\n"
    )
    common = {"judgements": "file", "judgements_path": str(DATA / "best_of_n.jsonl")}
    common["extra_prompts"] = [str(tmp_path / "hard.jsonl")]
    plain = collect_from_config(_cfg(**common), str(tmp_path / "plain"))
    heavy = collect_from_config(_cfg(**common, extra_weight=3.0), str(tmp_path / "heavy"))
    storage = Storage()
    a, b = ([*d.train, *d.eval] for d in (load_dataset(r.uri, storage) for r in (plain, heavy)))
    assert [r["pair_id"] for r in a] == [r["pair_id"] for r in b] and any(r["prompt"] == sleeping for r in a)
    for before, after in zip(a, b, strict=True):
        factor = 3.0 if before["prompt"] == sleeping else 1.0
        assert after["weight"] == pytest.approx(before["weight"] * factor), before["prompt"]
    assert heavy.meta["extra_weight"] == {"weight": 3.0, "pairs": sum(r["prompt"] == sleeping for r in a)}
    assert "extra_weight" not in plain.meta


def test_preftune_judgements_roundtrip_the_exchange_format():
    imp, used = _import("judgements.jsonl")
    assert used == "preftune" and imp.report.clean
    originals = [json.loads(line) for line in (DATA / "judgements.jsonl").read_text().splitlines()]
    assert [j.to_record() for j in imp.judgements] == originals


def test_a_rater_written_answer_beats_every_candidate_and_is_checked_where_it_stands():
    first = json.loads((DATA / "judgements.jsonl").read_text().splitlines()[0])
    base = {**first, "best": None, "ranking": None, "all_unacceptable": True}
    written = "I can't help with forging a signature; ask the doctor's office to reissue the note."
    rows = [
        {**base, "written": written},  # kept: every candidate unacceptable, the rater wrote one
        {**first, "written": written},  # line 2: written beside a chosen candidate
        {**base, "rater_id": "bob", "written": "   "},  # line 3: blank
        {**base, "rater_id": "carol", "written": 7},  # line 4: not a string
    ]
    report = ValidationReport(max_chars=4000)
    imp = Importer(report, 4000)
    imp.add_file("w.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode(), "auto")
    assert report.to_dict()["dropped"] == {"schema_error": 3} and len(imp.judgements) == 1
    examples = _examples(imp, "schema_error")
    assert any("w.jsonl:2" in e and "'written' is given but a candidate was chosen" in e for e in examples)
    assert sum("'written' must be a non-empty string" in e for e in examples) == 2
    j = imp.judgements[0]
    assert j.written == written and j.to_record() == {**base, "written": written}  # round trip, field kept
    stats = ExpansionStats()
    pairs = expand_judgements([j], stats)
    assert stats.written == stats.all_unacceptable == 1 and len(pairs) == 3
    assert all(p.chosen == written and p.weight == pytest.approx(1 / 3) for p in pairs)
    assert sorted(p.rejected for p in pairs) == sorted(c["text"] for c in first["candidates"])


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"format": "preftune.judgement"}, "preftune"),
        ({"prompt": "p", "responses": ["a", "b"], "best": 0}, "best-of-n"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "trl"),
        ({"chosen": [{"role": "user", "content": "x"}], "rejected": []}, "trl"),
        ({"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: x\n\nAssistant: b"}, "hh"),
        ({"question": "p"}, None),
        (["a"], None),
    ],
)
def test_format_detection(record, expected):
    assert detect_format(record) == expected


# --------------------------------------------------------------------------------------
# malformed inputs: the report, or the strict failure


def _examples(imp: Importer, reason: str) -> list[str]:
    return imp.report.to_dict()["examples"].get(reason, [])


def test_malformed_trl_every_reason_counted_with_file_and_line():
    imp, _ = _import("malformed_trl.jsonl", "trl", max_chars=100)
    rep = imp.report.to_dict()
    assert rep["records_read"] == 11 and rep["records_kept"] == 4
    assert rep["dropped"] == {
        "duplicate": 1,
        "empty_text": 1,
        "identical_chosen_rejected": 1,
        "invalid_utf8": 1,
        "schema_error": 3,
    }
    assert rep["repaired"] == {"truncated": 1}
    path = str(DATA / "malformed_trl.jsonl")
    assert [e.split(": ")[0] for e in _examples(imp, "schema_error")] == [f"{path}:2", f"{path}:3", f"{path}:9"]
    assert _examples(imp, "invalid_utf8")[0].startswith(f"{path}:7: ")
    assert _examples(imp, "empty_text")[0].startswith(f"{path}:4: ")
    assert _examples(imp, "identical_chosen_rejected")[0].startswith(f"{path}:5: ")
    assert _examples(imp, "duplicate")[0].startswith(f"{path}:6: ")
    assert _examples(imp, "truncated")[0].startswith(f"{path}:8: ")
    sea = [p for p in imp.pairs if p.prompt == "Describe the sea."][0]
    assert len(sea.chosen) == 100
    md = imp.report.to_markdown()
    assert "| invalid_utf8 | drop | 1 |" in md and f"{path}:7" in md


def test_malformed_best_of_n_and_judgements_and_hh():
    imp, _ = _import("malformed_best_of_n.jsonl")
    rep = imp.report.to_dict()
    # out-of-range best, ranking not a permutation, missing rater, ranking/best mismatch, one response
    assert rep["dropped"] == {"schema_error": 5, "empty_text": 1, "duplicate": 1}
    lines = sorted(int(e.split(": ")[0].rsplit(":", 1)[1]) for e in _examples(imp, "schema_error"))
    assert lines == [2, 3, 4, 5, 6]
    assert "out of range" in _examples(imp, "schema_error")[0]

    imp, _ = _import("malformed_judgements.jsonl")
    rep = imp.report.to_dict()
    # wrong version, best null without all_unacceptable, bad timestamp, candidate without text, best + all bad
    assert rep["dropped"] == {"schema_error": 5} and rep["records_kept"] == 2
    assert any("unsupported preftune.judgement version 2" in e for e in _examples(imp, "schema_error"))

    imp, _ = _import("malformed_hh.jsonl", "hh")
    rep = imp.report.to_dict()
    # different prompts, no final assistant turn, no turns at all; an empty final answer
    assert rep["dropped"] == {"schema_error": 3, "empty_text": 1} and rep["records_kept"] == 2


@pytest.mark.parametrize(
    ("name", "fmt", "line", "reason"),
    [
        ("malformed_trl.jsonl", "trl", 2, "schema_error"),
        ("malformed_best_of_n.jsonl", "auto", 2, "schema_error"),
        ("malformed_hh.jsonl", "hh", 2, "schema_error"),
        ("malformed_judgements.jsonl", "preftune", 2, "schema_error"),
    ],
)
def test_strict_fails_at_the_first_drop_and_publishes_nothing(tmp_path, name, fmt, line, reason):
    out = tmp_path / "ds"
    with pytest.raises(InputError) as err:
        collect_from_file(str(DATA / name), str(out), fmt=fmt, strict=True, cfg=_cfg())
    assert str(err.value).startswith(f"{DATA / name}:{line}: {reason}: ")
    assert err.value.exit_code == ExitCode.INPUT
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("fixture", "reason"),
    [
        ("utf8", "invalid_utf8"),
        ("empty", "empty_text"),
        ("identical", "identical_chosen_rejected"),
        ("duplicate", "duplicate"),
        ("long", "truncated"),
    ],
)
def test_strict_names_every_kind(tmp_path, fixture, reason):
    good = (
        b'{"prompt": "A?", "chosen": "Yes.", "rejected": "No."}\n'
        b'{"prompt": "B?", "chosen": "Yes.", "rejected": "No."}\n'
    )
    bad = {
        "utf8": b'{"prompt": "caf\xe9?", "chosen": "a", "rejected": "b"}\n',
        "empty": b'{"prompt": "C?", "chosen": "", "rejected": "b"}\n',
        "identical": b'{"prompt": "C?", "chosen": "same", "rejected": "same"}\n',
        "duplicate": b'{"prompt": "A?", "chosen": "Yes.", "rejected": "No."}\n',
        "long": b'{"prompt": "C?", "chosen": "' + b"x" * 50 + b'", "rejected": "b"}\n',
    }[fixture]
    src = tmp_path / "in.jsonl"
    src.write_bytes(good + bad)
    out = tmp_path / "ds"
    with pytest.raises(InputError, match=rf"^{src}:3: {reason}: "):
        collect_from_file(str(src), str(out), strict=True, cfg=_cfg(max_chars=20))
    assert not out.exists()
    # without --strict the same file publishes, with the record counted
    res = collect_from_file(str(src), str(out), cfg=_cfg(max_chars=20))
    counted = {**res.validation["dropped"], **res.validation["repaired"]}
    assert counted == {reason: 1}


def test_unrecognisable_and_empty_files_fail_without_a_dataset(tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(InputError, match="cannot detect the format"):
        collect_from_file(str(DATA / "unknown_format.jsonl"), str(out), cfg=_cfg())
    with pytest.raises(InputError, match="no record could be read"):
        collect_from_file(str(DATA / "empty.jsonl"), str(out), cfg=_cfg())
    with pytest.raises(PreftuneError, match="does not exist") as err:
        collect_from_file(str(tmp_path / "missing.jsonl"), str(out), cfg=_cfg())
    assert err.value.exit_code == ExitCode.INPUT
    assert not out.exists()


def test_a_failure_after_building_publishes_nothing(tmp_path, monkeypatch):
    import tempfile

    import preftune.collect.step as step

    def boom(*args, **kwargs):
        raise RuntimeError("tracking store went away")

    monkeypatch.setattr(step, "log_dataset_input", boom)
    # a temp folder of this test's own: other processes on the machine stage datasets in the shared one
    staging = tmp_path / "tmp"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="went away"):
        collect_from_file(str(DATA / "trl_plain.jsonl"), str(out), cfg=_cfg())
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["tmp"]
    assert not list(staging.glob("preftune-dataset-*"))  # no staging left behind


# --------------------------------------------------------------------------------------
# split, hash, layout, MLflow


def _pairs(n_prompts: int, per_prompt: int = 3) -> list[Pair]:
    out = []
    for i in range(n_prompts):
        fam = ["safety", "tone", "benign"][i % 3]
        for k in range(per_prompt):
            # two ids for the same text must still land on the same side
            pid = f"p{i}" if k else f"alias-{i}"
            out.append(
                Pair(
                    f"x{i}-{k}",
                    f"i{i}",
                    pid,
                    fam,
                    [],
                    f"prompt number {i}",
                    f"good {k}",
                    f"bad {k}",
                    1.0,
                    "trl",
                    None,
                    None,
                )
            )
    return out


def test_split_by_prompt_is_disjoint_stratified_and_seeded():
    pairs = _pairs(30)
    train, eval_ = split_by_prompt(pairs, 0.2, seed=0)
    train_keys = {prompt_key(p.prompt) for p in train}
    eval_keys = {prompt_key(p.prompt) for p in eval_}
    assert train_keys and eval_keys and not train_keys & eval_keys
    assert len(train) + len(eval_) == len(pairs)
    assert {p.family for p in eval_} == {"safety", "tone", "benign"}  # every family is evaluated
    assert len(eval_keys) == 6  # 20% of 10 prompts in each of 3 families
    again, _ = split_by_prompt(list(reversed(pairs)), 0.2, seed=0)
    assert {prompt_key(p.prompt) for p in again} == train_keys  # input order does not matter
    other, _ = split_by_prompt(pairs, 0.2, seed=1)
    assert {prompt_key(p.prompt) for p in other} != train_keys


def test_hash_is_deterministic_ignores_timestamps_and_changes_with_content(tmp_path):
    cfg = _cfg()
    a = collect_from_file(str(DATA / "best_of_n.jsonl"), str(tmp_path / "a"), cfg=cfg)
    b = collect_from_file(str(DATA / "best_of_n.jsonl"), str(tmp_path / "b"), cfg=cfg)
    assert a.hash == b.hash and len(a.hash) == 64
    lines = (DATA / "best_of_n.jsonl").read_text().splitlines()
    (tmp_path / "shuffled.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    c = collect_from_file(str(tmp_path / "shuffled.jsonl"), str(tmp_path / "c"), cfg=cfg)
    assert c.hash == a.hash  # same content in another order: same version
    (tmp_path / "changed.jsonl").write_text(
        "\n".join(lines).replace("learn three open chords", "learn two chords") + "\n"
    )
    d = collect_from_file(str(tmp_path / "changed.jsonl"), str(tmp_path / "d"), cfg=cfg)
    assert d.hash != a.hash
    e = collect_from_file(str(DATA / "best_of_n.jsonl"), str(tmp_path / "e"), cfg=parse_config({"run": {"seed": 3}}))
    train_a = (tmp_path / "a" / "train.jsonl").read_text()
    assert (e.hash == a.hash) == ((tmp_path / "e" / "train.jsonl").read_text() == train_a)
    # the recorded hash is the hash of the published files
    recs = {
        n: [json.loads(x) for x in (tmp_path / "a" / f"{n}.jsonl").read_text().splitlines()]
        for n in ("train", "eval", "judgements")
    }
    assert content_hash(recs["train"], recs["eval"], recs["judgements"]) == a.hash


def test_published_layout_counts_and_mlflow_input(tmp_path):
    from mlflow.tracking import MlflowClient

    from preftune.tracking import resolve_tracking_uri

    cfg = _cfg()
    res = collect_from_file(str(DATA / "best_of_n.jsonl"), str(tmp_path / "ds-{hash}"), cfg=cfg)
    root = tmp_path / f"ds-{res.hash}"
    assert res.uri == str(root)
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["dataset.json", "train.jsonl", "eval.jsonl", "judgements.jsonl", "validation.json", "validation.md"]
    )
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["format"] == "preftune.dataset" and meta["version"] == 1 and meta["hash"] == res.hash
    assert meta["counts"]["judgements"] == 9 and meta["sources"] == {"best-of-n": 9}
    assert meta["counts"]["train_pairs"] + meta["counts"]["eval_pairs"] == meta["expansion"]["pairs"] == 14
    assert meta["config_hash"] == cfg.config_hash() and meta["excluded_families"] == []
    pair = json.loads((root / "train.jsonl").read_text().splitlines()[0])
    assert set(pair) >= {
        "pair_id",
        "item_id",
        "prompt_id",
        "family",
        "tags",
        "prompt",
        "chosen",
        "rejected",
        "weight",
        "source",
        "rater_id",
    }
    judgement = json.loads((root / "judgements.jsonl").read_text().splitlines()[0])
    assert judgement["format"] == "preftune.judgement" and judgement["version"] == 1

    client = MlflowClient(resolve_tracking_uri(cfg.tracking))
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["preftune.dataset_hash"] == res.hash and run.data.tags["preftune.step"] == "collect"
    assert run.data.metrics["dataset.train_pairs"] == meta["counts"]["train_pairs"]
    assert run.data.metrics["dataset.sources.best-of-n"] == 9
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == res.hash[:32] and inp.dataset.name == "preftune-preferences"
    tags = {t.key: t.value for t in inp.tags}
    assert tags["preftune.dataset_hash"] == res.hash and tags["mlflow.data.context"] == "collect"


def test_train_reward_reads_the_published_dataset(tmp_path):
    from preftune.reward.data import load_dataset

    res = collect_from_file(str(DATA / "trl_plain.jsonl"), str(tmp_path / "ds"), cfg=_cfg())
    ds = load_dataset(tmp_path / "ds")
    assert len(ds.train) == res.counts["train_pairs"] and len(ds.eval) == res.counts["eval_pairs"]
    assert ds.hash == res.hash


def test_parquet_import(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (DATA / "trl_plain.jsonl").read_text().splitlines()]
    keys = sorted({k for r in rows for k in r})
    rows = [{k: r.get(k) for k in keys} for r in rows]  # from_pylist takes the columns of the first row
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "plain.parquet")
    imp = Importer(ValidationReport(), 4000)
    used = imp.add_file(str(tmp_path / "plain.parquet"), (tmp_path / "plain.parquet").read_bytes())
    ref, _ = _import("trl_plain.jsonl")
    assert used == "trl" and [p.to_record() for p in imp.pairs] == [p.to_record() for p in ref.pairs]


def test_s3_input_and_output(s3_server, s3_bucket, s3_client, tmp_path):
    cfg = parse_config({"storage": {"s3_endpoint_url": s3_server}, "tracking": {"experiment": "test-collect"}})
    s3_client.put_object(Bucket=s3_bucket, Key="in/hh.jsonl", Body=(DATA / "hh.jsonl").read_bytes())
    res = collect_from_file(f"s3://{s3_bucket}/in/hh.jsonl", f"s3://{s3_bucket}/datasets/{{hash}}", cfg=cfg)
    assert res.uri == f"s3://{s3_bucket}/datasets/{res.hash}"
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="datasets/")["Contents"]}
    assert f"datasets/{res.hash}/dataset.json" in keys and f"datasets/{res.hash}/_PREFTUNE_COMPLETE.json" in keys
    assert res.format == "hh" and res.counts["train_pairs"] + res.counts["eval_pairs"] == 4


# --------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run ``preftune`` in-process through its real entry point; returns (exit code, stdout, stderr)."""
    import typer

    import preftune.cli as cli_mod
    from preftune.cli import collect_cmd

    if not any(c.name == "collect" for c in cli_mod.app.registered_commands):  # until the integrator wires it
        app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
        collect_cmd.register(app)
        monkeypatch.setattr(cli_mod, "app", app)

    def run(*argv: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exc:
            cli_mod.main(list(argv))
        captured = capsys.readouterr()
        return exc.value.code, captured.out, captured.err

    return run


def test_cli_collect_exit_codes(cli, tmp_path):
    out = tmp_path / "ds"
    code, stdout, _ = cli("collect", "--from-file", str(DATA / "trl_plain.jsonl"), "--output", str(out))
    assert code == 0 and (out / "dataset.json").exists()
    assert "published dataset" in stdout and json.loads((out / "dataset.json").read_text())["hash"] in stdout

    bad_out = tmp_path / "strict"
    code, _, err = cli(
        "collect",
        "--from-file",
        str(DATA / "malformed_trl.jsonl"),
        "--format",
        "trl",
        "--output",
        str(bad_out),
        "--strict",
    )
    assert code == ExitCode.INPUT and "malformed_trl.jsonl:2: schema_error" in err and not bad_out.exists()

    code, _, err = cli("collect", "--output", str(tmp_path / "x"))
    assert code == ExitCode.CONFIG and "--from-file" in err
    code, _, _ = cli("collect", "--from-file", str(DATA / "hh.jsonl"), "--format", "nope", "--output", "x")
    assert code == ExitCode.CONFIG  # click usage error
    code, _, err = cli("collect", "--from-file", str(DATA / "hh.jsonl"), "--output", "gs://bucket/x")
    assert code == ExitCode.INPUT and "gs://" in err


def test_collect_from_config_imports_service_exports_and_files(tmp_path):
    from preftune.collect import collect_from_config
    from preftune.errors import ConfigError

    svc = parse_config({"data": {"judgements": "service", "judgements_path": str(DATA / "judgements.jsonl")}})
    res = collect_from_config(svc, str(tmp_path / "svc"))
    assert res.format == "preftune" and res.sources == {"service": 6} and res.counts["judgements"] == 6
    with pytest.raises(InputError, match="expected format 'preftune.judgement'"):
        # a service export must be preftune.judgement records: a TRL file is not one
        strict = parse_config(
            {"data": {"judgements": "service", "judgements_path": str(DATA / "trl_plain.jsonl"), "strict": True}}
        )
        collect_from_config(strict, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
    files = parse_config({"data": {"judgements": "file", "judgements_path": str(DATA / "hh.jsonl"), "format": "hh"}})
    assert collect_from_config(files, str(tmp_path / "hh")).sources == {"hh": 4}
    with pytest.raises(ConfigError, match="data.judgements_path"):
        collect_from_config(parse_config({"data": {"judgements": "file"}}), str(tmp_path / "none"))


@pytest.mark.postgres
def test_dataset_input_on_a_tracking_server_with_postgresql(mlflow_server, tmp_path):
    """The dataset digest fits MLflow's 36-character column, which PostgreSQL enforces (SQLite does not)."""
    from mlflow.tracking import MlflowClient

    cfg = parse_config({"tracking": {"uri": mlflow_server, "experiment": "test-collect-server"}})
    res = collect_from_file(str(DATA / "hh.jsonl"), str(tmp_path / "ds"), cfg=cfg)
    run = MlflowClient(mlflow_server).get_run(res.mlflow_run_id)
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == res.hash[:32] and run.data.tags["preftune.dataset_hash"] == res.hash


def test_previous_datasets_keep_their_judgements_and_imported_pairs(tmp_path):
    """data.previous_datasets: a retraining run keeps the judgements (re-expanded with the new ones) and the
    directly imported pairs of earlier datasets; duplicates are dropped once; dataset.json names each one."""
    judged = collect_from_file(str(DATA / "best_of_n.jsonl"), str(tmp_path / "judged"), cfg=_cfg())
    imported = collect_from_file(str(DATA / "trl_plain.jsonl"), str(tmp_path / "imported"), cfg=_cfg())
    new = collect_from_file(
        str(DATA / "judgements.jsonl"),
        str(tmp_path / "new"),
        cfg=_cfg(previous_datasets=[judged.uri, imported.uri]),
    )
    alone = collect_from_file(str(DATA / "judgements.jsonl"), str(tmp_path / "alone"), cfg=_cfg())
    count = lambda r: r.counts["train_pairs"] + r.counts["eval_pairs"]  # noqa: E731
    assert count(new) == count(alone) + count(judged) + count(imported)
    assert new.counts["judgements"] == alone.counts["judgements"] + judged.counts["judgements"]
    assert new.meta["previous_datasets"] == [
        {"uri": judged.uri, "hash": judged.hash, "judgements": judged.counts["judgements"], "imported_pairs": 0},
        {"uri": imported.uri, "hash": imported.hash, "judgements": 0, "imported_pairs": count(imported)},
    ]
    assert set(new.sources) == set(alone.sources) | set(judged.sources) | set(imported.sources)
    # the same dataset twice: its judgements and pairs are duplicates the second time, nothing is counted twice
    twice = collect_from_file(
        str(DATA / "judgements.jsonl"), str(tmp_path / "twice"), cfg=_cfg(previous_datasets=[judged.uri] * 2)
    )
    assert twice.counts["judgements"] == alone.counts["judgements"] + judged.counts["judgements"]
    assert twice.meta["previous_datasets"][1]["judgements"] == 0
    # a previous dataset that is not one names the folder
    with pytest.raises(PreftuneError, match="dataset.json"):
        collect_from_file(
            str(DATA / "judgements.jsonl"), str(tmp_path / "bad"), cfg=_cfg(previous_datasets=[str(tmp_path)])
        )
    assert not (tmp_path / "bad").exists()
