"""reward.text_view: which part of a prompt the reward model reads, the same in training, the gate and scoring.

``full`` is the whole (flattened) conversation + the response; ``last_turn`` only the last user
turn + the response. The view is saved in reward_model.json and RewardScorer (PPO, evaluate, the
MLflow pyfunc) applies it, so a published model scores what it was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from support.threads import one_thread  # noqa: F401 - autouse: torch on one thread
from test_reward import build_tiny, synth_pairs, write_dataset

from preftune.config import parse_config
from preftune.errors import InputError
from preftune.reward.config import RewardSection
from preftune.reward.data import load_dataset
from preftune.reward.step import viewed
from preftune.scoring.baselines import bag_of_words_correct
from preftune.scoring.metadata import METADATA_FILE, read_metadata
from preftune.scoring.model import RewardScorer
from preftune.scoring.text_view import TEXT_VIEWS, view_pairs, view_prompt
from preftune.text import prompt_messages, render_pair

MULTI = "Can you help me?\nAssistant: Sure, what with?\nUser: How do I fix the engine?"
SINGLE = "How do I fix the engine?"


# --------------------------------------------------------------------------------------
# the view function, on both prompt shapes


def test_views_of_a_flattened_string_prompt():
    assert view_prompt(MULTI, "full") == MULTI
    assert view_prompt(MULTI, "last_turn") == "How do I fix the engine?"
    assert view_prompt(SINGLE, "full") == SINGLE
    assert view_prompt(SINGLE, "last_turn") == SINGLE  # single-turn: unchanged
    # a system message is dropped with the earlier turns; a text that awaits no answer stays as it is
    assert view_prompt("System: be brief\nUser: hi there", "last_turn") == "hi there"
    odd = "Q: a\nAssistant: an answer, and nothing after it"
    assert view_prompt(odd, "last_turn") == odd
    # rendered as the single-turn prompt it became
    assert render_pair(view_prompt(MULTI, "last_turn"), "Check the oil.") == render_pair(SINGLE, "Check the oil.")
    assert render_pair(MULTI, "Check the oil.") != render_pair(SINGLE, "Check the oil.")


def test_views_of_a_message_list_prompt():
    messages = prompt_messages(MULTI)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert view_prompt(messages, "full") == messages
    assert view_prompt(messages, "last_turn") == [{"role": "user", "content": "How do I fix the engine?"}]
    assert messages[0]["content"] == "Can you help me?"  # not modified in place
    one = [{"role": "user", "content": SINGLE}]
    assert view_prompt(one, "last_turn") == one
    with_system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert view_prompt(with_system, "last_turn") == [{"role": "user", "content": "hi"}]


def test_unknown_view_is_refused_everywhere():
    assert set(TEXT_VIEWS) == {"full", "last_turn"}
    with pytest.raises(ValueError, match="unknown text view 'last'"):
        view_prompt(MULTI, "last")
    with pytest.raises(ValueError, match="unknown text view"):
        view_pairs([], "last")
    with pytest.raises(ValidationError, match="text_view"):
        RewardSection(text_view="last")
    assert RewardSection().text_view == "full"


def _multi_turn(rows: list[dict], seed: int) -> list[dict]:
    """The synthetic pairs with an earlier exchange before each prompt (different per prompt)."""
    out = []
    for i, r in enumerate(rows):
        lead = f"Hello number {(i // 2 + seed) % 7}\nAssistant: Hi, go on.\nUser: "
        out.append({**r, "prompt": lead + r["prompt"]})
    return out


def test_viewed_dataset_keeps_ids_and_the_baseline_reads_only_responses(tmp_path):
    rows = _multi_turn(synth_pairs(20, 0), 0)
    ds = load_dataset(write_dataset(tmp_path / "ds", rows[:30], rows[30:]))
    last = viewed(ds, "last_turn")
    assert viewed(ds, "full") is ds
    assert [p.prompt for p in last.train] == [r["prompt"].split("\nUser: ")[-1] for r in rows[:30]]
    assert [(p.prompt_id, p.chosen, p.rejected, p.weight, p.family) for p in last.train] == [
        (p.prompt_id, p.chosen, p.rejected, p.weight, p.family) for p in ds.train
    ]
    # the gate's bag-of-words gets the viewed pairs; its features are the two responses, so (with the
    # same prompt grouping) its per-pair results are the same in both views
    assert np.array_equal(bag_of_words_correct(ds.train, ds.eval), bag_of_words_correct(last.train, last.eval))


# --------------------------------------------------------------------------------------
# end to end: a tiny model trained with last_turn, published, scored


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    from preftune.reward.step import train_reward

    root = tmp_path_factory.mktemp("text_view")
    train = _multi_turn(synth_pairs(40, 0), 0)
    eval_ = _multi_turn(synth_pairs(10, 1, start=10_000), 3)
    texts = [f"User: {r['prompt']}\nAssistant: {r['chosen']} {r['rejected']}" for r in train]
    base = build_tiny("llama", root / "llama", texts)
    dataset = write_dataset(root / "dataset", train, eval_)
    cfg = parse_config(
        {
            "models": {"reward_base": str(base)},
            "reward": {
                "text_view": "last_turn",
                "epochs": 2,
                "batch_size": 16,
                "lr": 3e-3,
                "eval_every": 5,
                "max_length": 96,
                "gate": {"enabled": False},
            },
        }
    )
    out = root / "rm"
    res = train_reward(cfg, dataset, out, progress=False)
    return {"out": out, "dataset": dataset, "result": res}


def test_last_turn_model_records_its_view_and_scores_only_the_last_turn(trained):
    out = trained["out"]
    assert read_metadata(out).text_view == "last_turn"
    assert json.loads((out / METADATA_FILE).read_text())["text_view"] == "last_turn"
    scorer = RewardScorer.load(out)
    assert scorer.text_view == "last_turn"

    responses = ["Sure: to fix the engine, start small.", "No.", "Do it."]
    last = "How should I fix the engine? (case 7)"
    convs = [f"Hello number {k}\nAssistant: Hi, go on.\nUser: {last}" for k in (1, 5, 6)]
    alone = scorer.score([last] * 3, responses)
    for conv in convs:  # any earlier turns: the same rewards as the last turn alone
        assert scorer.score([conv] * 3, responses).tolist() == alone.tolist()

    # the same weights read under 'full' see the earlier turns: they change the rewards
    full = RewardScorer(
        scorer.model,
        scorer.tokenizer,
        max_length=scorer.max_length,
        meta=scorer.meta.model_copy(update={"text_view": "full"}),
    )
    a, b = full.score([convs[0]] * 3, responses), full.score([convs[1]] * 3, responses)
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, alone)


def test_training_and_scoring_read_the_same_text(trained):
    """reward_model.json's reward mean (the trainer's held-out rewards) is what RewardScorer gives the raw prompts."""
    meta = read_metadata(trained["out"])
    scorer = RewardScorer.load(trained["out"])
    ds = load_dataset(trained["dataset"])  # raw multi-turn prompts, as PPO and evaluate pass them
    seen: dict[tuple[str, str], tuple[str, str]] = {}
    for p in ds.eval:
        for resp in (p.chosen, p.rejected):
            seen.setdefault((view_prompt(p.prompt, "last_turn"), resp), (p.prompt, resp))
    prompts, responses = zip(*seen.values(), strict=True)
    rewards = scorer.score(list(prompts), list(responses)).numpy()
    assert float(rewards.mean()) == pytest.approx(meta.reward_mean, abs=1e-4)
    assert float(rewards.std()) == pytest.approx(meta.reward_std, abs=1e-4)


def test_reward_model_json_without_text_view_reads_as_full(trained, tmp_path):
    data = json.loads((trained["out"] / METADATA_FILE).read_text())
    data.pop("text_view")
    (tmp_path / METADATA_FILE).write_text(json.dumps(data))
    assert read_metadata(tmp_path).text_view == "full"
    (tmp_path / METADATA_FILE).write_text(json.dumps({**data, "text_view": "last"}))
    with pytest.raises(InputError, match="text_view"):
        read_metadata(tmp_path)


def test_old_folder_scores_the_whole_conversation(trained, tmp_path):
    """A folder whose reward_model.json predates text_view scores as before: the whole conversation."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(trained["out"], old)
    data = json.loads((old / METADATA_FILE).read_text())
    data.pop("text_view")
    (old / METADATA_FILE).write_text(json.dumps(data))
    scorer = RewardScorer.load(old)
    assert scorer.text_view == "full"
    last = "How should I fix the engine? (case 7)"
    conv = f"Hello number 1\nAssistant: Hi, go on.\nUser: {last}"
    got = scorer.score([conv, last], ["No.", "No."])
    assert got[0].item() != pytest.approx(got[1].item(), abs=1e-4)
    assert got[0].item() == pytest.approx(scorer.score_texts([render_pair(conv, "No.")]).item(), abs=1e-6)


def test_mlflow_pyfunc_applies_the_view(trained):
    import mlflow
    import pandas as pd

    res = trained["result"]
    conv = "Hello number 2\nAssistant: Hi, go on.\nUser: How should I fix the engine? (case 7)"
    frame = pd.DataFrame({"prompt": [conv, "How should I fix the engine? (case 7)"], "response": ["No."] * 2})
    got = mlflow.pyfunc.load_model(res.model_uri).predict(frame)["reward"].tolist()
    assert got[0] == pytest.approx(got[1], abs=1e-6)
    assert got[0] == pytest.approx(RewardScorer.load(Path(trained["out"])).score([conv], ["No."]).item(), abs=1e-5)
