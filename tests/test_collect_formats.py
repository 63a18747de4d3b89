"""collect: every import format from its clean and its broken fixture, every container, and the
real HH-RLHF records (tests/data/formats/ holds one clean and one broken file per format, written
from each format's published schema)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from preftune.collect import collect_from_file
from preftune.config import parse_config
from preftune.data.formats import FORMATS, FormatOptions, Importer
from preftune.data.validation import ValidationReport
from preftune.errors import InputError
from preftune.storage import Storage

FMT = Path(__file__).parent / "data" / "formats"
HH_REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test-0-999.jsonl.gz"

# format -> (pairs, judgements) its clean fixture gives
CLEAN = {
    "preftune": (0, 1),
    "best-of-n": (0, 1),
    "trl": (3, 0),
    "ultrafeedback-binarized": (2, 0),
    "ultrafeedback": (4, 0),  # 3 completions with 3 different scores -> 3 pairs; 2 completions -> 1
    "helpsteer": (2, 0),
    "nectar": (0, 1),
    "shp": (2, 0),
    "pku-saferlhf": (2, 0),
    "openai": (1, 0),
    "hh": (1, 0),
}

# format -> (1-based line of the first bad record, words the strict error must name)
BROKEN = {
    "preftune": (1, ["unsupported preftune.judgement version"]),
    "best-of-n": (1, ["best-of-n", "'best'", "out of range"]),
    "trl": (2, ["trl", "'rejected'"]),
    "ultrafeedback-binarized": (2, ["ultrafeedback-binarized", "'score_chosen'"]),
    "ultrafeedback": (2, ["ultrafeedback", "completions[0]", "overall_score"]),
    "helpsteer": (4, ["helpsteer", "'helpfulness'", "number"]),
    "nectar": (1, ["nectar", "ranks must be distinct"]),
    "shp": (1, ["shp", "'labels'"]),
    "pku-saferlhf": (1, ["pku-saferlhf", "'better_response_id'"]),
    "openai": (1, ["openai", "'input.messages'", "user"]),
    "hh": (1, ["hh", "no shared prompt"]),
}


def _importer(strict: bool = False, **options) -> Importer:
    return Importer(ValidationReport(strict=strict, max_chars=4000), 4000, FormatOptions(**options))


def _load(path: Path, strict: bool = True, fmt: str = "auto", **options) -> tuple[Importer, str]:
    imp = _importer(strict, **options)
    used = imp.add_path(str(path), Storage(), fmt)
    return imp, used


def test_every_registered_format_has_a_clean_and_a_broken_fixture():
    assert set(FORMATS) == set(CLEAN) == set(BROKEN)
    for name in FORMATS:
        assert (FMT / f"{name}.jsonl").is_file() and (FMT / f"{name}_broken.jsonl").is_file()


@pytest.mark.parametrize("name", sorted(CLEAN))
def test_clean_fixture_imports_under_strict_and_is_detected(name):
    imp, used = _load(FMT / f"{name}.jsonl")
    assert used == name
    assert (len(imp.pairs), len(imp.judgements)) == CLEAN[name]
    assert imp.report.clean and imp.report.records_kept == imp.report.records_read


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_fixture_fails_strict_naming_format_field_and_line(name):
    line, words = BROKEN[name]
    with pytest.raises(InputError) as err:
        _load(FMT / f"{name}_broken.jsonl", fmt=name if name == "helpsteer" else "auto")
    msg = str(err.value)
    assert f"{name}_broken.jsonl:{line}:" in msg, msg
    for word in words:
        assert word in msg, (word, msg)


def test_ultrafeedback_binarized_keeps_scores_as_margins_and_strips_the_repeated_prompt():
    imp, _ = _load(FMT / "ultrafeedback-binarized.jsonl")
    by_prompt = {p.prompt: p for p in imp.pairs}
    france = by_prompt["What is the capital of France?"]
    assert (france.chosen, france.rejected, france.margin) == ("Paris.", "Lyon, I think.", 5.5)
    assert france.prompt_id == "p-france" and france.to_record()["margin"] == 5.5
    assert by_prompt["Write a haiku about rain."].margin == 6.0


def test_scored_formats_weigh_each_item_once_and_respect_score_pairs():
    imp, _ = _load(FMT / "ultrafeedback.jsonl")
    recursion = [p for p in imp.pairs if p.prompt.startswith("Explain recursion")]
    assert len(recursion) == 3 and sum(p.weight for p in recursion) == pytest.approx(1.0)
    assert sorted(p.margin for p in recursion) == [0.75, 2.5, 3.25]
    best_only, _ = _load(FMT / "ultrafeedback.jsonl", score_pairs="best_vs_rest")
    recursion = [p for p in best_only.pairs if p.prompt.startswith("Explain recursion")]
    assert {p.chosen for p in recursion} == {"It is when something is defined using itself, like Russian dolls."}
    assert len(recursion) == 2


def test_helpsteer_groups_rows_by_prompt_and_ranks_by_the_chosen_attribute():
    imp, _ = _load(FMT / "helpsteer.jsonl")
    thermo = next(p for p in imp.pairs if "thermostat" in p.prompt)
    assert thermo.chosen.startswith("It measures") and thermo.margin == 3.0
    verbose, _ = _load(FMT / "helpsteer.jsonl", score_field="verbosity")
    assert next(p for p in verbose.pairs if "thermostat" in p.prompt).margin == 1.0
    # without --strict the lonely prompt and the bad score are dropped with their own reasons
    loose, _ = _load(FMT / "helpsteer_broken.jsonl", strict=False, fmt="helpsteer")
    assert len(loose.pairs) == 1
    assert loose.report.dropped == {"single_response": 1, "schema_error": 1}
    assert loose.report.records_read == 4 == loose.report.records_kept + sum(loose.report.dropped.values())


def test_nectar_keeps_the_ranking_and_pku_axis_picks_the_preference():
    imp, _ = _load(FMT / "nectar.jsonl")
    (j,) = imp.judgements
    assert j.prompt == "How can I improve my credit score?" and j.ranking == [0, 2, 1] and j.best == 0
    assert j.source == "nectar"
    better, _ = _load(FMT / "pku-saferlhf.jsonl")
    safer, _ = _load(FMT / "pku-saferlhf.jsonl", pku_axis="safer")
    joke_better = next(p for p in better.pairs if "joke" in p.prompt)
    joke_safer = next(p for p in safer.pairs if "joke" in p.prompt)
    assert joke_better.chosen.startswith("Why did the cat") and joke_safer.chosen == "No."
    assert "pku-axis:safer" in joke_safer.tags


def test_shp_and_openai_map_their_fields():
    shp, _ = _load(FMT / "shp.jsonl")
    sky = next(p for p in shp.pairs if "sky" in p.prompt)
    pasta = next(p for p in shp.pairs if "pasta" in p.prompt)
    assert sky.chosen.startswith("Rayleigh") and pasta.chosen.startswith("Use plenty")
    assert sky.margin == pytest.approx(2.564949, abs=1e-6) and sky.prompt_id == "abc1"
    oai, _ = _load(FMT / "openai.jsonl")
    (pair,) = oai.pairs
    assert pair.prompt.startswith("System: You are a careful assistant.\nUser: Can I take ibuprofen")
    assert pair.chosen.startswith("That combination")


def _trl_rows() -> list[dict]:
    return [json.loads(line) for line in (FMT / "trl.jsonl").read_text().splitlines()]


def _write_containers(tmp_path: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rows = [{"prompt": f"Question {i}?", "chosen": f"A careful answer {i}.", "rejected": f"No {i}."} for i in range(6)]
    jsonl = "".join(json.dumps(r) + "\n" for r in rows).encode()
    out = {}
    out["json-array"] = tmp_path / "a.json"
    out["json-array"].write_text(json.dumps(rows))
    out["csv"] = tmp_path / "a.csv"
    out["csv"].write_text(
        "prompt,chosen,rejected\n" + "".join(f'"{r["prompt"]}","{r["chosen"]}","{r["rejected"]}"\n' for r in rows)
    )
    out["parquet"] = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), out["parquet"])
    out["gzip"] = tmp_path / "a.jsonl.gz"
    out["gzip"].write_bytes(gzip.compress(jsonl))
    out["zstd"] = tmp_path / "a.jsonl.zst"
    out["zstd"].write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "part-000.jsonl").write_bytes(jsonl[: jsonl.index(b"\n", len(jsonl) // 2) + 1])
    (shards / "part-001.jsonl").write_bytes(jsonl[jsonl.index(b"\n", len(jsonl) // 2) + 1 :])
    out["folder"] = shards
    # a datasets.save_to_disk folder: Arrow stream shards named by state.json
    saved = tmp_path / "saved"
    saved.mkdir()
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(saved / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (saved / "dataset_info.json").write_text("{}")
    out["save_to_disk"] = saved
    return out


def test_every_container_gives_the_same_pairs(tmp_path):
    files = _write_containers(tmp_path)
    expected = None
    for kind, path in files.items():
        imp, used = _load(path)
        got = sorted((p.prompt, p.chosen, p.rejected) for p in imp.pairs)
        assert used == "trl" and len(got) == 6, kind
        expected = expected or got
        assert got == expected, kind


def test_a_real_datasets_save_to_disk_folder_imports(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(_trl_rows()[2:] * 1).save_to_disk(str(tmp_path / "ds"))
    imp, used = _load(tmp_path / "ds")
    assert used == "trl" and len(imp.pairs) == 1
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(_trl_rows()[2:])}).save_to_disk(
        str(tmp_path / "dd")
    )
    with pytest.raises(InputError, match="DatasetDict with splits train_prefs: import one split's folder"):
        _load(tmp_path / "dd")


def test_s3_folder_of_shards(s3_server, s3_bucket, s3_client):
    body = (FMT / "ultrafeedback-binarized.jsonl").read_bytes()
    lines = body.splitlines(keepends=True)
    s3_client.put_object(Bucket=s3_bucket, Key="uf/part-0.jsonl", Body=lines[0])
    s3_client.put_object(Bucket=s3_bucket, Key="uf/part-1.jsonl.gz", Body=gzip.compress(lines[1]))
    imp = _importer(strict=True)
    used = imp.add_path(f"s3://{s3_bucket}/uf", Storage(s3_endpoint_url=s3_server))
    assert used == "ultrafeedback-binarized" and sorted(p.margin for p in imp.pairs) == [5.5, 6.0]


def test_nothing_kept_writes_the_report_and_rejected_records_and_publishes_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        "".join(json.dumps({"prompt": f"p{i}", "chosen": "same", "rejected": "same"}) + "\n" for i in range(3))
        + '{"prompt": "x", "chosen": "y"}\n'
    )
    cfg = parse_config({"tracking": {"experiment": "test-formats"}})
    out = tmp_path / "ds-{hash}"
    with pytest.raises(InputError) as err:
        collect_from_file(str(bad), str(out), cfg=cfg)
    msg = str(err.value)
    assert "0 of 4 records kept" in msg and "identical_chosen_rejected x3" in msg and "bad.jsonl:1" in msg
    assert "schema_error x1" in msg and "bad.jsonl:4" in msg
    folder = tmp_path / "ds-rejected"
    assert sorted(p.name for p in folder.iterdir()) == ["rejected.jsonl", "validation.json", "validation.md"]
    rejected = [json.loads(line) for line in (folder / "rejected.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejected] == ["identical_chosen_rejected"] * 3 + ["schema_error"]
    assert rejected[3]["record"] == {"prompt": "x", "chosen": "y"}
    assert json.loads((folder / "validation.json").read_text())["records_kept"] == 0


def test_collect_from_file_publishes_margins(tmp_path):
    cfg = parse_config({"tracking": {"experiment": "test-formats"}})
    res = collect_from_file(str(FMT / "ultrafeedback-binarized.jsonl"), str(tmp_path / "ds"), strict=True, cfg=cfg)
    assert res.format == "ultrafeedback-binarized"
    recs = [
        json.loads(line)
        for f in ("train.jsonl", "eval.jsonl")
        for line in (tmp_path / "ds" / f).read_text().splitlines()
    ]
    assert sorted(r["margin"] for r in recs) == [5.5, 6.0]


def test_multi_turn_prompts_render_with_the_chat_template():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from preftune.text import render_prompt

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    imp, _ = _load(FMT / "hh.jsonl")
    multi = "How do I bake bread?\nAssistant: What kind of bread?\nUser: Sourdough."
    assert render_prompt(multi, tok) == (
        "<|user|>How do I bake bread?<|end|><|assistant|>What kind of bread?<|end|>"
        "<|user|>Sourdough.<|end|><|assistant|>"
    )
    assert render_prompt(imp.pairs[0].prompt, tok).count("<|user|>") == 1


@pytest.mark.skipif(not HH_REAL.is_file(), reason="../shared/data/hh-rlhf is not beside the repo")
def test_the_real_hh_rlhf_records_import():
    imp, used = _load(HH_REAL, strict=False)
    report = imp.report
    assert used == "hh" and report.records_read == 1000
    assert len(imp.pairs) == report.records_kept >= 990  # a few real records repeat or have an empty side
    assert report.records_kept + sum(report.dropped.values()) == 1000
    multi = [p for p in imp.pairs if "\nAssistant: " in p.prompt]
    assert len(multi) > 100  # real red-teaming dialogues are multi-turn
