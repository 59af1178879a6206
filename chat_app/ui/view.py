"""What the chat page shows after a handler step: ``PageUpdate``, built from a ``ChatSession``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from feedback_store import Message

from .markup import display_text
from .session import ChatSession

THUMBS = {"up": "Like", "down": "Dislike"}  # store rating -> Chatbot feedback option


@dataclass(frozen=True)
class Notice:
    """A line for the user: ``level`` "error" (nothing was done) or "info" (done)."""

    text: str
    level: str = "info"

    @property
    def is_error(self) -> bool:
        return self.level == "error"


def error(text: str) -> Notice:
    return Notice(text, "error")


def info(text: str) -> Notice:
    return Notice(text, "info")


@dataclass(frozen=True)
class PageUpdate:
    """Everything one handler step sets on the page.

    ``history`` is the Chatbot's value (messages as shown, markup escaped) and
    ``feedback`` the thumbs shown on each assistant message, in order. ``message_box`` and
    ``comment_box`` are new contents for those boxes, None to leave what the user typed.
    ``system_prompt`` is set when the box must show a given text (the chat's own prompt once
    it has started, the default in a new chat), None to leave what the user is typing.
    ``memory`` is what the browser keeps to find the chat again after a reload.
    """

    history: list[dict[str, str]]
    feedback: list[str | None]
    model_line: str
    notice: Notice | None = None
    message_box: str | None = None
    comment_box: str | None = None
    choice_visible: bool = False
    system_prompt: str | None = None
    system_prompt_locked: bool = False
    generating: bool = False
    memory: dict[str, Any] = field(default_factory=dict)


def model_line(model_name: str, version: str, *, answered: bool) -> str:
    """The line naming the model and adapter version: "model: <name> · adapter: <version>"."""
    prefix = "Last reply from" if answered else "Replies come from"
    return f"{prefix} model: `{model_name}` · adapter: `{version}`"


def shown(message: Message | dict[str, str]) -> dict[str, str]:
    if isinstance(message, dict):
        return {"role": message["role"], "content": display_text(message["content"])}
    return {"role": message.role, "content": display_text(message.content)}


def page_view(
    session: ChatSession,
    *,
    engine_model: str,
    engine_version: str,
    notice: Notice | None = None,
    message_box: str | None = None,
    comment_box: str | None = None,
    reset_system_prompt: bool = False,
) -> PageUpdate:
    """The page for ``session``, with the reply it is streaming (if any) as the last message.

    ``reset_system_prompt`` puts the session's system prompt in its box even before the
    chat has started (a new tab, a new chat).
    """
    history = [shown(m) for m in session.thread]
    feedback = [THUMBS.get(session.votes.get(m.id, "")) for m in session.thread if m.is_reply]
    live = session.live()
    if live is not None:
        history.append(shown({"role": "assistant", "content": live.text}))
        feedback.append(None)
        line = model_line(engine_model, live.version, answered=True)
    else:
        last = next((m for m in reversed(session.thread) if m.is_reply and m.origin != "edit"),
                    None)
        if last is not None and last.adapter_version:
            line = model_line(last.model_name or engine_model, last.adapter_version, answered=True)
        else:
            line = model_line(engine_model, engine_version, answered=False)
    return PageUpdate(
        history=history,
        feedback=feedback,
        model_line=line,
        notice=notice,
        message_box=message_box,
        comment_box=comment_box,
        choice_visible=session.pending_choice is not None and live is None,
        system_prompt=session.system_prompt if session.started or reset_system_prompt
        else None,
        system_prompt_locked=session.started,
        generating=live is not None,
        memory=session.memory(),
    )
