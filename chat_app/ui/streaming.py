"""One reply from the engine to the page and into the store, however it ends.

``ReplyStreamer.run`` asks the engine first (so a busy engine or a too long prompt stores
nothing), then stores what precedes the reply (``prepare``: a new conversation, the user's
message), streams the reply into the session, and stores it once when it ends (``save``).
The store write sits in a ``finally``: when the page goes away mid-reply Gradio closes the
handler's generator, the generation is cancelled and what was written so far is stored
with ``finish_reason="cancelled"``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from chat_app.engine import (
    AdapterError,
    EngineBusy,
    EngineUnavailable,
    InputTooLong,
    SamplingParams,
)
from feedback_store import FeedbackStore, Message, StoreError

from .options import ChatPageSettings
from .session import STARTING, ChatSession
from .view import Notice, PageUpdate, error, info

log = logging.getLogger("chat_app.ui")

Prepare = Callable[[], list[Message]]
"""Store what precedes the reply; return the thread above it (ending in a user message)."""
Save = Callable[[list[Message], str, dict[str, Any]], Message]
"""Store the ended reply: (thread above it, text, add_reply keyword arguments) -> reply."""


def ended_reply(gen: Any, params: SamplingParams, model_name: str, reason: str,
                max_chars: int) -> tuple[str, dict[str, Any]]:
    """An ended generation as the store keeps it: its text (cut to ``max_chars``) and the
    ``add_reply`` keyword arguments (version, model, sampling settings, finish reason,
    token counts)."""
    record = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(params).items()}
    record["trimmed_turns"] = gen.trimmed_turns
    return gen.text[:max_chars], dict(
        adapter_version=gen.version, model_name=model_name, generation=record,
        finish_reason=reason, prompt_tokens=gen.prompt_tokens,
        completion_tokens=gen.completion_tokens)


class ReplyStreamer:
    """Streams replies for the chat page's handlers (one engine, one store)."""

    def __init__(self, *, store: FeedbackStore, engine: Any, settings: ChatPageSettings,
                 view: Callable[..., PageUpdate],
                 route: Callable[[int | None], str | None] = lambda _cid: None) -> None:
        self.store = store
        self.engine = engine
        self.settings = settings
        self.view = view
        self.route = route  # conversation id -> the version that answers (None: active)

    def run(self, session: ChatSession, messages: list[dict[str, str]], params: SamplingParams,
            prepare: Prepare, save: Save, *, after: Callable[[Message], None] | None = None,
            clear_box: bool = False, conversation_id: int | None = None
            ) -> Iterator[PageUpdate]:
        """Yield the page as the reply to ``messages`` streams in; see the module docstring.

        ``after(reply)`` runs once the reply is stored; ``clear_box`` empties the message
        box once the message is accepted. The reply's version is the one that serves
        ``conversation_id`` (default: the session's conversation).
        """
        with session.lock:
            busy = session.generation is not None
            if not busy:
                session.generation = STARTING
        if busy:
            yield self.view(session, error("Wait for the reply to finish (or stop it) first."))
            return
        epoch = session.epoch
        try:
            gen = self._start(messages, params, conversation_id or session.conversation_id)
        except EngineUnavailable:
            session.generation = None
            yield self.view(session, error("The model server is not answering; try again in a "
                                           "moment. Your message is still in the box."))
            return
        except EngineBusy:
            session.generation = None
            yield self.view(session, error("The model is busy right now; try again in a moment. "
                                           "Your message is still in the box."))
            return
        except InputTooLong as exc:
            session.generation = None
            yield self.view(session, error(f"That is too long for the model: {exc}."))
            return
        except Exception as exc:  # an adapter being swapped out, a template refusing the chat
            session.generation = None
            log.exception("the engine refused a reply")
            yield self.view(session, error(f"The model could not answer: {exc}"))
            return
        try:
            prefix = prepare()
        except StoreError as exc:
            gen.cancel()
            session.generation = None
            yield self.view(session, error(f"Your message was not saved: {exc}"))
            return
        session.thread, session.generation = prefix, gen
        session.pending_choice = session.selected = None
        session.side_by_side = session.side_by_side_texts = None
        ended = False
        try:
            yield self.view(session, message_box="" if clear_box else None)
            last = time.monotonic()
            for _ in gen:
                if time.monotonic() - last >= self.settings.stream_interval_s:
                    last = time.monotonic()
                    yield self.view(session)
            ended = True
            notice = self._finish(session, epoch, gen, params, prefix, save, after, False)
            if session.epoch == epoch:
                yield self.view(session, notice)
        finally:
            if not ended:  # the page went away (or an error): keep what was written
                gen.cancel()
                self._finish(session, epoch, gen, params, prefix, save, after, True)

    def _start(self, messages: list[dict[str, str]], params: SamplingParams,
               conversation_id: int | None) -> Any:
        version = self.route(conversation_id)
        if version is not None:
            try:
                return self.engine.stream(messages, params, version=version)
            except AdapterError:  # the canary ended meanwhile: the active version answers
                pass
        return self.engine.stream(messages, params)

    def _finish(self, session: ChatSession, epoch: int, gen: Any, params: SamplingParams,
                prefix: list[Message], save: Save, after: Callable[[Message], None] | None,
                cancelled: bool) -> Notice | None:
        """Store the ended reply; update the session unless the user started a new chat."""
        reason = "cancelled" if cancelled else (gen.finish_reason or "cancelled")
        text, meta = ended_reply(gen, params, self.engine.model_name, reason,
                                 self.store.limits.max_message_chars)
        current = session.epoch == epoch
        try:
            reply = save(prefix, text, meta)
        except StoreError as exc:
            log.error("a reply could not be stored: %s", exc)
            if current:
                session.generation = None
            return error(f"The reply could not be saved ({exc}); press Regenerate to retry.")
        if not current:
            return None
        session.thread = [*prefix, reply]
        if after is not None:
            after(reply)
        session.generation = None
        if reason == "error":
            why = getattr(gen, "error", None) or "unknown error"
            return error(f"The model failed while answering ({why}); what it wrote is saved.")
        if reason == "cancelled":
            return info("Reply stopped; what was written so far is saved.")
        return None
