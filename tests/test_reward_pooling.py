"""reward.pooling: how a row's hidden states become its reward, for decoder and encoder reward bases.

``auto`` is the architecture's own head; ``last_token`` / ``cls`` / ``mean`` pool the backbone's
last hidden states and apply the head's linear layer. The pooling is saved in reward_model.json,
so RewardScorer and the MLflow pyfunc score the way training did, from the same
``from_pretrained`` folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from support.threads import one_thread  # noqa: F401 - autouse: torch on one thread
from test_reward import build_tiny, synth_pairs, write_dataset

from preftune.config import parse_config
from preftune.errors import InputError
from preftune.reward.data import load_dataset
from preftune.scoring.batching import pad_right
from preftune.scoring.metadata import read_metadata
from preftune.scoring.model import (
    RewardScorer,
    check_pooling,
    load_sequence_classifier,
    load_tokenizer,
    pool_hidden,
    rewards_of,
)

CPU = torch.device("cpu")


def build_tiny_encoder(kind: str, out: Path, tokenizer_from: Path) -> Path:
    """A tiny BERT (linear head over the tanh pooler) or RoBERTa (dense+tanh+out_proj head), sharing a tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel, RobertaConfig, RobertaModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    common = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=300,
    )
    model = BertModel(BertConfig(**common)) if kind == "bert" else RobertaModel(RobertaConfig(**common, pad_token_id=0))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pooling")
    train, eval_ = synth_pairs(60, 0), synth_pairs(20, 1, start=10_000)
    texts = [f"User: {r['prompt']}\nAssistant: {r['chosen']} {r['rejected']}" for r in train]
    llama = build_tiny("llama", root / "llama", texts)
    return {
        "dataset": write_dataset(root / "dataset", train, eval_),
        "llama": llama,
        "bert": build_tiny_encoder("bert", root / "bert", llama),
        "roberta": build_tiny_encoder("roberta", root / "roberta", llama),
    }


