"""The train-reward step: preference dataset in, gated reward-model folder out.

1. read the dataset (local or ``s3://``), render pairs with the reward model's own tokenizer;
2. train with the pairwise Bradley-Terry loss (LoRA or full), early stopping on a validation
   split carved from the *training* prompts, so the held-out eval set stays untouched;
3. measure on the held-out pairs: accuracy overall and per family, reward mean/std,
   calibration by margin bucket, length bias, and a swap sanity check;
4. gate, calibrated to the data (:mod:`preftune.reward.gate`): the reward model must beat
   the best trivial baseline (length rule, bag-of-words) by a paired-bootstrap lower bound,
   reach a share of the agreement ceiling where check-fit measured one, and the optional
   ``reward.min_accuracy`` floor; a failure exits 11 and nothing is published;
5. publish merged weights + tokenizer + ``reward_model.json`` atomically through storage,
   and log the same folder to MLflow as a pyfunc model with the figures.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from preftune.common.timestamps import utc_now
from preftune.config import RunConfig
from preftune.errors import ExitCode, PreftuneError
from preftune.reward.crossfit import CrossFit, cross_fit
from preftune.reward.data import PreferenceDataset, TokenizedPairs, load_dataset, split_by_prompt, tokenize_pairs
from preftune.reward.gate import GateVerdict, evaluate_gate, read_fit_report
from preftune.reward.metrics import (
    CalibrationBucket,
    LengthBias,
    accuracy_by_family,
    calibration_columns,
    calibration_table,
    expected_calibration_error,
    finite_or_none,
    length_bias,
    pairwise_accuracy,
    pairwise_outcomes,
    plot_calibration,
)
from preftune.scoring.metadata import METADATA_FILE, RewardModelMeta

log = logging.getLogger(__name__)

STEP = "train-reward"
VALIDATION_FRACTION = 0.1  # share of training prompts held out for early stopping
SWAP_TOLERANCE = 0.02  # |swap accuracy - (1 - accuracy)| above this means order-dependent scoring: a bug
EVAL_REPORT_FILE = "eval_report.json"


@dataclass
class RewardEvaluation:
    """Everything measured on the held-out pairs."""

    n_pairs: int
    loss: float
    accuracy: float
    per_family: dict[str, float]
    reward_mean: float
    reward_std: float
    calibration: list[CalibrationBucket]
    ece: float
    length: LengthBias
    swap_accuracy: float
    outcomes: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per held-out pair: 1 / 0 / 0.5 (tie)

    @property
    def swap_error(self) -> float:
        return abs(self.swap_accuracy - (1.0 - self.accuracy))

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_pairs": self.n_pairs,
            "loss": finite_or_none(self.loss),
            "accuracy": self.accuracy,
            "per_family": self.per_family,
            "reward_mean": self.reward_mean,
            "reward_std": self.reward_std,
            "calibration": [asdict(b) for b in self.calibration],
            "calibration_ece": finite_or_none(self.ece),
            "length_bias": {k: finite_or_none(v) for k, v in asdict(self.length).items()},
            "swap_accuracy": self.swap_accuracy,
            "swap_error": self.swap_error,
        }


@dataclass
class RewardResult:
    """What :func:`train_reward` returns (the gate passed and the folder is published)."""

    output: str
    metadata: RewardModelMeta
    evaluation: RewardEvaluation
    gate: GateVerdict | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    model_uri: str | None = None  # MLflow model URI of the logged pyfunc

    @property
    def eval_accuracy(self) -> float:
        return self.metadata.eval_accuracy

    @property
    def per_family(self) -> dict[str, float]:
        return self.metadata.per_family


def metric_key(name: str) -> str:
    """A family name made safe for an MLflow metric key."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name) or "_"


