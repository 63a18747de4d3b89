"""``classifier``: a sequence classifier folder whose ``config.id2label`` are behaviour names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from preftune.behaviour.judges.registry import (
    UNKNOWN,
    BuildContext,
    CheckContext,
    Problem,
    StrictSpec,
    check_model_path,
    local_model_path,
    register_judge,
    resolve_judge_path,
)
from preftune.errors import ConfigError


class ClassifierJudgeSpec(StrictSpec):
    type: Literal["classifier"]
    path: str = Field(..., min_length=1, description="Folder of a sequence classifier whose id2label are behaviours.")
    input: Literal["response", "pair"] = "response"
    min_confidence: float = Field(0.0, ge=0.0, lt=1.0)
    max_length: int = Field(256, ge=8)


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


def _check(jname: str, j: ClassifierJudgeSpec, ctx: CheckContext) -> list[Problem]:
    if check_model_path(j.path, ctx.base_dir) is None:
        return [(("judges", jname, "path"), f"judge {jname!r}: classifier model path {j.path!r} does not exist")]
    return []


def check_labels_cover_suite(name: str, labels: set[str], where: str, ctx: BuildContext) -> None:
    """Every behaviour the suite names for a family this judge decides must be among ``labels``."""
    suite = ctx.suite
    for fam in suite.families.values():
        if name not in judged_by(suite, fam.name):
            continue
        universe = (set(fam.behaviours) & labels) if fam.behaviours is not None else labels
        named = fam.preferred | fam.acceptable | fam.forbidden | fam.needless_refusal
        for case in suite.cases_by_family.get(fam.name, []):
            named |= case.preferred | case.acceptable | case.forbidden
        missing = sorted(named - universe)
        if missing:
            raise ConfigError(
                f"{suite.source}: family {fam.name!r}: judge {name!r} ({where}) never outputs "
                f"{missing}; its labels are {sorted(labels)}"
            )


def judged_by(suite: Any, family: str) -> set[str]:
    """The judge of ``family`` and, for an ensemble, its members."""
    from preftune.behaviour.judges.registry import judge_type

    top = suite.families[family].judge
    out = {top}
    for m in judge_type(suite.judges[top]).members(suite.judges[top]):
        out.add(m)
    return out


@register_judge("classifier", spec=ClassifierJudgeSpec, check=_check)
def build_classifier(name: str, spec: ClassifierJudgeSpec, ctx: BuildContext) -> ClassifierJudge:
    path = local_model_path(resolve_judge_path(spec.path, ctx.suite), ctx.storage)
    judge = ClassifierJudge(name, spec, path, ctx.allowed, ctx.device)
    check_labels_cover_suite(name, judge.label_set(), f"{path}, config.id2label", ctx)
    return judge
