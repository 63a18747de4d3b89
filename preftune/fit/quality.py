"""Data-quality figures that need no second rating: what check-fit can say about single-rated data.

Agreement needs repeated ratings; these figures need only the pairs, so every dataset gets them:

- **length bias**: the share of pairs whose chosen answer is longer (characters; ties apart) and
  the held-out accuracy of a length-only rule whose direction (longer or shorter wins) is fitted on
  the training pairs (:func:`preftune.scoring.baselines.length_rule_accuracy`, the same baseline the
  reward gate compares with). A reward model that only learns "longer wins"
  scores that much without learning the behaviour.
- **bag-of-words baseline**: the held-out accuracy of a linear model on word counts
  (:func:`preftune.scoring.baselines.bag_of_words_accuracy`), the other trivial baseline.
- **leakage**: held-out prompts with an exact (case, punctuation and whitespace ignored) or near
  duplicate among the training prompts (cosine similarity of character 3-5-gram TF-IDF vectors
  at least ``fit.quality.near_duplicate_similarity``). The split is by exact prompt text, so
  near-duplicates are what slips through.
- **identical pairs**: pairs whose chosen and rejected texts are the same once whitespace and
  case are ignored (the importer already drops byte-identical ones and counts them).
- **margins**: the distribution of the pairs' ``margin`` where the source scored its answers.
- **label noise**: the share of pairs that a cross-fitted cheap model confidently contradicts.
  Pairs are split into ``fit.quality.noise_folds`` folds by prompt; a linear Bradley-Terry model
  (L2 logistic regression on the difference of the two answers' hashed word-count vectors, the
  bag-of-words baseline's features) is trained on the other folds and scores each pair of the
  fold; the out-of-fold scores' scale is calibrated (Platt scaling, one parameter); a pair is
  contradicted when the model gives its *rejected* answer a probability of being the better one
  of at least ``fit.quality.noise_confidence``. Every pair is predicted by a model that never saw
  its prompt. A cheap model misses much, so this is a lower bound of the labels a reward model
  will fight, and the same figure on two datasets compares them.

Each figure with a threshold in ``fit.quality`` is a *check*; a breached check warns, or stops
the run (``fit.quality.on_breach: stop``, exit 10). Large datasets use a seeded sample of
``fit.quality.max_pairs`` pairs (the report says so).
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from preftune.data.records import prompt_key

if TYPE_CHECKING:  # pragma: no cover
    from preftune.fit.config import QualitySection

Record = Mapping[str, Any]
MAX_EXAMPLES = 5


def _norm_ws(text: str) -> str:
    return " ".join(text.split())


_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def _norm_strict(text: str) -> str:
    """Case, punctuation and whitespace ignored: the 'exact duplicate' identity."""
    return _NON_WORD.sub(" ", text.lower()).strip()


@dataclass
class Check:
    name: str
    value: float | None
    threshold: float
    breached: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class QualityFigures:
    n_pairs: int
    n_train: int
    n_eval: int
    sampled: bool
    length: dict[str, Any]
    baselines: dict[str, Any]
    leakage: dict[str, Any]
    identical: dict[str, Any]
    margin: dict[str, Any] | None
    label_noise: dict[str, Any]
    per_family: dict[str, dict[str, Any]] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    on_breach: str = "warn"
    notes: list[str] = field(default_factory=list)

    @property
    def breaches(self) -> list[Check]:
        return [c for c in self.checks if c.breached]

    @property
    def stop(self) -> bool:
        return self.on_breach == "stop" and bool(self.breaches)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checks"] = [c.to_dict() for c in self.checks]
        d["breaches"] = [c.name for c in self.breaches]
        return d

    def metrics(self, prefix: str = "fit.quality") -> dict[str, float]:
        return metrics_from_dict(self.to_dict(), prefix)


def metrics_from_dict(d: Mapping[str, Any], prefix: str = "fit.quality") -> dict[str, float]:
    """Flat, finite figures for MLflow (names are stable) from :meth:`QualityFigures.to_dict`."""
    length, base, leak = d.get("length") or {}, d.get("baselines") or {}, d.get("leakage") or {}
    ident, noise, margin = d.get("identical") or {}, d.get("label_noise") or {}, d.get("margin") or {}
    out: dict[str, Any] = {
        f"{prefix}.pairs": d.get("n_pairs"),
        f"{prefix}.length.chosen_longer_share": length.get("chosen_longer_share"),
        f"{prefix}.length.rule_accuracy": length.get("rule_accuracy"),
        f"{prefix}.bow.accuracy": base.get("bag_of_words_accuracy"),
        f"{prefix}.leakage.exact_prompts": leak.get("exact"),
        f"{prefix}.leakage.near_prompts": leak.get("near"),
        f"{prefix}.leakage.share": leak.get("share"),
        f"{prefix}.identical.pairs": ident.get("pairs"),
        f"{prefix}.identical.share": ident.get("share"),
        f"{prefix}.label_noise.share": noise.get("share"),
        f"{prefix}.label_noise.confident_share": noise.get("confident_share"),
        f"{prefix}.breaches": len(d.get("breaches") or []),
    }
    for key in ("mean", "p10", "p50", "p90", "zero_share"):
        out[f"{prefix}.margin.{key}"] = margin.get(key)
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


# --------------------------------------------------------------------------------------------- figures


def _length_figures(pairs: Sequence[Record]) -> dict[str, Any]:
    n = len(pairs)
    longer = sum(len(p["chosen"]) > len(p["rejected"]) for p in pairs)
    shorter = sum(len(p["chosen"]) < len(p["rejected"]) for p in pairs)
    ratios = [math.log((len(p["chosen"]) + 1) / (len(p["rejected"]) + 1)) for p in pairs]
    return {
        "unit": "characters",
        "chosen_longer_share": longer / n if n else None,
        "chosen_shorter_share": shorter / n if n else None,
        "tie_share": (n - longer - shorter) / n if n else None,
        "median_log_length_ratio": float(np.median(ratios)) if ratios else None,
    }


def _margin_figures(pairs: Sequence[Record]) -> dict[str, Any] | None:
    margins = np.array([float(p["margin"]) for p in pairs if p.get("margin") is not None], dtype=float)
    if margins.size == 0:
        return None
    q = np.quantile(margins, [0.1, 0.5, 0.9])
    return {
        "n": int(margins.size),
        "share_of_pairs": margins.size / len(pairs),
        "mean": float(margins.mean()),
        "std": float(margins.std()),
        "min": float(margins.min()),
        "p10": float(q[0]),
        "p50": float(q[1]),
        "p90": float(q[2]),
        "max": float(margins.max()),
        "zero_share": float(np.mean(np.abs(margins) < 1e-12)),
        "histogram": _histogram(margins),
    }


def _histogram(values: np.ndarray, bins: int = 10) -> dict[str, list[float]]:
    counts, edges = np.histogram(values, bins=bins)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _identical(pairs: Sequence[Record], validation: Mapping[str, Any] | None) -> dict[str, Any]:
    same = [p for p in pairs if _norm_strict(p["chosen"]) == _norm_strict(p["rejected"])]
    dropped = int(((validation or {}).get("dropped") or {}).get("identical_chosen_rejected", 0))
    return {
        "pairs": len(same),
        "share": len(same) / len(pairs) if pairs else None,
        "dropped_at_import": dropped,
        "examples": [_snippet(p["chosen"]) for p in same[:MAX_EXAMPLES]],
    }


def _snippet(text: str, n: int = 80) -> str:
    t = _norm_ws(text)
    return t if len(t) <= n else t[: n - 1] + "…"


def char_tfidf(texts: Sequence[str], sizes: tuple[int, ...] = (3, 4, 5)):  # -> scipy.sparse.csr_matrix
    """L2-normalised TF-IDF vectors of each text's character n-grams (lower case, whitespace collapsed):
    ``log1p(count)`` times the smoothed IDF ``log((1 + n) / (1 + df)) + 1``, one row per text."""
    from scipy import sparse

    vocab: dict[str, int] = {}
    indptr, indices, data = [0], [], []
    for text in texts:
        t = f" {' '.join(text.lower().split())} "
        counts: dict[int, int] = {}
        for n in sizes:
            for i in range(len(t) - n + 1):
                k = vocab.setdefault(t[i : i + n], len(vocab))
                counts[k] = counts.get(k, 0) + 1
        indices.extend(counts)
        data.extend(counts.values())
        indptr.append(len(indices))
    m = sparse.csr_matrix(
        (np.log1p(np.asarray(data, dtype=np.float64)), np.asarray(indices, dtype=np.int64), np.asarray(indptr)),
        shape=(len(texts), max(1, len(vocab))),
    )
    df = np.bincount(m.indices, minlength=m.shape[1])
    m = m @ sparse.diags(np.log((1.0 + len(texts)) / (1.0 + df)) + 1.0)
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    return sparse.diags(1.0 / norms) @ m


def leakage(
    train_prompts: Sequence[str], eval_prompts: Sequence[str], similarity: float, chunk: int = 512
) -> dict[str, Any]:
    """Held-out prompts with an exact or near duplicate among the training prompts."""
    train_u = list(dict.fromkeys(train_prompts))
    eval_u = list(dict.fromkeys(eval_prompts))
    out: dict[str, Any] = {
        "eval_prompts": len(eval_u),
        "exact": 0,
        "near": 0,
        "share": None,
        "similarity": similarity,
        "examples": [],
    }
    if not train_u or not eval_u:
        return out
    train_strict = {_norm_strict(t) for t in train_u}
    exact = [e for e in eval_u if _norm_strict(e) in train_strict]
    rest = [e for e in eval_u if _norm_strict(e) not in train_strict]
    examples = [{"eval": _snippet(e), "train": _snippet(e), "similarity": 1.0, "kind": "exact"} for e in exact]
    near = 0
    if rest:
        vectors = char_tfidf(train_u + rest)
        t_mat = vectors[: len(train_u)].T.tocsr()
        e_mat = vectors[len(train_u) :]
        for start in range(0, len(rest), chunk):
            sims = (e_mat[start : start + chunk] @ t_mat).toarray()
            best = sims.argmax(axis=1)
            for i, j in enumerate(best):
                s = float(sims[i, j])
                if s >= similarity:
                    near += 1
                    examples.append(
                        {
                            "eval": _snippet(rest[start + i]),
                            "train": _snippet(train_u[j]),
                            "similarity": s,
                            "kind": "near",
                        }
                    )
    out.update(
        exact=len(exact),
        near=near,
        share=(len(exact) + near) / len(eval_u),
        examples=examples[:MAX_EXAMPLES],
    )
    return out


def _prompt_folds(pairs: Sequence[Record], folds: int, seed: int) -> list[int]:
    keys = sorted({prompt_key(p["prompt"]) for p in pairs})
    rng = random.Random(f"quality-folds:{seed}")
    rng.shuffle(keys)
    fold_of = {k: i % folds for i, k in enumerate(keys)}
    return [fold_of[prompt_key(p["prompt"])] for p in pairs]


def _fit_bt(diffs, c: float = 1.0) -> np.ndarray:
    """A linear Bradley-Terry model (L2 logistic regression on chosen-minus-rejected, no intercept)."""
    from scipy import optimize

    diffs_t = diffs.T.tocsr()

    def loss_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = diffs @ w
        return float(np.logaddexp(0.0, -z).sum() + 0.5 * (w @ w) / c), -(diffs_t @ (1.0 / (1.0 + np.exp(z)))) + w / c

    return optimize.minimize(loss_grad, np.zeros(diffs.shape[1]), jac=True, method="L-BFGS-B").x


def label_noise(pairs: Sequence[Record], *, folds: int, confidence: float, seed: int) -> dict[str, Any]:
    """The share of pairs a cross-fitted bag-of-words model confidently contradicts (module docstring).

    Features: :func:`preftune.scoring.baselines.bow_features` (the bag-of-words baseline's hashed
    word unigrams and bigrams); the model: :func:`_fit_bt` on the other folds' pairs.
    """
    from preftune.scoring.baselines import bow_features

    n = len(pairs)
    n_prompts = len({prompt_key(p["prompt"]) for p in pairs})
    out: dict[str, Any] = {"folds": folds, "confidence": confidence, "pairs": n, "share": None}
    if n_prompts < folds or n < 2 * folds:
        out["note"] = f"too few prompts ({n_prompts}) for {folds} folds"
        return out
    fold = np.array(_prompt_folds(pairs, folds, seed))
    diffs = (bow_features([p["chosen"] for p in pairs]) - bow_features([p["rejected"] for p in pairs])).tocsr()
    z = np.full(n, np.nan)
    for k in range(folds):
        train_idx, test_idx = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        if not len(test_idx) or not len(train_idx):
            continue
        train = diffs[train_idx]
        used = np.unique(train.indices)
        if not used.size:
            continue
        z[test_idx] = diffs[test_idx][:, used] @ _fit_bt(train[:, used])
    done = ~np.isnan(z)
    if not done.any():
        out["note"] = "no fold had a vocabulary to learn from"
        return out
    # calibrate the scores' scale on the out-of-fold scores (one parameter, Platt scaling without
    # intercept): "confident" then means what it says, whatever the regularisation
    from scipy.optimize import minimize_scalar

    zd = z[done]
    scale = minimize_scalar(lambda a: float(np.logaddexp(0.0, -a * zd).sum()), bounds=(0.0, 100.0), method="bounded").x
    p = 1.0 / (1.0 + np.exp(-scale * zd))
    contradicted = p <= 1.0 - confidence
    supported = p >= confidence
    out.update(
        pairs=int(done.sum()),
        share=float(contradicted.mean()),
        contradicted=int(contradicted.sum()),
        confident_share=float((contradicted | supported).mean()),
        cross_fitted_accuracy=float(np.mean(p > 0.5) + 0.5 * np.mean(p == 0.5)),
        calibration_scale=float(scale),
    )
    return out


def _baselines(train: Sequence[Record], eval_: Sequence[Record], seed: int) -> tuple[dict[str, Any], list[str]]:
    """The reward gate's trivial baselines (:mod:`preftune.scoring.baselines`) on this split."""
    from preftune.scoring.baselines import bag_of_words_accuracy, length_rule_accuracy, length_rule_direction

    notes = []
    out: dict[str, Any] = {
        "length_rule_accuracy": None,
        "length_rule": "longer wins" if not train or length_rule_direction(list(train)) > 0 else "shorter wins",
        "bag_of_words_accuracy": None,
    }
    if eval_:
        # the rule's direction (longer or shorter wins) is fitted on the training pairs, as the gate's
        out["length_rule_accuracy"] = float(length_rule_accuracy(list(eval_), list(train) or None))
        if train:
            out["bag_of_words_accuracy"] = float(bag_of_words_accuracy(list(train), list(eval_), seed=seed))
    else:
        notes.append("no held-out pairs: the baselines' held-out accuracies are not measured")
    return out, notes


