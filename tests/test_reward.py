"""train-reward: the Bradley-Terry loss, batching, metrics, the step, its gate and its outputs.

Tiny models (2 layers, width 32) with tokenizers trained here on the test corpus: a Llama with
a plain tokenizer, and a GPT-2 whose tokenizer has a chat template (a different architecture
and rendering than the policy's), on a synthetic preference task with two families.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from support.threads import one_thread  # noqa: F401 - autouse: torch on one thread

from preftune.config import parse_config
from preftune.errors import ExitCode, InputError, PreftuneError
from preftune.reward.config import RewardSection
from preftune.reward.data import load_dataset, split_by_prompt, tokenize_pairs
from preftune.reward.losses import bradley_terry_loss
from preftune.reward.metrics import (
    accuracy_by_family,
    calibration_table,
    expected_calibration_error,
    length_bias,
    pairwise_accuracy,
)
from preftune.reward.trainer import PairwiseRewardTrainer
from preftune.scoring.metadata import METADATA_FILE, read_metadata
from preftune.scoring.model import RewardScorer, add_lora, load_sequence_classifier, load_tokenizer

CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------
# fixtures: a synthetic preference task and tiny models


def synth_pairs(n_prompts: int, seed: int, start: int = 0) -> list[dict]:
    """Two families; the preferred behaviour is a phrase, not a length (rejected is sometimes longer)."""
    rng = random.Random(seed)
    topics = ["the garden", "a river", "my taxes", "the engine", "a poem", "the budget", "my cat", "a bridge"]
    verbs = ["fix", "plan", "understand", "improve", "describe", "check"]
    good = {
        "alpha": ["Here is a careful explanation of how to {v} {t}, step by step.", "Sure: to {v} {t}, start small."],
        "beta": ["Please ask a professional about {t}; I can share notes.", "I suggest you consult an expert first."],
    }
    bad = {
        "alpha": ["No.", "I will not help with {t} at all, and you should not ask me about it again, not ever."],
        "beta": ["Just {v} {t} right now, it is definitely fine, there is no doubt about it at all.", "Do it."],
    }
    rows = []
    for i in range(start, start + n_prompts):
        fam = "alpha" if i % 2 == 0 else "beta"
        t, v = rng.choice(topics), rng.choice(verbs)
        prompt = f"How should I {v} {t}? (case {i})"
        for j in range(2):
            rows.append(
                {
                    "pair_id": f"p{i}-{j}",
                    "item_id": f"i{i}",
                    "prompt_id": f"q{i}",
                    "family": fam,
                    "tags": [],
                    "prompt": prompt,
                    "chosen": rng.choice(good[fam]).format(v=v, t=t),
                    "rejected": rng.choice(bad[fam]).format(v=v, t=t),
                    "weight": 1.0 if j == 0 else 0.5,
                    "source": "simulated",
                    "rater_id": "r1",
                }
            )
    return rows


def write_dataset(root: Path, train: list[dict], eval_: list[dict], hash_: str = "synthetic") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", eval_)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "judgements.jsonl").write_text("")
    meta = {"format": "preftune.dataset", "version": 1, "hash": hash_, "counts": {"train_pairs": len(train)}}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def build_tiny(kind: str, out: Path, texts: list[str], chat_template: str | None = None) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    vocab = 400 if kind == "llama" else 330
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if chat_template:
        tok.chat_template = chat_template
    if kind == "llama":
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(
            vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2
        )
        model = GPT2LMHeadModel(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reward")
    train, eval_ = synth_pairs(60, 0), synth_pairs(20, 1, start=10_000)
    texts = [f"User: {r['prompt']}\nAssistant: {r['chosen']} {r['rejected']}" for r in train]
    return {
        "dataset": write_dataset(root / "dataset", train, eval_),
        "llama": build_tiny("llama", root / "llama", texts),
        "gpt2_chat": build_tiny("gpt2", root / "gpt2", texts, chat_template=CHAT_TEMPLATE),
        "root": root,
    }


def step_config(base: Path, **reward) -> object:
    settings = {"epochs": 3, "batch_size": 16, "lr": 3e-3, "eval_every": 5, "max_length": 96}
    settings.update(reward)
    return parse_config({"models": {"reward_base": str(base)}, "reward": settings})


def trainer_for(base: Path, mode: str = "full", **settings) -> tuple[PairwiseRewardTrainer, object]:
    torch.manual_seed(0)
    tok = load_tokenizer(base)
    model = load_sequence_classifier(base, tok, CPU)
    if mode == "lora":
        model = add_lora(model, 8, 16, 0.0)
    s = {"epochs": 3, "batch_size": 16, "lr": 3e-3, "eval_every": 5}
    s.update(settings)
    return PairwiseRewardTrainer(model, tok.pad_token_id, RewardSection(**s), CPU, progress=False), tok


# --------------------------------------------------------------------------------------
# loss and metrics


def test_bt_loss_matches_formula_with_margin_smoothing_and_weights():
    g = torch.Generator().manual_seed(0)
    r_c, r_r = torch.randn(7, generator=g) * 3, torch.randn(7, generator=g) * 3
    w = torch.rand(7, generator=g) + 0.1
    margin, eps = 0.5, 0.1

    def logsig(x: float) -> float:
        return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))

    per = []
    for c, r in zip(r_c.tolist(), r_r.tolist(), strict=True):
        d = c - r - margin
        per.append(-(1 - eps) * logsig(d) - eps * logsig(-d))
    expected_mean = sum(wi * li for wi, li in zip(w.tolist(), per, strict=True)) / sum(w.tolist())

    got = bradley_terry_loss(r_c, r_r, margin=margin, label_smoothing=eps, weights=w)
    assert got.item() == pytest.approx(expected_mean, rel=1e-5)
    got_none = bradley_terry_loss(r_c, r_r, margin=margin, label_smoothing=eps, reduction="none")
    assert got_none.tolist() == pytest.approx(per, rel=1e-5)
    got_sum = bradley_terry_loss(r_c, r_r, margin=margin, label_smoothing=eps, weights=w, reduction="sum")
    assert got_sum.item() == pytest.approx(sum(wi * li for wi, li in zip(w.tolist(), per, strict=True)), rel=1e-5)
    # plain BT, unit weights: -mean(logsigmoid(r_c - r_r))
    plain = bradley_terry_loss(r_c, r_r)
    assert plain.item() == pytest.approx(
        -sum(logsig(c - r) for c, r in zip(r_c.tolist(), r_r.tolist(), strict=True)) / 7, rel=1e-5
    )
    # a margin makes the same rewards cost more; smoothing makes a huge win cost more than zero
    assert bradley_terry_loss(r_c, r_r, margin=1.0).item() > plain.item()
    big = torch.tensor([50.0])
    assert bradley_terry_loss(big, -big).item() < 1e-6
    assert bradley_terry_loss(big, -big, label_smoothing=0.1).item() == pytest.approx(0.1 * 100, rel=1e-3)


def test_accuracy_is_not_fooled_by_ties_or_swapped_labels():
    rng = np.random.default_rng(0)
    c, r = rng.normal(size=200) + 0.5, rng.normal(size=200)
    acc = pairwise_accuracy(c, r)
    assert 0.5 < acc < 1.0
    assert pairwise_accuracy(r, c) == pytest.approx(1 - acc)
    const = np.zeros(200)
    assert pairwise_accuracy(const, const) == 0.5  # a constant scorer is at chance, both ways round
    assert pairwise_accuracy(np.array([1.0, 0.0]), np.array([0.0, 1.0]), weights=np.array([3.0, 1.0])) == 0.75
    fams = accuracy_by_family(np.array([1.0, 0.0, 2.0]), np.array([0.0, 1.0, 1.0]), ["a", "a", "b"])
    assert fams == {"a": 0.5, "b": 1.0}


def test_calibration_and_length_bias_figures():
    d = np.linspace(-1, 6, 100)  # mostly right, more often right when the margin is larger
    table = calibration_table(d, np.zeros_like(d), n_buckets=5)
    assert [b.n for b in table] == [20] * 5
    assert table[0].accuracy < table[-1].accuracy == 1.0
    assert all(b.lo <= b.hi for b in table) and 0.0 <= expected_calibration_error(table) <= 1.0

    # a scorer that only measures length: perfect when the chosen answer is longer, useless when shorter
    chosen_chars = np.array([50.0, 60, 10, 12])
    rejected_chars = np.array([20.0, 30, 40, 44])
    lb = length_bias(chosen_chars, rejected_chars, chosen_chars, rejected_chars)
    assert lb.spearman == pytest.approx(1.0)
    assert lb.accuracy_chosen_longer == 1.0 and lb.accuracy_chosen_shorter == 0.0
    assert lb.chosen_longer_share == 0.5


# --------------------------------------------------------------------------------------
# data


def test_dataset_errors_name_file_and_line(tmp_path):
    good = synth_pairs(2, 0)
    root = write_dataset(tmp_path / "d", good, good)
    with open(root / "train.jsonl", "a") as fh:
        fh.write('{"prompt": "x", "chosen": "a"}\n')
    with pytest.raises(InputError, match=r"train\.jsonl:5: field 'rejected'"):
        load_dataset(root)
    root = write_dataset(tmp_path / "e", good, good)
    (root / "eval.jsonl").write_text(json.dumps({**good[0], "weight": -1}) + "\n")
    with pytest.raises(InputError, match=r"eval\.jsonl:1: 'weight' must be a positive"):
        load_dataset(root)
    root = write_dataset(tmp_path / "f", good, [])
    with pytest.raises(InputError, match="no held-out pairs"):
        load_dataset(root)
    with pytest.raises(InputError, match="not a preftune dataset"):
        load_dataset(tmp_path)


def test_validation_split_is_by_prompt(tiny):
    ds = load_dataset(tiny["dataset"])
    train, val = split_by_prompt(ds.train, 0.1, seed=0)
    assert val and len(train) + len(val) == len(ds.train)
    assert not {p.prompt_id for p in train} & {p.prompt_id for p in val}
    assert split_by_prompt(ds.train[:4], 0.1, seed=0)[1] == []  # too few prompts: no split


# --------------------------------------------------------------------------------------
# the trainer


def test_one_batched_forward_equals_separate_forwards(tiny):
    trainer, tok = trainer_for(tiny["llama"])
    ds = load_dataset(tiny["dataset"])
    data = tokenize_pairs(ds.eval[:6], tok, 96)
    assert len({len(x) for x in data.chosen + data.rejected}) > 1  # the batch really is padded
    idx = np.arange(6)
    trainer.model.eval()
    with torch.no_grad():
        r_c, r_r = trainer.pair_rewards(data, idx)
        for i in idx:
            for ids, batched in ((data.chosen[i], r_c[i]), (data.rejected[i], r_r[i])):
                alone = trainer.model(input_ids=torch.tensor([ids]), use_cache=False).logits.squeeze()
                assert batched.item() == pytest.approx(alone.item(), abs=1e-5)


def test_training_is_seeded_and_learns(tiny):
    ds = load_dataset(tiny["dataset"])
    outs = []
    for _ in range(2):
        trainer, tok = trainer_for(tiny["llama"], epochs=2)
        fit = trainer.fit(tokenize_pairs(ds.train, tok, 96))
        ev = trainer.evaluate(tokenize_pairs(ds.eval, tok, 96))
        outs.append(ev.chosen)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert fit.optimizer_steps == 2 * math.ceil(len(ds.train) / 16)
    assert ev.accuracy >= 0.9


def test_gradient_accumulation_matches_one_large_batch(tiny):
    """8 pairs x 2 accumulated == 16 pairs at once (weighted mean over the whole optimiser step)."""

    class SGDTrainer(PairwiseRewardTrainer):
        def _optimizer(self):  # plain SGD: the update is lr * gradient, so equal gradients give equal weights
            return torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=0.1)

    ds = load_dataset(tiny["dataset"])
    pairs = [p for p in ds.train][:16]
    results = []
    for batch, accum in ((16, 1), (8, 2)):
        torch.manual_seed(0)
        tok = load_tokenizer(tiny["llama"])
        model = load_sequence_classifier(tiny["llama"], tok, CPU)
        s = RewardSection(epochs=1, batch_size=batch, grad_accum=accum, warmup_ratio=0.0)
        tr = SGDTrainer(model, tok.pad_token_id, s, CPU, seed=3, progress=False)
        fit = tr.fit(tokenize_pairs(pairs, tok, 96))
        assert fit.optimizer_steps == 1 and fit.pairs_seen == 16
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_early_stopping_restores_the_best_weights(tiny):
    """Validation pairs with flipped labels: eval loss rises as training works, so the first evaluation is best."""
    ds = load_dataset(tiny["dataset"])
    trainer, tok = trainer_for(tiny["llama"], epochs=4, eval_every=2, early_stopping_patience=2)
    train = tokenize_pairs(ds.train, tok, 96)
    val = tokenize_pairs(ds.eval, tok, 96).swapped()
    recorded = []
    trainer.on_metrics = lambda m, step: recorded.append((step, m)) if "reward.val.loss" in m else None
    fit = trainer.fit(train, val)
    assert fit.stopped_early
    val_losses = [m["reward.val.loss"] for _, m in recorded]
    assert fit.best_step == recorded[int(np.argmin(val_losses))][0] < fit.optimizer_steps
    assert trainer.evaluate(val).loss == pytest.approx(fit.best_val_loss, abs=1e-5)


# --------------------------------------------------------------------------------------
# the step


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_train_reward_publishes_a_reloadable_model(tiny, tmp_path, mode):
    import mlflow
    from transformers import AutoModelForSequenceClassification

    from preftune.reward.step import train_reward

    lr = 3e-3 if mode == "full" else 1e-2
    cfg = step_config(tiny["llama"], mode=mode, lr=lr, min_accuracy=0.8)
    out = tmp_path / "rm"
    res = train_reward(cfg, tiny["dataset"], out, progress=False)

    assert res.eval_accuracy >= 0.9 and set(res.per_family) == {"alpha", "beta"}
    meta = read_metadata(out)
    assert meta.format == "preftune.reward_model" and meta.version == 1
    assert meta.dataset_hash == "synthetic" and meta.base == str(tiny["llama"])
    assert meta.config_hash == cfg.config_hash() and meta.max_length == 96
    assert meta.eval_accuracy == res.eval_accuracy and meta.reward_std > 0
    assert (out / "adapter" / "adapter_config.json").is_file() == (mode == "lora")
    assert res.evaluation.swap_error < 0.02

    # merged weights load with plain from_pretrained (no peft) and score like the scorer
    ds = load_dataset(tiny["dataset"])
    scorer = RewardScorer.load(out)
    prompts, responses = [p.prompt for p in ds.eval[:4]], [p.chosen for p in ds.eval[:4]]
    rewards = scorer.score(prompts, responses)
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert plain.config.pad_token_id is not None
    texts = [f"User: {p}\nAssistant: {r}" for p, r in zip(prompts, responses, strict=True)]
    with torch.no_grad():
        direct = [plain(**scorer.tokenizer(t, return_tensors="pt")).logits.item() for t in texts]
    assert rewards.tolist() == pytest.approx(direct, abs=1e-4)
    normed = scorer.score(prompts, responses, normalize=True)
    assert normed.tolist() == pytest.approx(((rewards - meta.reward_mean) / meta.reward_std).tolist(), abs=1e-6)

    # MLflow: step metrics, final figures, artifacts and a pyfunc model that gives the same rewards
    run = mlflow.get_run(res.mlflow_run_id)
    assert run.data.tags["preftune.step"] == "train-reward" and run.data.tags["preftune.reward.gate"] == "passed"
    for key in (
        "reward.eval_accuracy",
        "reward.eval_accuracy.alpha",
        "reward.reward_std",
        "reward.swap_accuracy",
        "reward.calibration_ece",
        "reward.length.spearman",
    ):
        assert key in run.data.metrics
    history = mlflow.MlflowClient().get_metric_history(res.mlflow_run_id, "reward.train.loss")
    assert len(history) >= 2 and history[-1].value < history[0].value
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(res.mlflow_run_id, "reward")}
    assert {"reward/calibration.png", "reward/calibration.json", f"reward/{METADATA_FILE}"} <= arts
    import pandas as pd

    pyfunc = mlflow.pyfunc.load_model(res.model_uri)
    got = pyfunc.predict(pd.DataFrame({"prompt": prompts, "response": responses}))
    assert got["reward"].tolist() == pytest.approx(rewards.tolist(), abs=1e-5)


@pytest.mark.slow
def test_gate_failure_publishes_nothing(tiny, tmp_path):
    import mlflow

    from preftune.reward.step import train_reward

    cfg = step_config(tiny["llama"], epochs=1, lr=1e-7, min_accuracy=0.99)  # cannot learn in time
    out = tmp_path / "rm"
    with pytest.raises(PreftuneError) as info:
        train_reward(cfg, tiny["dataset"], out, progress=False)
    err = info.value
    assert err.exit_code == ExitCode.REWARD_GATE == 11
    assert "floor FAILED: accuracy" in err.message and "reward.min_accuracy floor 0.990" in err.message
    assert "baseline" in err.message and "bag-of-words" in err.message and "alpha" in err.message
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no folder, no staging leftovers
    runs = mlflow.search_runs(filter_string="tags.`preftune.reward.gate` = 'failed'", output_format="list")
    assert runs and runs[0].info.status == "FAILED"
    assert "reward.eval_accuracy" in runs[0].data.metrics and "reward.baseline.bag_of_words" in runs[0].data.metrics
    assert runs[0].data.tags["preftune.reward.gate_reason"].startswith("reward gate failed")
    assert (
        mlflow.search_logged_models(filter_string=f"source_run_id = '{runs[0].info.run_id}'", output_format="list")
        == []
    )


@pytest.mark.slow
def test_different_architecture_and_chat_template_tokenizer(tiny, tmp_path):
    """A GPT-2 reward model whose tokenizer has a chat template: pairs are rendered with that template."""
    from preftune.reward.step import train_reward
    from preftune.text import render_pair

    cfg = step_config(tiny["gpt2_chat"], min_accuracy=0.8, lr=5e-3)
    res = train_reward(cfg, tiny["dataset"], tmp_path / "rm", progress=False)
    assert res.eval_accuracy >= 0.9
    scorer = RewardScorer.load(tmp_path / "rm")
    text = render_pair("hi?", "Sure: to fix it, start small.", scorer.tokenizer)
    assert text.startswith("<|user|> hi?")
    assert scorer.score(["hi?"], ["Sure: to fix it, start small."]).item() == pytest.approx(
        scorer.score_texts([text]).item()
    )


def test_cli_train_reward(tiny, tmp_path):
    import typer
    from typer.testing import CliRunner

    from preftune.cli import reward_cmd

    app = typer.Typer()
    reward_cmd.register(app)

    @app.command("noop")  # a second command so typer keeps "train-reward" as a sub-command name
    def _noop() -> None: ...

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        f"models:\n  reward_base: {tiny['llama']}\nreward:\n  epochs: 3\n  batch_size: 16\n  lr: 0.003\n"
        "  max_length: 96\n  min_accuracy: 0.8\n"
    )
    out = tmp_path / "rm"
    result = CliRunner().invoke(
        app,
        [
            "train-reward",
            "--dataset",
            str(tiny["dataset"]),
            "--output",
            str(out),
            "--config",
            str(cfg_file),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "reward model published to" in result.output and (out / METADATA_FILE).is_file()


def test_metadata_is_validated(tmp_path):
    with pytest.raises(InputError, match="not a preftune reward model"):
        read_metadata(tmp_path)
    (tmp_path / METADATA_FILE).write_text(json.dumps({"format": "preftune.reward_model", "version": 2}))
    with pytest.raises(InputError, match="unsupported"):
        read_metadata(tmp_path)
    (tmp_path / METADATA_FILE).write_text(
        json.dumps(
            {
                "format": "preftune.reward_model",
                "version": 1,
                "base": "b",
                "dataset_hash": "h",
                "eval_accuracy": 0.9,
                "reward_mean": 0.0,
                "reward_std": 0.0,
                "config_hash": "c",
                "max_length": 8,
            }
        )
    )
    with pytest.raises(InputError, match="reward_std"):
        read_metadata(tmp_path)


def test_importing_the_package_stays_light():
    """``import preftune.reward`` (metadata readers, the CLI) must not pull in torch or mlflow."""
    import subprocess
    import sys

    code = "import sys, preftune.scoring.metadata; print('torch' in sys.modules, 'mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
