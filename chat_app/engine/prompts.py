"""Turn OpenAI-style messages into prompt token ids that fit the budget.

A *turn* is a user message with the replies that follow it (messages before the first user
message belong to the first turn). System messages are never dropped. When the prompt is over
budget, the fewest oldest turns are dropped so that it fits; if even the newest turn alone
does not fit beside the system messages, ``InputTooLong`` is raised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InputTooLong

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Prompt:
    """The token ids to prefill and how many old turns were dropped to get them."""

    token_ids: list[int]
    messages: list[dict[str, Any]]
    trimmed_turns: int


def validate_messages(messages: object) -> list[dict[str, Any]]:
    """Return ``messages`` as a list of dicts, or raise ``ValueError`` naming every problem."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    problems: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            problems.append(f"messages[{i}] is a {type(message).__name__}, not a dict")
            continue
        if message.get("role") not in ROLES:
            problems.append(f"messages[{i}].role must be one of {ROLES}, got {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            problems.append(f"messages[{i}].content must be a str")
    if messages and all(isinstance(m, dict) and m.get("role") == "system" for m in messages):
        problems.append("messages hold only system messages; add a user message")
    if problems:
        raise ValueError("invalid messages: " + "; ".join(problems))
    return list(messages)


class PromptBuilder:
    """Renders chats with the tokenizer's chat template, counting and trimming tokens."""

    def __init__(self, tokenizer: Any, budget: int) -> None:
        self.tokenizer = tokenizer
        self.budget = budget

    def encode(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of the chat followed by the assistant's generation prompt."""
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # jinja raises for chats a template refuses
            raise ValueError(f"the chat template refused these messages: {exc}") from exc
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def build(self, messages: list[dict[str, Any]]) -> Prompt:
        """The prompt for ``messages`` with the fewest oldest turns dropped to fit the budget."""
        turns = _split_turns(messages)
        ids = self.encode(messages)
        if len(ids) <= self.budget:
            return Prompt(ids, messages, 0)
        # Token count falls as more turns are dropped: binary search for the fewest drops.
        low, high = 1, len(turns) - 1
        best: Prompt | None = None
        while low <= high:
            drop = (low + high) // 2
            kept = _drop_turns(messages, turns, drop)
            kept_ids = self.encode(kept)
            if len(kept_ids) <= self.budget:
                best, high = Prompt(kept_ids, kept, drop), drop - 1
            else:
                low = drop + 1
        if best is None:
            smallest = len(self.encode(_drop_turns(messages, turns, len(turns) - 1)))
            raise InputTooLong(smallest, self.budget)
        return best


def _split_turns(messages: list[dict[str, Any]]) -> list[list[int]]:
    """Indices of the non-system messages, grouped into turns (each starts at a user message)."""
    turns: list[list[int]] = []
    for i, message in enumerate(messages):
        if message["role"] == "system":
            continue
        if message["role"] == "user" or not turns:
            turns.append([i])
        else:
            turns[-1].append(i)
    return turns


def _drop_turns(
    messages: list[dict[str, Any]], turns: list[list[int]], drop: int
) -> list[dict[str, Any]]:
    dropped = {i for turn in turns[:drop] for i in turn}
    return [m for i, m in enumerate(messages) if i not in dropped]