def batch(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pad_right([tok(t)["input_ids"] for t in texts], tok.pad_token_id)
    return torch.from_numpy(ids), torch.from_numpy(mask)


TEXTS = ["User: hi\nAssistant: hello there, how can I help?", "User: a much longer question here?\nAssistant: no."]


def test_pool_hidden_on_known_tensors():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert pool_hidden(hidden, mask, "cls").tolist() == [[0, 1], [6, 7]]
    assert pool_hidden(hidden, mask, "last_token").tolist() == [[4, 5], [8, 9]]
    assert pool_hidden(hidden, mask, "mean").tolist() == [[2, 3], [7, 8]]  # the pad position is not averaged
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_hidden(hidden, mask, "max")


def test_last_token_pooling_is_what_a_decoder_head_already_reads(bases):
    tok = load_tokenizer(bases["llama"])
    model = load_sequence_classifier(bases["llama"], tok, CPU).eval()
    ids, mask = batch(tok, TEXTS)
    with torch.no_grad():
        auto = rewards_of(model, ids, mask, "auto")
        last = rewards_of(model, ids, mask, "last_token")
        mean = rewards_of(model, ids, mask, "mean")
    assert last.tolist() == pytest.approx(auto.tolist(), abs=1e-5)
    assert not torch.allclose(mean, auto)


def test_encoder_pooling_reads_the_hidden_states_not_the_untrained_pooler(bases):
    tok = load_tokenizer(bases["bert"])
    model = load_sequence_classifier(bases["bert"], tok, CPU).eval()
    ids, mask = batch(tok, TEXTS)
    with torch.no_grad():
        hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        auto = rewards_of(model, ids, mask, "auto")
        cls = rewards_of(model, ids, mask, "cls")
        mean = rewards_of(model, ids, mask, "mean")
        want_cls = model.classifier(hidden[:, 0]).squeeze(-1)
        m = mask.unsqueeze(-1).float()
        want_mean = model.classifier((hidden * m).sum(1) / m.sum(1)).squeeze(-1)
        alone = [rewards_of(model, *batch(tok, [t]), "mean").item() for t in TEXTS]  # no padding at all
    assert cls.tolist() == pytest.approx(want_cls.tolist(), abs=1e-5)
    assert mean.tolist() == pytest.approx(want_mean.tolist(), abs=1e-5)
    assert mean.tolist() == pytest.approx(alone, abs=1e-4)  # padding never changes a row's reward
    assert not torch.allclose(cls, auto)  # auto goes through BERT's tanh pooler


def test_a_head_that_is_not_one_linear_layer_gets_an_actionable_error(bases):
    tok = load_tokenizer(bases["roberta"])
    model = load_sequence_classifier(bases["roberta"], tok, CPU)
    check_pooling(model, "auto")
    with pytest.raises(InputError, match="set reward.pooling: auto"):
        check_pooling(model, "mean")
    with pytest.raises(InputError, match="one of auto, last_token, cls, mean"):
        check_pooling(model, "max")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_mean_pooled_encoder_reward_model_is_published_and_scored_the_same_way(bases, tmp_path, mode):
    import mlflow
    import pandas as pd
    from transformers import AutoModelForSequenceClassification

    from preftune.reward.step import train_reward

    cfg = parse_config(
        {
            "models": {"reward_base": str(bases["bert"])},
            "reward": {
                "pooling": "mean",
                "mode": mode,
                "epochs": 3,
                "batch_size": 16,
                "lr": 3e-3 if mode == "full" else 1e-2,
                "eval_every": 5,
                "max_length": 96,
                "gate": {"enabled": False},
            },
        }
    )
    out = tmp_path / "rm"
    res = train_reward(cfg, bases["dataset"], out, progress=False)
    assert res.eval_accuracy >= 0.8  # the synthetic task is learnable through the mean-pooled head
    assert read_metadata(out).pooling == "mean"

    ds = load_dataset(bases["dataset"])
    prompts, responses = [p.prompt for p in ds.eval[:4]], [p.chosen for p in ds.eval[:4]]
    scorer = RewardScorer.load(out)
    assert scorer.pooling == "mean"
    rewards = scorer.score(prompts, responses)

    # the published folder loads with plain from_pretrained; mean-pooling its hidden states gives the same rewards
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    texts = [f"User: {p}\nAssistant: {r}" for p, r in zip(prompts, responses, strict=True)]
    direct = []
    with torch.no_grad():
        for t in texts:
            enc = scorer.tokenizer(t, return_tensors="pt")
            hidden = plain.bert(**enc).last_hidden_state
            direct.append(plain.classifier(hidden.mean(dim=1)).item())
            assert plain(**enc).logits.item() != pytest.approx(direct[-1], abs=1e-4)  # auto would differ
    assert rewards.tolist() == pytest.approx(direct, abs=1e-4)

    got = mlflow.pyfunc.load_model(res.model_uri).predict(pd.DataFrame({"prompt": prompts, "response": responses}))
    assert np.allclose(got["reward"].to_numpy(), rewards.numpy(), atol=1e-5)


def test_reward_model_json_without_pooling_reads_as_auto(tmp_path):
    import json

    from preftune.scoring.metadata import METADATA_FILE

    meta = {
        "format": "preftune.reward_model",
        "version": 1,
        "base": "x",
        "dataset_hash": "h",
        "eval_accuracy": 0.7,
        "reward_mean": 0.0,
        "reward_std": 1.0,
        "config_hash": "c",
        "max_length": 64,
    }
    (tmp_path / METADATA_FILE).write_text(json.dumps(meta))
    assert read_metadata(tmp_path).pooling == "auto"
    (tmp_path / METADATA_FILE).write_text(json.dumps({**meta, "pooling": "max"}))
    with pytest.raises(InputError, match="pooling"):
        read_metadata(tmp_path)
