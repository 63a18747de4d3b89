"""Judges: name the behaviour of a response, or say ``"unknown"``.

Why pluggable: what counts as "explains the risk, then declines" is domain knowledge. Some teams
can write it as patterns, some have a classifier, some trust their reward model's score. Every
judge has one job: for each (family, prompt, response), return a behaviour name or
``"unknown"``. ``"unknown"`` is a result like any other: it is counted in ``unknown_share`` and
can be gated (a model that starts writing gibberish raises it); it is never dropped.

Model-backed judges are loaded (and their label sets checked against the suite) by
:func:`load_judges`, before any generation, so a wrong model fails fast.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from preftune.errors import ConfigError, PreftuneError
from preftune.evaluate.suite import (
    ClassifierJudgeSpec,
    DemoJudgeSpec,
    RewardJudgeSpec,
    RulesJudgeSpec,
    Suite,
    resolve_judge_path,
)

UNKNOWN = "unknown"


class Judge(Protocol):
    name: str

    def judge(self, family: str, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        """One behaviour name (or ``"unknown"``) per response."""


class _CompiledRule:
    def __init__(self, spec: Any, flags: int):
        self.all = [re.compile(p, flags) for p in spec.all]
        self.any = [re.compile(p, flags) for p in spec.any]
        self.any += [re.compile(r"\b" + re.escape(k) + r"\b", flags) for k in spec.keywords]
        self.none = [re.compile(p, flags) for p in spec.none]

    def matches(self, text: str) -> bool:
        return (
            all(p.search(text) for p in self.all)
            and (not self.any or any(p.search(text) for p in self.any))
            and not any(p.search(text) for p in self.none)
        )


class RulesJudge:
    """Regular expressions and keyword sets: exactly one matching behaviour wins; none or several is unknown."""

    def __init__(self, name: str, spec: RulesJudgeSpec, allowed: dict[str, set[str] | None]):
        self.name = name
        flags = re.IGNORECASE if spec.ignore_case else 0
        self.rules = {b: _CompiledRule(r, flags) for b, r in spec.behaviours.items()}
        self.allowed = allowed

    def judge(self, family: str, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        allowed = self.allowed.get(family)
        out = []
        for text in responses:
            hits = [b for b, rule in self.rules.items() if (allowed is None or b in allowed) and rule.matches(text)]
            out.append(hits[0] if len(hits) == 1 else UNKNOWN)
        return out


class DemoJudge:
    """The demo world's rule-based classifier (``preftune.world.classify``)."""

    def __init__(self, name: str):
        from preftune.world import classify

        self.name = name
        self._classify = classify

    def judge(self, family: str, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        return [self._classify(family, t) for t in responses]


class ClassifierJudge:
    """A sequence classifier (``from_pretrained``) whose ``id2label`` are behaviour names.

    Only the labels a family may show compete (softmax over them); below ``min_confidence`` the
    answer is unknown. ``input: pair`` feeds (prompt, response) as a text pair.
    """

    def __init__(
        self, name: str, spec: ClassifierJudgeSpec, path: str, allowed: dict[str, set[str] | None], device: Any
    ):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = name
        self.spec = spec
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        except (OSError, ValueError) as err:
            raise ConfigError(f"judge {name!r}: cannot load the classifier at {path}: {err}") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device
        self.labels = {int(i): str(label) for i, label in self.model.config.id2label.items()}
        self.allowed = allowed
        self._torch = torch

    def label_set(self) -> set[str]:
        return set(self.labels.values())

    def judge(self, family: str, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        torch = self._torch
        allowed = self.allowed.get(family)
        idx = [i for i, label in sorted(self.labels.items()) if allowed is None or label in allowed]
        if not idx:
            return [UNKNOWN] * len(responses)
        out: list[str] = []
        for start in range(0, len(responses), 32):
            resp = list(responses[start : start + 32])
            if self.spec.input == "pair":
                enc = self.tokenizer(
                    list(prompts[start : start + 32]),
                    resp,
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=self.spec.max_length,
                )
            else:
                enc = self.tokenizer(
                    resp, return_tensors="pt", padding=True, truncation=True, max_length=self.spec.max_length
                )
            with torch.inference_mode():
                logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits.float()
            probs = torch.softmax(logits[:, idx], dim=-1)
            conf, arg = probs.max(dim=-1)
            for c, a in zip(conf.tolist(), arg.tolist(), strict=True):
                out.append(self.labels[idx[a]] if c >= self.spec.min_confidence else UNKNOWN)
        return out


class RewardJudge:
    """The reward model's score against a threshold: above -> one behaviour, below -> another."""

    def __init__(self, name: str, spec: RewardJudgeSpec, path: str, device: Any):
        from preftune.reward.model import RewardScorer

        self.name = name
        self.spec = spec
        try:
            self.scorer = RewardScorer.load(path, device=device)
        except PreftuneError as err:
            raise ConfigError(f"judge {name!r}: {err.message}") from None

    def judge(self, family: str, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        import math

        scores = self.scorer.score(list(prompts), list(responses), normalize=self.spec.normalize).tolist()
        out = []
        for r in scores:
            if not math.isfinite(r) or abs(r - self.spec.threshold) < self.spec.margin:
                out.append(UNKNOWN)
            elif r >= self.spec.threshold:
                out.append(self.spec.above)
            else:
                out.append(self.spec.below)
        return out


def _local_model_path(path: str, storage: Any) -> str:
    if path.startswith("s3://"):
        from preftune.storage import Storage

        try:
            return str((storage or Storage()).local_path(path))
        except PreftuneError as err:
            raise ConfigError(f"cannot fetch model {path}: {err.message}") from None
    if path.startswith("demo:"):
        from preftune.world import resolve_model_ref

        return str(resolve_model_ref(path))
    if not Path(path).exists():
        raise ConfigError(f"model path {path} does not exist")
    return path


def load_judges(
    suite: Suite, *, reward_model: str | None = None, device: Any = "cpu", storage: Any = None
) -> dict[str, Judge]:
    """Instantiate every judge the suite's families use, and check model label sets against the suite."""
    used = {f.judge for f in suite.families.values()}
    judges: dict[str, Judge] = {}
    for name in sorted(used):
        spec = suite.judges[name]
        allowed = {
            f.name: (set(f.behaviours) if f.behaviours is not None else None)
            for f in suite.families.values()
            if f.judge == name
        }
        if isinstance(spec, RulesJudgeSpec):
            judges[name] = RulesJudge(name, spec, allowed)
        elif isinstance(spec, DemoJudgeSpec):
            judges[name] = DemoJudge(name)
        elif isinstance(spec, ClassifierJudgeSpec):
            path = _local_model_path(resolve_judge_path(spec.path, suite), storage)
            judge = ClassifierJudge(name, spec, path, allowed, device)
            labels = judge.label_set()
            for fam in suite.families.values():
                if fam.judge != name:
                    continue
                universe = (set(fam.behaviours) & labels) if fam.behaviours is not None else labels
                named = fam.preferred | fam.acceptable | fam.forbidden | fam.needless_refusal
                for case in suite.cases_by_family.get(fam.name, []):
                    named |= case.preferred | case.acceptable | case.forbidden
                missing = sorted(named - universe)
                if missing:
                    raise ConfigError(
                        f"{suite.source}: family {fam.name!r}: judge {name!r} ({path}) never outputs "
                        f"{missing}; its labels (config.id2label) are {sorted(labels)}"
                    )
            judges[name] = judge
        elif isinstance(spec, RewardJudgeSpec):
            raw = spec.path or reward_model
            if not raw:
                raise ConfigError(f"{suite.source}: judge {name!r} needs a path or evaluation.reward_model")
            path = _local_model_path(resolve_judge_path(raw, suite) if spec.path else raw, storage)
            judges[name] = RewardJudge(name, spec, path, device)
        else:  # pragma: no cover - the suite schema admits no other type
            raise ConfigError(f"judge {name!r}: unsupported type {type(spec).__name__}")
    return judges
