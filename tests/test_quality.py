"""check-fit's data-quality figures on constructed data whose answers are known."""

from __future__ import annotations

import random

import pytest

from preftune.config import parse_config
from preftune.data.dataset import build_dataset, publish
from preftune.data.records import Pair, short_hash
from preftune.errors import ExitCode
from preftune.fit import NotFitError, check_fit, run_check_fit
from preftune.fit.config import QualitySection
from preftune.fit.quality import label_noise, leakage, quality_figures
from preftune.storage import Storage

FILLER = "the a of to and in is it that for on with as was at by this be".split()
POLITE = "thanks please glad certainly happy welcome kindly gladly".split()
RUDE = "stupid whatever ugh dumb annoying boring idiot pointless".split()


def _pair(i: int, prompt: str, chosen: str, rejected: str, family: str = "default", **extra) -> dict:
    return {
        "pair_id": f"p{i}",
        "item_id": short_hash(prompt, sorted([chosen, rejected])),
        "prompt_id": f"q{i}",
        "family": family,
        "tags": [],
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "weight": 1.0,
        "source": "test",
        "rater_id": None,
        "created_at": None,
        **extra,
    }


def _words(rng: random.Random, k: int) -> str:
    return " ".join(rng.choice(FILLER) for _ in range(k))


def _split(pairs: list[dict], every: int = 5) -> tuple[list[dict], list[dict]]:
    return [p for i, p in enumerate(pairs) if i % every], [p for i, p in enumerate(pairs) if not i % every]


def test_chosen_always_longer_gives_length_bias_1_and_a_perfect_length_rule():
    rng = random.Random(0)
    pairs = []
    for i in range(200):
        base = _words(rng, rng.randint(3, 12))
        pairs.append(_pair(i, f"question {i}?", base + " " + _words(rng, rng.randint(1, 6)), base))
    train, eval_ = _split(pairs)
    f = quality_figures(train, eval_, QualitySection())
    assert f.length["chosen_longer_share"] == 1.0 and f.length["tie_share"] == 0.0
    assert f.length["rule_accuracy"] == 1.0 == f.baselines["length_rule_accuracy"] and f.length["rule"] == "longer wins"
    assert [c.name for c in f.breaches] == ["length_rule_accuracy"] and not f.stop
    assert f.margin is None and f.identical["pairs"] == 0
    m = f.metrics()
    assert m["fit.quality.length.chosen_longer_share"] == 1.0 and m["fit.quality.length.rule_accuracy"] == 1.0
    assert m["fit.quality.breaches"] == 1.0


def test_chosen_always_shorter_flips_the_rule_and_equal_lengths_score_one_half():
    rng = random.Random(1)
    shorter = [_pair(i, f"q{i}", "ok", "ok " + _words(rng, 4)) for i in range(50)]
    train, eval_ = _split(shorter)
    f = quality_figures(train, eval_, QualitySection())
    assert f.length["chosen_longer_share"] == 0.0 and f.length["rule_accuracy"] == 1.0
    assert f.length["rule"] == "shorter wins"
    same = [_pair(i, f"q{i}", "aaaa" + str(i % 10), "bbbb" + str(i % 10)) for i in range(50)]
    f = quality_figures(*_split(same), QualitySection())
    assert f.length["tie_share"] == 1.0 and f.length["rule_accuracy"] == 0.5


def test_bag_of_words_baseline_learns_a_word_rule_and_label_noise_finds_flipped_labels():
    rng = random.Random(2)
    pairs, flipped = [], set()
    for i in range(500):
        good = _words(rng, 6) + " " + " ".join(rng.sample(POLITE, 2))
        bad = _words(rng, 6) + " " + " ".join(rng.sample(RUDE, 2))
        if i % 8 == 3:  # 12.5 % of the labels are wrong
            good, bad = bad, good
            flipped.add(f"p{i}")
        pairs.append(_pair(i, f"question number {i}: {_words(rng, 5)}?", good, bad))
    train, eval_ = _split(pairs)
    f = quality_figures(train, eval_, QualitySection(noise_confidence=0.8))
    assert f.baselines["bag_of_words_accuracy"] >= 0.8
    noise = f.label_noise
    assert noise["pairs"] == 500 and noise["share"] == pytest.approx(0.125, abs=0.05)
    # the confidently contradicted pairs are the flipped ones
    direct = label_noise(pairs, folds=5, confidence=0.8, seed=0)
    assert direct["contradicted"] == round(direct["share"] * 500)
    clean = [p for p in pairs if p["pair_id"] not in flipped]
    assert label_noise(clean, folds=5, confidence=0.8, seed=0)["share"] <= 0.01