# --------------------------------------------------------------------------------------------- entry point


def _sample(train: Sequence[Record], eval_: Sequence[Record], max_pairs: int, seed: int):
    n = len(train) + len(eval_)
    if n <= max_pairs:
        return list(train), list(eval_), False
    rng = random.Random(f"quality-sample:{seed}")
    n_eval = max(1, round(max_pairs * len(eval_) / n)) if eval_ else 0
    return rng.sample(list(train), max_pairs - n_eval), rng.sample(list(eval_), n_eval), True


def quality_figures(
    train: Sequence[Record],
    eval_: Sequence[Record],
    section: QualitySection,
    *,
    validation: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> QualityFigures:
    """Every figure of the module docstring on a dataset's train and held-out pairs, with the checks."""
    train, eval_, sampled = _sample(train, eval_, section.max_pairs, seed)
    pairs = list(train) + list(eval_)
    length = _length_figures(pairs)
    baselines, notes = _baselines(train, eval_, seed)
    length["rule_accuracy"] = baselines["length_rule_accuracy"]
    length["rule"] = baselines["length_rule"]
    figures = QualityFigures(
        n_pairs=len(pairs),
        n_train=len(train),
        n_eval=len(eval_),
        sampled=sampled,
        length=length,
        baselines=baselines,
        leakage=leakage([p["prompt"] for p in train], [p["prompt"] for p in eval_], section.near_duplicate_similarity),
        identical=_identical(pairs, validation),
        margin=_margin_figures(pairs),
        label_noise=label_noise(pairs, folds=section.noise_folds, confidence=section.noise_confidence, seed=seed),
        on_breach=section.on_breach,
        notes=notes + ([f"figures on a seeded sample of {len(pairs)} pairs"] if sampled else []),
    )
    by_family: dict[str, list[Record]] = defaultdict(list)
    for p in pairs:
        by_family[str(p.get("family") or "default")].append(p)
    figures.per_family = {
        fam: {
            "pairs": len(ps),
            "chosen_longer_share": _length_figures(ps)["chosen_longer_share"],
            "identical": sum(_norm_strict(p["chosen"]) == _norm_strict(p["rejected"]) for p in ps),
        }
        for fam, ps in sorted(by_family.items())
    }
    figures.checks = _checks(figures, section)
    return figures


def _checks(f: QualityFigures, s: QualitySection) -> list[Check]:
    checks = []

    def add(name: str, value: float | None, threshold: float | None, what: str) -> None:
        if threshold is None or value is None:
            return
        breached = value > threshold
        checks.append(Check(name, value, threshold, breached, f"{what}: {value:.3f} (limit {threshold:.3f})"))

    add(
        "length_rule_accuracy",
        f.length.get("rule_accuracy"),
        s.max_length_rule_accuracy,
        "a length-only rule's held-out accuracy (the labels may mostly reward length)",
    )
    add(
        "leakage",
        f.leakage.get("share"),
        s.max_leakage,
        "share of held-out prompts with an exact or near duplicate in train (held-out figures are inflated)",
    )
    add(
        "identical",
        f.identical.get("share"),
        s.max_identical_share,
        "share of pairs whose chosen and rejected texts are the same",
    )
    add(
        "label_noise",
        f.label_noise.get("share"),
        s.max_label_noise,
        "share of pairs a cross-fitted bag-of-words model confidently contradicts",
    )
    return checks


def _f(v: Any, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def quality_markdown(d: Mapping[str, Any]) -> list[str]:
    """The report's data-quality section from :meth:`QualityFigures.to_dict`."""
    length, base, leak = d.get("length") or {}, d.get("baselines") or {}, d.get("leakage") or {}
    ident, noise, margin = d.get("identical") or {}, d.get("label_noise") or {}, d.get("margin")
    lines = [
        "## Data quality (no second rating needed)",
        "",
        f"On {d.get('n_pairs')} pairs ({d.get('n_train')} train, {d.get('n_eval')} held out)"
        + (" -- a seeded sample" if d.get("sampled") else "")
        + ".",
        "",
        "| figure | value | meaning |",
        "|---|---:|---|",
        f"| chosen answer longer | {_f(length.get('chosen_longer_share'), '.1%')} | share of pairs (characters; "
        f"shorter {_f(length.get('chosen_shorter_share'), '.1%')}, ties {_f(length.get('tie_share'), '.1%')}) |",
        f"| length-rule accuracy | {_f(base.get('length_rule_accuracy'))} | held-out accuracy of "
        f"'{base.get('length_rule')}' (the direction fitted on the train pairs; a trivial baseline) |",
        f"| bag-of-words accuracy | {_f(base.get('bag_of_words_accuracy'))} | held-out accuracy of a linear model "
        "on word counts trained on the train pairs (a trivial baseline) |",
        f"| leaked held-out prompts | {leak.get('exact', 0)} exact + {leak.get('near', 0)} near of "
        f"{leak.get('eval_prompts', 0)} ({_f(leak.get('share'), '.1%')}) | duplicate in train (near: similarity "
        f">= {leak.get('similarity')}) |",
        f"| identical chosen/rejected | {ident.get('pairs', 0)} ({_f(ident.get('share'), '.1%')}) | whitespace and "
        f"case ignored; {ident.get('dropped_at_import', 0)} exact ones dropped at import |",
        f"| label noise (estimate) | {_f(noise.get('share'), '.1%')} | pairs a cross-fitted bag-of-words model "
        f"contradicts with p >= {noise.get('confidence')} ({noise.get('folds')} folds by prompt; its own accuracy "
        f"{_f(noise.get('cross_fitted_accuracy'))}; confident on {_f(noise.get('confident_share'), '.1%')}) |",
    ]
    if margin:
        lines.append(
            f"| margins | n={margin['n']}, mean {margin['mean']:.3g}, p10/p50/p90 {margin['p10']:.3g}/"
            f"{margin['p50']:.3g}/{margin['p90']:.3g}, zero {margin['zero_share']:.1%} | score difference where the "
            "source scored its answers |"
        )
    else:
        lines.append("| margins | none | the source gave choices without scores |")
    checks = d.get("checks") or []
    if checks:
        lines += ["", "Checks (`fit.quality`, on breach: " + str(d.get("on_breach")) + "):", ""]
        for c in checks:
            mark = "**breached**" if c["breached"] else "ok"
            lines.append(f"- {c['name']}: {mark}: {c['message']}")
    examples = leak.get("examples") or []
    if examples:
        lines += ["", "Leaked prompts (examples):", ""]
        for e in examples:
            lines.append(f"- {e['kind']} ({e['similarity']:.2f}): held out `{e['eval']}` ~ train `{e['train']}`")
    for note in d.get("notes") or []:
        lines.append(f"- note: {note}")
    return lines