def resolve_reward_base(ref: str, cfg: RunConfig, storage: Any) -> Path:
    """A local folder for ``models.reward_base`` (demo:, models:/name@alias, s3://, a folder, a cached HF id)."""
    from preftune.models import resolve_model_ref

    return resolve_model_ref(ref, cfg, storage, setting="models.reward_base")


def evaluate_held_out(trainer: Any, data: TokenizedPairs, eval_pairs: list[Any]) -> RewardEvaluation:
    """Held-out figures (the answer to "is the reward model good enough?")."""
    res = trainer.evaluate(data)
    chosen, rejected = res.chosen, res.rejected
    # reward statistics over distinct held-out responses (a best-of-N pick appears in several pairs)
    seen: dict[tuple[str, str], float] = {}
    for p, c, r in zip(eval_pairs, chosen, rejected, strict=True):
        seen.setdefault((p.prompt, p.chosen), float(c))
        seen.setdefault((p.prompt, p.rejected), float(r))
    values = np.array(list(seen.values()), dtype=np.float64)
    from preftune.scoring.model import finite_std

    table = calibration_table(chosen, rejected)
    swap_c, swap_r = trainer.predict(data.swapped())
    return RewardEvaluation(
        n_pairs=len(data),
        loss=res.loss,
        accuracy=res.accuracy,
        per_family=accuracy_by_family(chosen, rejected, data.families),
        reward_mean=float(values.mean()),
        reward_std=finite_std(values),
        calibration=table,
        ece=expected_calibration_error(table),
        length=length_bias(chosen, rejected, *data.response_chars),
        swap_accuracy=pairwise_accuracy(swap_c, swap_r),
        outcomes=pairwise_outcomes(chosen, rejected),
    )


def final_metrics(ev: RewardEvaluation) -> dict[str, float]:
    m: dict[str, float] = {
        "reward.eval_accuracy": ev.accuracy,
        "reward.eval_loss": ev.loss,
        "reward.reward_mean": ev.reward_mean,
        "reward.reward_std": ev.reward_std,
        "reward.calibration_ece": ev.ece,
        "reward.length.spearman": ev.length.spearman,
        "reward.length.accuracy_chosen_longer": ev.length.accuracy_chosen_longer,
        "reward.length.accuracy_chosen_shorter": ev.length.accuracy_chosen_shorter,
        "reward.swap_accuracy": ev.swap_accuracy,
        "reward.swap_error": ev.swap_error,
    }
    for fam, acc in ev.per_family.items():
        m[f"reward.eval_accuracy.{metric_key(fam)}"] = acc
    return {k: float(v) for k, v in m.items() if v is not None and np.isfinite(v)}


def gate_message(ev: RewardEvaluation, verdict: GateVerdict) -> str:
    fams = ", ".join(f"{f} {a:.3f}" for f, a in ev.per_family.items())
    return (
        f"{verdict.reason} (per family: {fams}); no reward model was published. More or cleaner preference data, "
        "more epochs, or a larger reward base may help; reward.gate in the run config sets the checks."
    )