def test_leakage_counts_exact_and_near_duplicate_prompts():
    rng = random.Random(3)
    train_prompts = [f"tell me about topic {i}: " + _words(rng, 40) for i in range(40)]
    eval_prompts = [
        train_prompts[0].upper() + "!!",  # exact once case and punctuation are ignored
        " ".join(train_prompts[1].split()[:-1]),  # near: one word less on a long prompt
        "a completely different question about gardening tomatoes in winter",
        "how do compilers optimise tail calls",
    ]
    out = leakage(train_prompts, eval_prompts, similarity=0.9)
    assert (out["exact"], out["near"], out["eval_prompts"]) == (1, 1, 4)
    assert out["share"] == 0.5 and {e["kind"] for e in out["examples"]} == {"exact", "near"}
    assert leakage(train_prompts, eval_prompts[2:], similarity=0.9)["share"] == 0.0


def test_identical_pairs_and_margins():
    pairs = [_pair(i, f"q{i}", f"Answer {i}", f"ANSWER {i}", margin=float(i % 3)) for i in range(4)]
    pairs += [_pair(10 + i, f"r{i}", f"yes {i}", f"nah {i}", margin=float(i % 3)) for i in range(16)]
    f = quality_figures(*_split(pairs), QualitySection(max_identical_share=0.1))
    assert f.identical["pairs"] == 4 and f.identical["share"] == 0.2
    assert [c.name for c in f.breaches] == ["identical"]
    assert f.margin["n"] == 20 and f.margin["zero_share"] == pytest.approx(8 / 20) and f.margin["max"] == 2.0
    assert f.margin["p50"] == 1.0 and sum(f.margin["histogram"]["counts"]) == 20


def test_large_datasets_use_a_seeded_sample():
    pairs = [_pair(i, f"q{i}", "longer answer", "short") for i in range(300)]
    train, eval_ = _split(pairs)
    f = quality_figures(train, eval_, QualitySection(max_pairs=100))
    assert f.sampled and f.n_pairs == 100 and f.n_eval == 20 and any("sample" in n for n in f.notes)


@pytest.fixture
def longer_wins(tmp_path) -> str:
    """A judged dataset (every item rated twice, raters agree) whose chosen answers are always longer."""
    from preftune.data.records import Judgement

    judgements = []
    for i in range(30):
        texts = [f"short {i}", f"a much longer answer number {i} with detail"]
        for r in range(2):
            judgements.append(
                Judgement(
                    item_id=f"it{i}",
                    prompt_id=f"q{i}",
                    family="default",
                    tags=[],
                    prompt=f"question {i}?",
                    candidates=[{"id": f"c{k}", "text": t} for k, t in enumerate(texts)],
                    rater_id=f"r{r}",
                    best=1,
                    ranking=None,
                    all_unacceptable=False,
                    unsafe=[],
                    source="test",
                    created_at=None,
                )
            )
    from preftune.collect.pairs import expand_judgements

    built = build_dataset(
        pairs=expand_judgements(judgements),
        judgements=judgements,
        eval_fraction=0.2,
        seed=0,
        validation={},
        validation_md="",
    )
    return publish(built, str(tmp_path / "longer"), Storage())


def test_check_fit_reports_the_figures_and_stops_on_a_breach_when_asked(longer_wins, tmp_path):
    cfg = parse_config({"fit": {"bootstrap_resamples": 100}, "tracking": {"experiment": "test-quality"}})
    report = check_fit(longer_wins, cfg)
    assert report.proceed and report.quality["length"]["rule_accuracy"] == 1.0
    assert report.quality["breaches"] == ["length_rule_accuracy"]
    md = report.to_markdown()
    assert "## Data quality" in md and "length_rule_accuracy: **breached**" in md
    stop = parse_config(
        {"fit": {"bootstrap_resamples": 100, "quality": {"on_breach": "stop"}}, "tracking": {"experiment": "tq"}}
    )
    with pytest.raises(NotFitError) as err:
        run_check_fit(longer_wins, stop, str(tmp_path / "out"))
    assert err.value.exit_code == ExitCode.NOT_FIT and "length_rule_accuracy" in str(err.value)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fit_report.json", "fit_report.md"]
    off = parse_config({"fit": {"bootstrap_resamples": 100, "quality": {"enabled": False}}})
    assert check_fit(longer_wins, off).quality is None


def test_pair_objects_work_too():
    """The figures read dataset records (dicts); Pair.to_record gives the same."""
    p = Pair(
        pair_id="x",
        item_id="i",
        prompt_id="q",
        family="f",
        tags=[],
        prompt="q?",
        chosen="long answer",
        rejected="no",
        weight=1.0,
        source="t",
        rater_id=None,
        created_at=None,
    )
    f = quality_figures([p.to_record()] * 3, [p.to_record()], QualitySection())
    assert f.length["chosen_longer_share"] == 1.0
