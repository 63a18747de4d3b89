"""The ``llm`` judge's endpoint backend: any OpenAI-compatible chat-completions server.

One request per (family, prompt, response), asking for exactly one label:

- when the server returns ``logprobs``, the first answer token's ``top_logprobs`` are mapped to
  the labels they begin (a token that begins several labels makes the answer fall back to the
  parse below); the label with the most probability mass wins, unknown below ``min_confidence``;
- otherwise the answer must *be* one label (case, surrounding quotes and a final full stop are
  ignored); anything else is unknown. There is no fuzzy matching.

Requests run ``concurrency`` at a time, with a timeout, and are retried with exponential
back-off and jitter on timeouts, connection errors, 429 and 5xx. Answers are cached on disk,
keyed by judge name, model, rubric, family, prompt and response (and the request settings that
change the answer), so judging the same responses again (the champion's reused samples, a
``preftune judge check`` before an evaluation) costs no request.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from preftune.behaviour.judges.llm import LlmJudgeSpec, rubric_labels, rubric_messages
from preftune.behaviour.judges.registry import UNKNOWN
from preftune.errors import CredentialsError, InputError, UnreachableError

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


def api_key(spec: Any, judge: str) -> str | None:
    """The endpoint's key from its environment variable, else its file (a mounted secret)."""
    if spec.api_key_env:
        value = os.environ.get(spec.api_key_env)
        if value:
            return value.strip()
        if not spec.api_key_file:
            raise CredentialsError(
                f"judge {judge!r}: environment variable {spec.api_key_env} (the endpoint's API key) is not set"
            )
    if spec.api_key_file:
        try:
            return Path(spec.api_key_file).expanduser().read_text(encoding="utf-8").strip()
        except OSError as err:
            raise CredentialsError(
                f"judge {judge!r}: cannot read the API key file {spec.api_key_file}: {err}"
            ) from None
    return None


def strict_label(content: str, labels: Sequence[str]) -> str:
    """The label the answer is, exactly (case, quotes and a final full stop aside), else unknown."""
    text = content.strip().strip("\"'`").strip().rstrip(".").strip().strip("\"'`").lower()
    matches = [b for b in labels if b.lower() == text]
    return matches[0] if len(matches) == 1 else UNKNOWN


def logprob_label(top: Sequence[dict[str, Any]], labels: Sequence[str], min_confidence: float) -> str | None:
    """Decide from the first token's top logprobs; None when they cannot decide (then parse the text)."""
    import math

    mass = dict.fromkeys(labels, 0.0)
    for entry in top:
        token = str(entry.get("token", "")).strip().strip("\"'`").lower()
        if not token:
            continue
        begins = [b for b in labels if b.lower().startswith(token)]
        if len(begins) > 1:
            return None  # ambiguous first token: the text decides
        if begins:
            mass[begins[0]] += math.exp(float(entry.get("logprob", -math.inf)))
    total = sum(mass.values())
    if total <= 0:
        return None
    best = max(labels, key=lambda b: mass[b])
    return best if mass[best] / total >= min_confidence else UNKNOWN


