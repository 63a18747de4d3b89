"""Which part of a prompt the reward model reads (``reward.text_view``, saved in ``reward_model.json``).

One function, :func:`view_prompt`, applied wherever a prompt meets the reward model: training
and held-out tokenisation and the gate's baselines (``preftune.reward.step``, through
:func:`view_pairs`), and scoring (:class:`preftune.scoring.model.RewardScorer`, which reads the
view from the metadata, so PPO, evaluate and the MLflow pyfunc need no setting of their own).

Views (a registry, :data:`TEXT_VIEWS`):

- ``full``: the prompt as stored, the whole conversation (today's behaviour; the identity).
- ``last_turn``: of a prompt with several messages (earlier turns, or a system message), only its
  last user message; a single-turn prompt is unchanged.

Prompt shapes: the data layer stores every prompt as one string; a multi-turn prompt is flattened
(the first user turn as is, each later turn on its own ``User: ...`` / ``Assistant: ...`` line,
``preftune.data.formats.flatten_turns``), and :func:`preftune.text.prompt_messages` reads it back
as chat messages. :func:`view_prompt` takes either shape and returns the same shape.

Light (no torch): ``reward_model.json`` and the run config import :data:`TextView`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import is_dataclass, replace
from typing import Any, Literal, get_args

from preftune.text import prompt_messages

TextView = Literal["full", "last_turn"]
TEXT_VIEW_NAMES: tuple[str, ...] = get_args(TextView)

Messages = list[dict[str, str]]


def _full(messages: Messages) -> Messages:
    return messages


def _last_turn(messages: Messages) -> Messages:
    users = [m for m in messages if m.get("role") == "user"]
    return [users[-1]] if len(messages) > 1 and users else messages


TEXT_VIEWS: dict[str, Callable[[Messages], Messages]] = {"full": _full, "last_turn": _last_turn}


def view_prompt(prompt: str | Messages, view: str) -> str | Messages:
    """``prompt`` as the reward model reads it under ``view`` (a string stays a string, messages stay messages).

    A string is split into its turns with :func:`preftune.text.prompt_messages`; when the view
    leaves one user message, its text is returned (rendered later as a single-turn prompt), else
    the string is returned unchanged. ``full`` always returns ``prompt`` itself.
    """
    fn = TEXT_VIEWS.get(view)
    if fn is None:
        raise ValueError(f"unknown text view {view!r}; one of {', '.join(TEXT_VIEW_NAMES)}")
    if view == "full":
        return prompt
    if isinstance(prompt, str):
        messages = prompt_messages(prompt)
        kept = fn(messages)
        return kept[0]["content"] if kept is not messages and len(kept) == 1 else prompt
    return [dict(m) for m in fn(list(prompt))]


def view_pairs(pairs: Sequence[Any], view: str) -> list[Any]:
    """Preference pairs (dataclasses with a string ``prompt``, e.g. ``PreferencePair``) with their prompts viewed.

    Everything else (``prompt_id``, family, weight, the responses) is kept, so splits, folds and
    bootstrap clusters by prompt are the same in every view. ``full`` returns the pairs as they are.
    """
    if view not in TEXT_VIEWS:
        raise ValueError(f"unknown text view {view!r}; one of {', '.join(TEXT_VIEW_NAMES)}")
    if view == "full":
        return list(pairs)
    out = []
    for p in pairs:
        if not is_dataclass(p):
            raise TypeError(f"view_pairs needs dataclass pairs with a 'prompt' field, got {type(p).__name__}")
        out.append(replace(p, prompt=view_prompt(p.prompt, view)))
    return out
