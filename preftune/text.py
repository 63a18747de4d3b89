"""How a prompt and a response become model text, one convention for every step.

Policies and reward models see the same rendering: the tokenizer's own chat template when
it has one (real chat models), else the plain template below (the demo world and plain
causal LMs). Keeping this in one place is what lets the reward model score exactly what the
policy wrote, through its own tokenizer.
"""

from __future__ import annotations

import re
from typing import Any

PLAIN_PROMPT_TEMPLATE = "User: {prompt}\nAssistant:"


# A later turn of a multi-turn prompt, as preftune.data.formats.flatten_turns writes it.
_TURN_LINE = re.compile(r"\n(User|Assistant|System): ")
_ROLES = {"User": "user", "Assistant": "assistant", "System": "system"}


def prompt_messages(prompt: str) -> list[dict[str, str]]:
    """A prompt text as chat messages: a multi-turn prompt (imported conversations are stored
    flattened: the first user turn as is, each later turn on its own line as ``Assistant: ...`` /
    ``User: ...``) becomes its turns again; any other prompt is one user message."""
    parts = _TURN_LINE.split(prompt)
    first = parts[0]
    if first.startswith("System: "):  # a conversation that opened with a system message
        messages = [{"role": "system", "content": first[len("System: ") :]}]
    else:
        messages = [{"role": "user", "content": first}]
    for i in range(1, len(parts), 2):
        messages.append({"role": _ROLES[parts[i]], "content": parts[i + 1]})
    if len(messages) > 1 and messages[-1]["role"] != "user":
        return [{"role": "user", "content": prompt}]  # not a conversation that awaits an answer
    return messages


def render_prompt(prompt: str, tokenizer: Any | None = None) -> str:
    """The text the policy continues for a prompt (a multi-turn prompt keeps its turns)."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if template:
        return tokenizer.apply_chat_template(prompt_messages(prompt), tokenize=False, add_generation_prompt=True)
    return PLAIN_PROMPT_TEMPLATE.format(prompt=prompt)


def render_pair(prompt: str, response: str, tokenizer: Any | None = None) -> str:
    """Prompt and response as one text (what a reward model scores)."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if template:
        return tokenizer.apply_chat_template(
            [*prompt_messages(prompt), {"role": "assistant", "content": response}], tokenize=False
        )
    return f"{render_prompt(prompt)} {response.strip()}"
