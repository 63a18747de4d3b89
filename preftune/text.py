"""How a prompt and a response become model text, one convention for every step.

Policies and reward models see the same rendering: the tokenizer's own chat template when
it has one (real chat models), else the plain template below (the demo world and plain
causal LMs). Keeping this in one place is what lets the reward model score exactly what the
policy wrote, through its own tokenizer.
"""

from __future__ import annotations

from typing import Any

PLAIN_PROMPT_TEMPLATE = "User: {prompt}\nAssistant:"


def render_prompt(prompt: str, tokenizer: Any | None = None) -> str:
    """The text the policy continues for a user prompt."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_PROMPT_TEMPLATE.format(prompt=prompt)


def render_pair(prompt: str, response: str, tokenizer: Any | None = None) -> str:
    """Prompt and response as one text (what a reward model scores)."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
        )
    return f"{render_prompt(prompt)} {response.strip()}"
