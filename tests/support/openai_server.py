"""A small OpenAI-compatible chat-completions server on 127.0.0.1, backed by a local transformers model.

What the ``llm`` judge's endpoint backend is tested against (it stands in for vLLM, TGI or
Ollama): ``POST /v1/chat/completions`` with greedy decoding and optional ``logprobs`` /
``top_logprobs``, ``GET /v1/models``, Bearer-key checking, and knobs a test needs: fail the
first N requests with 503 (retries), delay each answer (concurrency), and counters
(``GET /stats``: requests, most in flight at once).

Messages are rendered as their contents joined by a blank line (the server's own "chat
template"), which is how the tests' tiny judge model was trained.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from support.serve import free_port


@dataclass
class ServerState:
    model_dir: str
    api_key: str | None = None
    fail_first: int = 0
    delay_s: float = 0.0
    logprobs: bool = True
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def create_app(state: ServerState) -> Any:
    import torch
    from fastapi import FastAPI, Header, HTTPException
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(state.model_dir)
    model = AutoModelForCausalLM.from_pretrained(state.model_dir).eval()
    model_lock = threading.Lock()
    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "tiny-judge", "object": "model"}]}

    @app.get("/stats")
    def stats() -> dict[str, int]:
        return {"requests": state.requests, "max_in_flight": state.max_in_flight}

    @app.post("/v1/chat/completions")
    def chat(body: dict[str, Any], authorization: str | None = Header(None)) -> dict[str, Any]:
        with state.lock:
            state.requests += 1
            if state.fail_first > 0:
                state.fail_first -= 1
                raise HTTPException(503, "warming up")
        if state.api_key is not None and authorization != f"Bearer {state.api_key}":
            raise HTTPException(401, "bad key")
        with state.lock:
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            time.sleep(state.delay_s)
            text = "\n\n".join(m["content"] for m in body["messages"])
            ids = tok(text, add_special_tokens=False)["input_ids"]
            want_lp = bool(body.get("logprobs")) and state.logprobs
            top_n = int(body.get("top_logprobs") or 0)
            out_ids: list[int] = []
            lp_items = []
            with model_lock, torch.inference_mode():
                for _ in range(int(body.get("max_tokens") or 16)):
                    logits = model(input_ids=torch.tensor([ids + out_ids])).logits[0, -1].float()
                    logp = torch.log_softmax(logits, dim=-1)
                    nxt = int(logp.argmax())
                    if nxt == tok.eos_token_id:
                        break
                    out_ids.append(nxt)
                    if want_lp:
                        vals, idx = logp.topk(max(top_n, 1))
                        lp_items.append(
                            {
                                "token": tok.convert_ids_to_tokens(nxt),
                                "logprob": float(logp[nxt]),
                                "top_logprobs": [
                                    {"token": tok.convert_ids_to_tokens(int(i)), "logprob": float(v)}
                                    for v, i in zip(vals.tolist(), idx.tolist(), strict=True)
                                    if math.isfinite(v)
                                ][:top_n],
                            }
                        )
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": tok.decode(out_ids, skip_special_tokens=True)},
                "finish_reason": "stop",
            }
            if want_lp:
                choice["logprobs"] = {"content": lp_items}
            return {"id": "cmpl-test", "object": "chat.completion", "model": body.get("model"), "choices": [choice]}
        finally:
            with state.lock:
                state.in_flight -= 1

    return app


@contextmanager
def openai_server(state: ServerState) -> Iterator[str]:
    """Run the server in a thread on a free loopback port; yields its base URL (ending in /v1)."""
    import urllib.request

    import uvicorn

    port = free_port()
    config = uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="openai-test-server", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(base + "/v1/models", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the OpenAI-compatible test server did not start within 30 s")
        time.sleep(0.05)
    try:
        yield base + "/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
