"""The chat page's settings (the server maps its environment settings onto these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chat_app.engine import SamplingParams

DEFAULT_DOWN_REASONS = ("Inaccurate", "Off topic", "Too long", "Too short", "Unsafe")
DEFAULT_UP_REASONS = ("Helpful", "Clear")
MAX_REASONS = 12
MAX_REASON_CHARS = 40


@dataclass(frozen=True)
class ChatPageSettings:
    """How the chat page looks and answers.

    ``max_message_chars`` bounds a user's message (longer ones are refused, nothing is
    stored). ``default_system_prompt`` starts every new chat; with ``show_system_prompt``
    the user may change it before the chat's first message (a conversation keeps one
    system prompt, so the stored prompt is always the one the model saw).
    ``browser_state_secret`` encrypts what the page keeps in the browser (the chat's id);
    with None a random secret is drawn at start, so open chats are not restored after a
    server restart. Several replicas behind one address need the same secret.
    ``down_reasons`` / ``up_reasons`` are the reasons offered beside the thumbs (under
    the reply's flag menu); picking one rates the reply down (up) and stores the reason
    as the event's tag. While a canary runs, ``canary_compare_share`` of the finished
    replies get a second reply from the other side of the canary, shown side by side for
    a pick, after the first reply has ended (so it is never slowed); 0 turns that off.
    """

    title: str = "Feedback chat"
    max_message_chars: int = 4000
    default_system_prompt: str = ""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    show_system_prompt: bool = True
    browser_state_secret: str | None = None
    stream_interval_s: float = 0.05
    down_reasons: tuple[str, ...] = DEFAULT_DOWN_REASONS
    up_reasons: tuple[str, ...] = DEFAULT_UP_REASONS
    canary_compare_share: float = 0.1

    def reason_rating(self, option: str) -> str | None:
        """``"down"`` or ``"up"`` for a configured reason, else None."""
        if option in self.down_reasons:
            return "down"
        return "up" if option in self.up_reasons else None

    def validate(self) -> None:
        """Raise ``ValueError`` naming every problem at once."""
        problems: list[str] = []
        if not isinstance(self.title, str) or not self.title.strip():
            problems.append("title must be non-empty text")
        if (
            isinstance(self.max_message_chars, bool)
            or not isinstance(self.max_message_chars, int)
            or self.max_message_chars < 1
        ):
            problems.append(f"max_message_chars must be an int >= 1, got {self.max_message_chars!r}")
        if not isinstance(self.default_system_prompt, str):
            problems.append("default_system_prompt must be text")
        if not isinstance(self.sampling, SamplingParams):
            problems.append("sampling must be a SamplingParams")
        else:
            try:
                self.sampling.validate()
            except ValueError as exc:
                problems.append(str(exc))
        if self.browser_state_secret is not None and not (
            isinstance(self.browser_state_secret, str) and self.browser_state_secret
        ):
            problems.append("browser_state_secret must be None or non-empty text")
        if not isinstance(self.stream_interval_s, (int, float)) or not (
            0 <= self.stream_interval_s <= 5
        ):
            problems.append("stream_interval_s must be a number of seconds in [0, 5]")
        problems += reason_problems(self.down_reasons, self.up_reasons)
        if problems:
            raise ValueError("invalid chat page settings: " + "; ".join(problems))


def reason_problems(down: Any, up: Any) -> list[str]:
    problems = []
    for name, reasons in (("down_reasons", down), ("up_reasons", up)):
        if not isinstance(reasons, tuple) or not all(
                isinstance(r, str) and r.strip() == r and 0 < len(r) <= MAX_REASON_CHARS
                for r in reasons):
            problems.append(f"{name} must be a tuple of trimmed texts of 1-{MAX_REASON_CHARS} "
                            f"characters, got {reasons!r}")
            return problems
    every = [*down, *up]
    clash = sorted({r for r in every if every.count(r) > 1 or r in ("Like", "Dislike")})
    if clash:
        problems.append(f"each reason must be distinct and not Like/Dislike: {clash}")
    if len(every) > MAX_REASONS:
        problems.append(f"at most {MAX_REASONS} reasons in all, got {len(every)}")
    return problems