def train_reward(
    cfg: RunConfig,
    dataset_dir: str | Path,
    output: str | Path,
    *,
    pipeline_run_id: str | None = None,
    progress: bool = True,
    device: str | None = None,
) -> RewardResult:
    """Train, evaluate, gate and publish a pairwise reward model.

    ``dataset_dir``: a preference dataset folder (local path or ``s3://``), as collect writes it.
    ``output``: where the reward-model folder is published (local path or ``s3://``); it is
    written only when the gate passes, atomically. Raises :class:`PreftuneError` with
    ``ExitCode.REWARD_GATE`` when a check of the calibrated gate fails (``reward.gate.enabled``).
    """
    import mlflow
    import torch
    from transformers import set_seed

    from preftune import tracking
    from preftune.common.device import select_device
    from preftune.reward.mlflow_model import log_reward_model
    from preftune.reward.trainer import DivergedError, PairwiseRewardTrainer
    from preftune.scoring.model import load_tokenizer, save_reward_model
    from preftune.storage import Storage

    rc = cfg.reward
    storage = Storage.from_config(cfg.storage)
    output = str(output)
    dataset_root = storage.local_path(str(dataset_dir))
    dataset: PreferenceDataset = viewed(load_dataset(dataset_root), rc.text_view)
    base_path = resolve_reward_base(cfg.models.reward_base, cfg, storage)
    dev = select_device(device)

    set_seed(cfg.run.seed)
    tokenizer = load_tokenizer(base_path)
    model = new_reward_model(base_path, tokenizer, dev, rc)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())

    train_pairs, val_pairs = split_by_prompt(dataset.train, VALIDATION_FRACTION, cfg.run.seed)
    train_tok = tokenize_pairs(train_pairs, tokenizer, rc.max_length)
    val_tok = tokenize_pairs(val_pairs, tokenizer, rc.max_length) if val_pairs else None
    eval_tok = tokenize_pairs(dataset.eval, tokenizer, rc.max_length)
    truncated = train_tok.truncated + (val_tok.truncated if val_tok else 0) + eval_tok.truncated
    if truncated:
        log.warning(
            "%d pairs were longer than reward.max_length=%d tokens and were left-truncated", truncated, rc.max_length
        )

    params = {
        "reward.dataset_hash": dataset.hash,
        "reward.dataset": str(dataset_dir),
        "reward.base_path": str(base_path),
        "reward.device": str(dev),
        "reward.train_pairs": len(train_pairs),
        "reward.val_pairs": len(val_pairs),
        "reward.eval_pairs": len(dataset.eval),
        "reward.trainable_params": n_trainable,
        "reward.pooling": rc.pooling,
        "reward.text_view": rc.text_view,
        "reward.total_params": n_total,
    }
    with tracking.start_step_run(STEP, cfg, pipeline_run_id=pipeline_run_id, params=params) as run:
        _log_dataset_input(dataset, str(dataset_dir))

        def on_metrics(metrics: dict[str, float], step: int) -> None:
            mlflow.log_metrics(metrics, step=step)

        trainer = PairwiseRewardTrainer(
            model,
            tokenizer.pad_token_id,
            rc,
            dev,
            seed=cfg.run.seed,
            on_metrics=on_metrics,
            progress=progress,
        )
        try:
            fit = trainer.fit(train_tok, val_tok)
        except DivergedError as err:
            raise PreftuneError(
                f"{err}; lower reward.lr (now {rc.lr}) or raise reward.warmup_ratio", ExitCode.TRAINING_DIVERGED
            ) from None
        ev = evaluate_held_out(trainer, eval_tok, dataset.eval)
        crossfit = None
        if rc.gate.cross_fit_folds >= 2:
            crossfit = cross_fit_gate_evidence(cfg, dataset, base_path, tokenizer, dev, progress=progress)
            mlflow.log_metrics(crossfit.metrics())
        verdict = evaluate_gate(
            accuracy_per_pair=ev.outcomes if crossfit is None else crossfit.credit,
            train_pairs=dataset.train,
            eval_pairs=dataset.eval if crossfit is None else crossfit.pairs,
            gate=rc.gate,
            min_accuracy=rc.min_accuracy,
            fit_report=read_fit_report(dataset_root),
            seed=cfg.run.seed,
            baseline_credit=None if crossfit is None else crossfit.baselines,
            cross_fit_folds=None if crossfit is None else crossfit.k,
        )
        (log.info if verdict.passed else log.warning)("%s", verdict.reason)

        metrics = final_metrics(ev)
        metrics.update(verdict.metrics())
        metrics.update(
            {
                "reward.train_pairs_per_s": fit.pairs_per_second,
                "reward.train_seconds": fit.seconds,
                "reward.optimizer_steps": float(fit.optimizer_steps),
                "reward.truncated_pairs": float(truncated),
            }
        )
        if fit.best_step is not None:
            metrics["reward.best_step"] = float(fit.best_step)
        gate_ok = verdict.passed or not verdict.enforced
        mlflow.log_metrics(metrics)
        mlflow.set_tags(
            {
                "preftune.reward.gate": "passed" if verdict.passed else ("failed" if verdict.enforced else "ignored"),
                "preftune.reward.gate_reason": verdict.reason[:5000],
                "preftune.reward.stopped_early": str(fit.stopped_early).lower(),
                "preftune.dataset_hash": dataset.hash,
            }
        )
        if ev.swap_error > SWAP_TOLERANCE:
            log.warning(
                "swap check: accuracy with chosen/rejected swapped is %.3f, expected %.3f: scoring depends on "
                "batch position (a padding or batching bug)",
                ev.swap_accuracy,
                1 - ev.accuracy,
            )
            mlflow.set_tag("preftune.reward.swap_check", "failed")

        with tempfile.TemporaryDirectory(prefix="preftune-reward-") as tmp:
            tmp_path = Path(tmp)
            report = {
                "step": STEP,
                "dataset_hash": dataset.hash,
                "gate": verdict.to_dict(),
                "eval": ev.to_dict(),
                "cross_fit": None
                if crossfit is None
                else {
                    "folds": crossfit.k,
                    "pairs": len(crossfit.pairs),
                    "accuracy": float(crossfit.credit.mean()),
                    "baselines": {k: float(x.mean()) for k, x in crossfit.baselines.items()},
                    "fold_accuracy": crossfit.fold_accuracy,
                    "seconds": crossfit.seconds,
                },
                "training": {
                    "optimizer_steps": fit.optimizer_steps,
                    "pairs_seen": fit.pairs_seen,
                    "seconds": fit.seconds,
                    "best_step": fit.best_step,
                    "best_val_loss": fit.best_val_loss,
                    "stopped_early": fit.stopped_early,
                    "train_pairs": len(train_pairs),
                    "val_pairs": len(val_pairs),
                    "truncated_pairs": truncated,
                },
            }
            mlflow.log_dict(report, f"reward/{EVAL_REPORT_FILE}")
            mlflow.log_table(calibration_columns(ev.calibration), "reward/calibration.json")
            plot_calibration(ev.calibration, tmp_path / "calibration.png")
            mlflow.log_artifact(str(tmp_path / "calibration.png"), "reward")

            if not gate_ok:
                raise PreftuneError(gate_message(ev, verdict), ExitCode.REWARD_GATE)

            folder = tmp_path / "reward_model"
            adapter = save_reward_model(trainer.model, tokenizer, folder)
            meta = RewardModelMeta(
                base=cfg.models.reward_base,
                dataset_hash=dataset.hash,
                eval_accuracy=ev.accuracy,
                per_family=ev.per_family,
                reward_mean=ev.reward_mean,
                reward_std=ev.reward_std,
                config_hash=cfg.config_hash(),
                max_length=rc.max_length,
                mode=rc.mode,
                adapter=adapter,
                pooling=rc.pooling,
                text_view=rc.text_view,
                created_at=utc_now(),
            )
            (folder / METADATA_FILE).write_text(meta.to_json(), encoding="utf-8")
            (folder / EVAL_REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            mlflow.log_dict(meta.model_dump(mode="json"), f"reward/{METADATA_FILE}")
            del model, trainer
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            logged = log_reward_model(folder)
            # published last: any failure above leaves no folder at ``output``
            storage.put_dir(folder, output)
            mlflow.set_tag("preftune.reward.output", output)
            run_id = run.info.run_id

    return RewardResult(
        output=output,
        metadata=meta,
        evaluation=ev,
        gate=verdict,
        metrics=metrics,
        mlflow_run_id=run_id,
        model_uri=getattr(logged, "model_uri", None),
    )


def viewed(dataset: PreferenceDataset, text_view: str) -> PreferenceDataset:
    """The dataset with every prompt in ``reward.text_view`` (:func:`preftune.scoring.text_view.view_pairs`).

    Applied once, right after reading: training, early stopping, the held-out figures, the gate's
    baselines and cross-fitting all see the pairs as the published model's scorer will.
    """
    from preftune.scoring.text_view import view_pairs

    if text_view == "full":
        return dataset
    return replace(dataset, train=view_pairs(dataset.train, text_view), eval=view_pairs(dataset.eval, text_view))


def new_reward_model(base_path: Path, tokenizer: Any, dev: Any, rc: Any) -> Any:
    """A fresh one-output sequence classifier from ``base_path``, set up as ``reward`` (``rc``) says."""
    from preftune.reward.trainer import disable_dropout
    from preftune.scoring.model import add_lora, check_pooling, enable_gradient_checkpointing, load_sequence_classifier

    model = load_sequence_classifier(base_path, tokenizer, dev)
    if rc.disable_dropout:
        disable_dropout(model)
    if rc.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if rc.mode == "lora":
        model = add_lora(model, rc.lora_r, rc.lora_alpha, rc.lora_dropout)
    check_pooling(model, rc.pooling)
    return model


def cross_fit_gate_evidence(
    cfg: RunConfig, dataset: PreferenceDataset, base_path: Path, tokenizer: Any, dev: Any, *, progress: bool
) -> CrossFit:
    """``reward.gate.cross_fit_folds`` reward models, each trained on the other folds, scoring every pair once.

    Each fold's model is trained exactly as the published one (same settings, early stopping on
    a validation split carved from its own training prompts) and then discarded.
    """
    from transformers import set_seed

    from preftune.reward.trainer import DivergedError, PairwiseRewardTrainer

    rc = cfg.reward

    def fit_and_score(train: list[Any], test: list[Any], fold: int) -> np.ndarray:
        set_seed(cfg.run.seed)
        model = new_reward_model(base_path, tokenizer, dev, rc)
        fit_pairs, val_pairs = split_by_prompt(train, VALIDATION_FRACTION, cfg.run.seed)
        trainer = PairwiseRewardTrainer(model, tokenizer.pad_token_id, rc, dev, seed=cfg.run.seed, progress=False)
        try:
            trainer.fit(
                tokenize_pairs(fit_pairs, tokenizer, rc.max_length),
                tokenize_pairs(val_pairs, tokenizer, rc.max_length) if val_pairs else None,
            )
        except DivergedError as err:
            raise PreftuneError(
                f"cross-fit fold {fold}: {err}; lower reward.lr (now {rc.lr}) or raise reward.warmup_ratio",
                ExitCode.TRAINING_DIVERGED,
            ) from None
        res = trainer.evaluate(tokenize_pairs(test, tokenizer, rc.max_length))
        log.info("cross-fit fold %d: accuracy %.3f on %d pairs", fold, res.accuracy, len(test))
        return pairwise_outcomes(res.chosen, res.rejected)

    return cross_fit(
        dataset.train + dataset.eval,
        rc.gate.cross_fit_folds,
        fit_and_score,
        baselines=rc.gate.baselines,
        seed=cfg.run.seed,
        progress=progress,
    )


def _log_dataset_input(dataset: PreferenceDataset, uri: str) -> None:
    """Record the dataset (by content hash) as the run's input: lineage in the MLflow UI."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    source_uri = uri if "://" in uri else Path(uri).resolve().as_uri()
    try:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local-file source
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(source_uri)
    except mlflow.exceptions.MlflowException:  # no source type for this scheme: the dataset_hash tag remains
        log.debug("no MLflow dataset source for %s", source_uri)
        return
    name = f"preferences-{dataset.hash[:12]}" if dataset.hash else "preferences"
    mlflow.log_input(MetaDataset(source=source, name=name, digest=dataset.hash[:32] or None), context="training")