class ResponseCache:
    """One JSON file per key under ``folder`` (written atomically; safe for concurrent writers)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(value), encoding="utf-8")
        os.replace(tmp, path)


class EndpointLlmJudge:
    """An LLM judge behind an OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(self, name: str, spec: LlmJudgeSpec, allowed: dict[str, set[str] | None]):
        import httpx

        assert spec.endpoint is not None
        self.name, self.spec, self.ep, self.allowed = name, spec, spec.endpoint, allowed
        headers = {"Content-Type": "application/json"}
        key = api_key(self.ep, name)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.url = self.ep.base_url.rstrip("/") + "/chat/completions"
        self.client = httpx.Client(
            headers=headers,
            timeout=self.ep.timeout_s,
            limits=httpx.Limits(max_connections=self.ep.concurrency),
        )
        cache_dir = self.ep.cache_dir
        if self.ep.cache:
            if cache_dir is None:
                from preftune.home import preftune_home

                cache_dir = str(preftune_home() / "cache" / "judges")
            self.cache: ResponseCache | None = ResponseCache(Path(cache_dir).expanduser() / _safe(name))
        else:
            self.cache = None
        self.requests = 0  # requests sent (not answered from the cache), for logs and tests
        self._lock = threading.Lock()
        if self.ep.probe:
            self._probe()

    def _probe(self) -> None:
        """Reach the server before anything is generated (``GET {base_url}/models``; any answer but 401/403 will do)."""
        import httpx

        url = self.ep.base_url.rstrip("/") + "/models"
        last = ""
        for attempt in range(self.ep.max_retries + 1):
            if attempt:
                time.sleep(self.ep.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random()))
            try:
                resp = self.client.get(url)
            except (httpx.TimeoutException, httpx.TransportError) as err:
                last = f"{type(err).__name__}: {err}"
                continue
            if resp.status_code in (401, 403):
                raise CredentialsError(f"judge {self.name!r}: {url} answered {resp.status_code} (check the API key)")
            return
        raise UnreachableError(f"judge {self.name!r}: cannot reach {url} ({last})")

    # -- one request -------------------------------------------------------------------

    def _body(self, system: str, user: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.ep.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": self.ep.max_tokens,
            "temperature": 0.0,
        }
        if self.ep.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = self.ep.top_logprobs
        return body

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        last = ""
        for attempt in range(self.ep.max_retries + 1):
            if attempt:
                delay = self.ep.backoff_s * 2 ** (attempt - 1)
                time.sleep(delay * (0.5 + random.random()))
            try:
                with self._lock:
                    self.requests += 1
                resp = self.client.post(self.url, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as err:
                last = f"{type(err).__name__}: {err}"
                continue
            if resp.status_code in (401, 403):
                raise CredentialsError(
                    f"judge {self.name!r}: {self.url} answered {resp.status_code} (check the API key)"
                )
            if resp.status_code in RETRY_STATUS:
                last = f"HTTP {resp.status_code}"
                continue
            if resp.status_code >= 400:
                raise InputError(
                    f"judge {self.name!r}: {self.url} rejected the request with HTTP {resp.status_code}: "
                    f"{resp.text[:300]}"
                )
            try:
                return resp.json()
            except ValueError:
                last = "the answer is not JSON"
                continue
        raise UnreachableError(
            f"judge {self.name!r}: {self.url} failed after {self.ep.max_retries + 1} attempts ({last})"
        )

    def _decide(self, answer: dict[str, Any], labels: Sequence[str]) -> str:
        try:
            choice = answer["choices"][0]
            content = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            return UNKNOWN
        lp = choice.get("logprobs") if isinstance(choice, dict) else None
        tokens = (lp or {}).get("content") if isinstance(lp, dict) else None
        if tokens:
            top = tokens[0].get("top_logprobs") or [tokens[0]]
            decided = logprob_label(top, labels, self.spec.min_confidence)
            if decided is not None:
                return decided
        return strict_label(content, labels)

    def _key(self, family: str, system: str, user: str) -> str:
        ep = self.ep
        raw = json.dumps(
            [self.name, ep.model, family, system, user, ep.max_tokens, ep.logprobs, ep.top_logprobs],
            ensure_ascii=False,
        )
        return hashlib.sha256(raw.encode("utf-8")).hexdigest()

    def _one(self, family: str, labels: Sequence[str], prompt: str, response: str) -> str:
        system, user = rubric_messages(self.spec.rubrics[family], labels, prompt, response)
        key = self._key(family, system, user)
        answer = self.cache.get(key) if self.cache is not None else None
        if answer is None:
            answer = self._post(self._body(system, user))
            if self.cache is not None:
                self.cache.put(key, answer)
        return self._decide(answer, labels)

    # -- the Judge protocol --------------------------------------------------------------

    def judge(self, family: str, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        labels = rubric_labels(self.spec, family, self.allowed.get(family))
        if not labels:
            return [UNKNOWN] * len(responses)
        with ThreadPoolExecutor(max_workers=self.ep.concurrency, thread_name_prefix=f"judge-{self.name}") as pool:
            futures = [pool.submit(self._one, family, labels, p, r) for p, r in zip(prompts, responses, strict=True)]
            return [f.result() for f in futures]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "judge"
