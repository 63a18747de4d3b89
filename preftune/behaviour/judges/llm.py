"""``llm``: an instruction model names the behaviour, following a rubric per family written in the suite.

Two backends, one prompt:

- ``path``: a local ``transformers`` causal-LM folder, scored as a *constrained choice*: the
  log-probability of each allowed label as the continuation of the rubric prompt; the labels'
  softmax decides (below ``min_confidence``: unknown). No free text is generated or parsed.
- ``endpoint``: any OpenAI-compatible chat-completions server (vLLM, TGI, Ollama, a gateway);
  see :mod:`preftune.behaviour.judges.endpoint` (logprobs when the server returns them, else a
  strict parse of the one-label answer).

The rubric (its instructions and each behaviour's description) is part of the suite, hence of
the suite hash: rewording it is a new suite version.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, model_validator

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

DEFAULT_INSTRUCTIONS = (
    "You are grading an assistant's response to a user's prompt. Decide which one of the behaviours "
    "below the response shows."
)


class Rubric(StrictSpec):
    """How a family's behaviours are told apart, in words an instruction model follows."""

    instructions: str = Field(DEFAULT_INSTRUCTIONS, min_length=1, description="What the grader is asked to do.")
    behaviours: dict[str, str] = Field(
        ..., min_length=2, description="Behaviour name -> what a response showing it does (the label is the name)."
    )


class EndpointSpec(StrictSpec):
    """An OpenAI-compatible chat-completions endpoint."""

    base_url: str = Field(..., min_length=1, description="e.g. http://vllm:8000/v1 (POST {base_url}/chat/completions).")
    model: str = Field(..., min_length=1, description="Model name the server serves.")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key (Bearer).")
    api_key_file: str | None = Field(
        None, description="File holding the API key (a mounted Kubernetes secret); used when api_key_env is unset."
    )
    timeout_s: float = Field(30.0, gt=0.0, description="Per-request timeout.")
    max_retries: int = Field(4, ge=0, le=20, description="Retries on timeouts, connection errors, 429 and 5xx.")
    backoff_s: float = Field(0.5, ge=0.0, description="First retry delay; doubled each retry, with jitter.")
    concurrency: int = Field(4, ge=1, le=256, description="Requests in flight at once.")
    max_tokens: int = Field(8, ge=1, le=256, description="Longest answer (one label is expected).")
    logprobs: bool = Field(True, description="Ask for logprobs; used to decide when the server returns them.")
    top_logprobs: int = Field(5, ge=1, le=20)
    cache: bool = Field(True, description="Cache answers on disk, keyed by judge, model, rubric, prompt and response.")
    cache_dir: str | None = Field(None, description="Cache folder; empty: <preftune home>/cache/judges.")
    probe: bool = Field(True, description="Reach the server (GET {base_url}/models) when the judge is loaded.")


class LlmJudgeSpec(StrictSpec):
    type: Literal["llm"]
    path: str | None = Field(None, description="Local causal-LM folder (constrained choice over the labels).")
    endpoint: EndpointSpec | None = Field(None, description="OpenAI-compatible endpoint (instead of path).")
    rubrics: dict[str, Rubric] = Field(..., min_length=1, description="Family name -> rubric.")
    min_confidence: float = Field(0.0, ge=0.0, lt=1.0, description="Below this label probability: unknown.")
    chat_template: Literal["auto", "none"] = Field(
        "auto", description="Local backend: render with the tokenizer's chat template when it has one ('auto')."
    )
    max_length: int = Field(1024, ge=16, description="Local backend: longest prompt in tokens (left-truncated).")
    batch_size: int = Field(16, ge=1, le=1024, description="Local backend: sequences per forward pass.")

    @model_validator(mode="after")
    def _one_backend(self) -> LlmJudgeSpec:
        if (self.path is None) == (self.endpoint is None):
            raise ValueError("give exactly one of 'path' (a local model folder) or 'endpoint'")
        return self


def rubric_messages(rubric: Rubric, labels: Sequence[str], prompt: str, response: str) -> tuple[str, str]:
    """(system, user) messages asking for exactly one of ``labels``."""
    lines = [rubric.instructions.strip(), "", "Behaviours:"]
    lines += [f"- {b}: {rubric.behaviours[b].strip()}" for b in labels]
    lines += ["", f"Answer with exactly one label: {', '.join(labels)}."]
    user = f"Prompt: {prompt}\n\nResponse: {response}\n\nLabel:"
    return "\n".join(lines), user


def rubric_labels(spec: LlmJudgeSpec, family: str, allowed: set[str] | None) -> list[str]:
    rubric = spec.rubrics.get(family)
    if rubric is None:
        return []
    return [b for b in rubric.behaviours if allowed is None or b in allowed]


def softmax_choice(scores: Sequence[float], labels: Sequence[str], min_confidence: float) -> str:
    """The best label by score (log-probabilities), or unknown when its softmax share is below the floor."""
    finite = [s for s in scores if math.isfinite(s)]
    if not labels or not finite:
        return UNKNOWN
    top = max(finite)
    weights = [math.exp(s - top) if math.isfinite(s) else 0.0 for s in scores]
    best = max(range(len(labels)), key=lambda i: weights[i])
    if weights[best] / sum(weights) < min_confidence:
        return UNKNOWN
    return labels[best]


class LocalLlmJudge:
    """Constrained choice with a local causal LM: each label's log-probability after the rubric prompt."""

    def __init__(self, name: str, spec: LlmJudgeSpec, path: str, allowed: dict[str, set[str] | None], device: Any):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from preftune.errors import ConfigError

        self.name, self.spec, self.allowed, self.device, self._torch = name, spec, allowed, device, torch
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        except (OSError, ValueError) as err:
            raise ConfigError(f"judge {name!r}: cannot load the language model at {path}: {err}") from None
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self.use_chat = spec.chat_template == "auto" and bool(getattr(self.tokenizer, "chat_template", None))

    def _context(self, system: str, user: str) -> list[int]:
        tok = self.tokenizer
        if self.use_chat:
            ids = tok.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": user}],
                add_generation_prompt=True,
                tokenize=True,
            )
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        else:
            ids = tok(f"{system}\n\n{user}", add_special_tokens=False)["input_ids"]
        return list(ids)

    def _label_ids(self, label: str) -> list[int]:
        return list(self.tokenizer(label if self.use_chat else " " + label, add_special_tokens=False)["input_ids"])

    def judge(self, family: str, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        torch = self._torch
        labels = rubric_labels(self.spec, family, self.allowed.get(family))
        if not labels:
            return [UNKNOWN] * len(responses)
        rubric = self.spec.rubrics[family]
        label_ids = [self._label_ids(b) for b in labels]
        room = self.spec.max_length - max(len(x) for x in label_ids)
        seqs: list[tuple[int, int, list[int], int]] = []  # (response index, label index, ids, context length)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            ctx = self._context(*rubric_messages(rubric, labels, p, r))[-room:]
            for j, lid in enumerate(label_ids):
                seqs.append((i, j, ctx + lid, len(ctx)))
        scores = [[float("-inf")] * len(labels) for _ in responses]
        bs = self.spec.batch_size
        for start in range(0, len(seqs), bs):
            chunk = seqs[start : start + bs]
            width = max(len(s[2]) for s in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for k, (_, _, x, _) in enumerate(chunk):
                ids[k, : len(x)] = torch.tensor(x)
                mask[k, : len(x)] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for k, (i, j, x, n_ctx) in enumerate(chunk):
                target = torch.tensor(x[n_ctx:])
                pos = torch.arange(n_ctx - 1, len(x) - 1)
                scores[i][j] = float(logp[k, pos, target].sum())
        return [softmax_choice(s, labels, self.spec.min_confidence) for s in scores]


def _labels(spec: LlmJudgeSpec, family: str, judges: dict) -> set[str] | None:
    rubric = spec.rubrics.get(family)
    return set(rubric.behaviours) if rubric is not None else set()


def _check(jname: str, j: LlmJudgeSpec, ctx: CheckContext) -> list[Problem]:
    out: list[Problem] = []
    if j.path is not None and check_model_path(j.path, ctx.base_dir) is None:
        out.append((("judges", jname, "path"), f"judge {jname!r}: language model path {j.path!r} does not exist"))
    for fam_name, fam in ctx.families.items():
        if getattr(fam, "judge", None) == jname and fam_name not in j.rubrics:
            out.append((("families", fam_name, "judge"), f"family {fam_name!r}: judge {jname!r} has no rubric for it"))
    for fam, rubric in j.rubrics.items():
        if fam not in ctx.families:
            out.append((("judges", jname, "rubrics", fam), f"judge {jname!r}: rubric for unknown family {fam!r}"))
        for b in rubric.behaviours:
            if not BEHAVIOUR_NAME.match(b):
                out.append((("judges", jname, "rubrics", fam), f"judge {jname!r}: bad behaviour name {b!r}"))
    return out


@register_judge("llm", spec=LlmJudgeSpec, labels=_labels, check=_check)
def build_llm(name: str, spec: LlmJudgeSpec, ctx: BuildContext) -> Any:
    if spec.endpoint is not None:
        from preftune.behaviour.judges.endpoint import EndpointLlmJudge

        return EndpointLlmJudge(name, spec, ctx.allowed)
    path = local_model_path(resolve_judge_path(str(spec.path), ctx.suite), ctx.storage)
    return LocalLlmJudge(name, spec, path, ctx.allowed, ctx.device)
