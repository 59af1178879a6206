"""The chat page's handlers: plain functions of (session, inputs) -> PageUpdate(s).

They know nothing of Gradio (``page.py`` wires them to events), so tests call them
directly with a real engine and store. Contract, shared by every handler:

* Positions are chat positions (0 = first message shown); ``session.thread`` maps each to
  the stored message, and feedback acts on that stored message, never on text sent back
  by the browser.
* Bad input (an empty or too long message, a position with no stored reply, a busy
  engine) returns a page with an error notice and writes nothing; a refused message stays
  in the message box so it is not lost.
* A reply is stored once, when it ends, with the adapter version and model that wrote it,
  the sampling settings, its finish reason and token counts; a reply cut short (Stop, or
  the page closed mid-reply, which closes the handler's generator) is stored with
  ``finish_reason="cancelled"`` and the text produced so far.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from feedback_store import FeedbackStore, Message, StoreError

from .compare import SideBySideHandlers
from .conversations import ConversationListHandlers
from .markup import typed_text
from .options import ChatPageSettings
from .session import ChatSession, new_client_key, restore_thread
from .streaming import ReplyStreamer
from .view import Notice, PageUpdate, error, info, page_view

log = logging.getLogger("chat_app.ui")

MAX_CLIENT_KEY_CHARS = 200


class ChatHandlers(ConversationListHandlers, SideBySideHandlers):
    """Handlers over one store and one engine (shared by every browser)."""

    def __init__(self, *, store: FeedbackStore, engine: Any, settings: ChatPageSettings,
                 router: Any | None = None) -> None:
        settings.validate()
        self.store = store
        self.engine = engine
        self.settings = settings
        # router.version_for(conversation_id) and router.canary_running(): the canary's
        # split of conversations (chat_app.server.Services); None: the active version only
        self.router = router
        self._streamer = ReplyStreamer(store=store, engine=engine, settings=settings,
                                       view=self.view, route=self._route)

    def _route(self, conversation_id: int | None) -> str | None:
        return self.router.version_for(conversation_id) if self.router is not None else None

    def _early_conversation(self, session: ChatSession) -> str | None:
        """While a canary runs a new chat's conversation is made before its first reply,
        whose version its id decides; returns a problem, or None."""
        if session.conversation_id is not None or self.router is None \
                or not self.router.canary_running():
            return None
        try:
            conv = self.store.create_conversation(
                user_id=session.user_id, client_key=session.client_key, source="ui",
                system_prompt=session.system_prompt or None)
        except StoreError as exc:
            return f"Your message was not saved: {exc}"
        session.conversation_id = conv.id
        return None

    # -- views -------------------------------------------------------------------------

    def view(self, session: ChatSession, notice: Notice | None = None, **kw: Any) -> PageUpdate:
        """The page for ``session`` as it stands (keyword args as in ``page_view``)."""
        version = self._route(session.conversation_id) or self.engine.active_version
        return page_view(session, engine_model=self.engine.model_name,
                         engine_version=version, notice=notice, **kw)

    def load(self, memory: Any, *, user_id: str | None = None) -> tuple[ChatSession, PageUpdate]:
        """A new tab: the chat the browser remembers (``memory``), or a fresh one.

        A remembered conversation is restored only when it was started by this browser
        (same client key) and, with logins on, by the same user.
        """
        memory = memory if isinstance(memory, dict) else {}
        key = memory.get("client_key")
        if not isinstance(key, str) or not key.strip() or len(key) > MAX_CLIENT_KEY_CHARS:
            key = new_client_key()
        session = ChatSession(client_key=key, user_id=user_id,
                              system_prompt=self.settings.default_system_prompt)
        seen = memory.get("seen_update")
        session.seen_update = seen if isinstance(seen, str) and len(seen) <= 64 else None
        cid, head = memory.get("conversation_id"), memory.get("head_id")
        if not isinstance(cid, int) or isinstance(cid, bool):
            return session, self.view(session, reset_system_prompt=True)
        try:
            conv = self.store.get_conversation(cid)
            if conv.client_key != key or (user_id is not None and conv.user_id != user_id):
                return session, self.view(session, reset_system_prompt=True)
            session.conversation_id = conv.id
            session.system_prompt = conv.system_prompt or ""
            session.thread = restore_thread(self.store.messages(conv.id),
                                            head if isinstance(head, int) else None)
            session.votes = self._votes(session)
        except StoreError as exc:
            log.warning("could not restore conversation %s: %s", cid, exc)
            session.start_over(self.settings.default_system_prompt)
            return session, self.view(session, error(f"Your previous chat could not be "
                                                     f"restored: {exc}"),
                                      reset_system_prompt=True)
        return session, self.view(session, reset_system_prompt=True)

    def _votes(self, session: ChatSession) -> dict[int, str]:
        votes: dict[int, str] = {}
        for m in session.thread:
            if m.is_reply:
                for ev in self.store.events_for(m.id):
                    if ev.kind in ("up", "down") and ev.reply_id == m.id \
                            and ev.user_id == session.user_id:
                        votes[m.id] = ev.kind
        return votes

    # -- chatting ----------------------------------------------------------------------

    def send(self, session: ChatSession, text: Any, system_prompt: Any = None
             ) -> Iterator[PageUpdate]:
        """Store the user's message and stream the model's reply to it.

        ``system_prompt`` is used when this message starts a new chat; afterwards the
        chat's own (stored) system prompt applies.
        """
        problem = self._check_message(text)
        if problem is None and session.thread and not session.thread[-1].is_reply:
            problem = "The last message has no reply yet: press Regenerate to get one."
        if problem is None and not session.started and system_prompt is not None:
            if not isinstance(system_prompt, str):
                problem = "The system prompt must be text."
            elif len(system_prompt) > self.store.limits.max_message_chars:
                problem = (f"The system prompt is too long: {len(system_prompt)} characters, "
                           f"the limit is {self.store.limits.max_message_chars}.")
        if problem:
            yield self.view(session, error(problem))
            return
        if not session.started and system_prompt is not None:
            session.system_prompt = system_prompt.strip()
        problem = self._early_conversation(session)
        if problem:
            yield self.view(session, error(problem))
            return
        messages = [*session.model_messages(), {"role": "user", "content": text}]

        def prepare() -> list[Message]:
            if session.conversation_id is None:
                conv = self.store.create_conversation(
                    user_id=session.user_id, client_key=session.client_key, source="ui",
                    system_prompt=session.system_prompt or None)
                session.conversation_id = conv.id
            parent = session.head_id
            user = self.store.add_user_message(conversation_id=session.conversation_id,
                                               content=text, parent_id=parent,
                                               user_id=session.user_id)
            return [*session.thread, user]

        yield from self._streamer.run(session, messages, self.settings.sampling, prepare,
                                      self._answer, clear_box=True)

    def regenerate(self, session: ChatSession, position: int | None = None
                   ) -> Iterator[PageUpdate]:
        """A new reply in place of the one at ``position`` (default: the last one).

        The new reply is stored as a sibling of the old (``source_reply_id``) and shown
        instead of it; the user can then say which of the two is better (``choose``).
        When the last message is a user message left without a reply, it gets one.
        Regenerating an earlier reply drops the later messages from view (they stay on
        their branch in the store).
        """
        unanswered = bool(session.thread) and not session.thread[-1].is_reply
        if position is None:
            position = len(session.thread) if unanswered else session.last_reply_position()
        if position is None:
            yield self.view(session, error("There is no reply to regenerate yet."))
            return
        old = session.reply_at(position)
        if old is None and not (unanswered and position == len(session.thread)):
            yield self.view(session, error("There is no reply to regenerate there."))
            return
        params = self.settings.sampling
        if params.seed is not None and old is not None:  # a fixed seed would repeat the reply
            params = replace(params, seed=params.seed + len(self.store.siblings(old.id)))
        messages = session.model_messages(position)
        prompt = session.thread[:position]

        def save(prefix: list[Message], reply_text: str, meta: dict[str, Any]) -> Message:
            if old is None:
                return self._answer(prefix, reply_text, meta)
            return self.store.add_reply(content=reply_text, source_reply_id=old.id, **meta)

        def after(reply: Message) -> None:
            session.pending_choice = (old.id, reply.id) if old is not None else None

        yield from self._streamer.run(session, messages, params, lambda: prompt, save,
                                      after=after)

    def edit(self, session: ChatSession, position: int, new_text: Any) -> Iterator[PageUpdate]:
        """The user rewrote the message at ``position`` (as shown: markup escaped).

        A reply: the user's version is stored as a new reply linked to the original
        (``edit_reply``; the original is read from the store) and shown in its place.
        A user message: it is stored as a new message on a new branch and answered.
        Either way the later messages leave the view (they stay on their branch).
        """
        if session.generating:
            yield self.view(session, error("Wait for the reply to finish (or stop it) first."))
            return
        if not isinstance(new_text, str):
            yield self.view(session, error("The edited message must be text."))
            return
        text = typed_text(new_text)
        if session.reply_at(position) is not None:
            yield self._edit_reply(session, position, text)
            return
        if not (isinstance(position, int) and 0 <= position < len(session.thread)):
            yield self.view(session, error("That message cannot be edited."))
            return
        problem = self._check_message(text)
        if problem:
            yield self.view(session, error(problem))
            return
        if text == session.thread[position].content:
            yield self.view(session)
            return
        parent = session.thread[position - 1] if position > 0 else None
        messages = [*session.model_messages(position), {"role": "user", "content": text}]
        new_chat = None  # a new first message: a new chat with the same system prompt
        if parent is None and self.router is not None and self.router.canary_running():
            try:  # made now: its id decides the version of its first reply
                new_chat = self.store.create_conversation(
                    user_id=session.user_id, client_key=session.client_key, source="ui",
                    system_prompt=session.system_prompt or None)
            except StoreError as exc:
                yield self.view(session, error(f"Your message was not saved: {exc}"))
                return

        def prepare() -> list[Message]:
            if parent is None:
                conv = new_chat or self.store.create_conversation(
                    user_id=session.user_id, client_key=session.client_key, source="ui",
                    system_prompt=session.system_prompt or None)
                session.conversation_id = conv.id
            user = self.store.add_user_message(
                conversation_id=session.conversation_id, content=text,
                parent_id=parent.id if parent is not None else None, user_id=session.user_id)
            return [*session.thread[:position], user]

        yield from self._streamer.run(session, messages, self.settings.sampling, prepare,
                                      self._answer,
                                      conversation_id=new_chat.id if new_chat else None)

    def _edit_reply(self, session: ChatSession, position: int, text: str) -> PageUpdate:
        try:
            original = self.store.get_message(session.thread[position].id)
            if text.strip() == original.content.strip():
                return self.view(session)
            edited, _ = self.store.edit_reply(reply_id=original.id, content=text,
                                              user_id=session.user_id)
        except StoreError as exc:
            return self.view(session, error(f"The edit was not saved: {exc}"))
        dropped = len(session.thread) - position - 1
        session.thread = [*session.thread[:position], edited]
        session.pending_choice = None
        note = "Saved your version of the reply; the chat continues from it."
        if dropped:
            note += f" ({dropped} later message(s) stay on the earlier branch.)"
        return self.view(session, info(note))

    def stop(self, session: ChatSession) -> PageUpdate:
        """Cut the reply being streamed short (it is stored as "cancelled")."""
        gen = session.live()
        if gen is None:
            return self.view(session)
        gen.cancel()
        return self.view(session, info("Stopping the reply."))

    def new_chat(self, session: ChatSession) -> PageUpdate:
        """Start a new conversation (the old one stays stored); a running reply is stopped."""
        gen = session.live()
        if gen is not None:
            gen.cancel()
        session.start_over(self.settings.default_system_prompt)
        return self.view(session, message_box="", comment_box="", reset_system_prompt=True)

    # -- feedback ----------------------------------------------------------------------

    def rate(self, session: ChatSession, position: int, liked: Any) -> PageUpdate:
        """Thumbs up (``liked=True``) or down (``False``) on the reply at ``position``, or
        a reason (one of the settings' ``down_reasons``/``up_reasons``): a thumbs down
        (up) with the reason stored as the event's tag.

        A vote can be changed (the latest counts) but not withdrawn: clicking the same
        thumb again (``liked`` empty, as the Chatbot sends it) keeps the stored vote shown.
        """
        reply = session.reply_at(position)
        if reply is None:
            return self.view(session, error("Only a finished reply can be rated."))
        tags: list[str] = []
        if isinstance(liked, str) and liked:
            rating = self.settings.reason_rating(liked)
            if rating is None:
                return self.view(session, error(f"Unknown feedback option {liked[:40]!r}; "
                                                "nothing was saved."))
            tags = [liked]
        elif liked is True or liked is False:
            rating = "up" if liked else "down"
        else:
            return self.view(session, info("A vote can be changed but not withdrawn: "
                                           "click the other thumb to change it."))
        word = "thumbs up" if rating == "up" else "thumbs down"
        why = f" ({tags[0]})" if tags else ""
        with session.vote_lock:  # the check and the write as one, however fast the repeat
            if tags and session.votes.get(reply.id) == rating \
                    and session.vote_tags.get(reply.id) == tuple(tags):
                # the same reason again (the Chatbot can send one pick twice): stored once
                return self.view(session, info(
                    f"Saved your {word}{why} on reply {_number(session, position)}."))
            try:
                self.store.rate(reply_id=reply.id, rating=rating, user_id=session.user_id,
                                tags=tags or None)
            except StoreError as exc:
                return self.view(session, error(f"Your vote was not saved: {exc}"))
            session.votes[reply.id] = rating
            session.vote_tags[reply.id] = tuple(tags)
        return self.view(session, info(
            f"Saved your {word}{why} on reply {_number(session, position)}."))

    def comment(self, session: ChatSession, text: Any, position: int | None = None
                ) -> PageUpdate:
        """A comment on the reply at ``position``, else the selected reply, else the last."""
        if not isinstance(text, str) or not text.strip():
            return self.view(session, error("Write a comment first."))
        if position is None:
            position = session.selected if session.reply_at(session.selected) else None
        if position is None:
            position = session.last_reply_position()
        reply = session.reply_at(position) if position is not None else None
        if reply is None or position is None:
            return self.view(session, error("There is no reply to comment on yet."))
        try:
            self.store.comment(reply_id=reply.id, comment=text.strip(), user_id=session.user_id)
        except StoreError as exc:
            return self.view(session, error(f"Your comment was not saved: {exc}"))
        return self.view(session, info(f"Saved your comment on reply {_number(session, position)}."),
                         comment_box="")

    def select(self, session: ChatSession, position: Any) -> PageUpdate:
        """The user clicked the message at ``position``: comments go to it if it is a reply."""
        if session.reply_at(position) is None:
            return self.view(session)
        session.selected = position
        return self.view(session, info(f"Comments now go to reply {_number(session, position)}."))

    def choose(self, session: ChatSession, prefer: str) -> PageUpdate:
        """After a regenerate: ``prefer`` "previous" or "new" reply; stored with ``choose``.

        Choosing the previous reply shows it again and the chat continues from it.
        """
        if session.pending_choice is None:
            return self.view(session, error("There is nothing to compare: regenerate a reply "
                                            "first."))
        if prefer not in ("previous", "new"):
            return self.view(session, error(f"Choose 'previous' or 'new', not {prefer!r}."))
        previous_id, new_id = session.pending_choice
        chosen, rejected = (new_id, previous_id) if prefer == "new" else (previous_id, new_id)
        try:
            self.store.choose(chosen_id=chosen, rejected_id=rejected, user_id=session.user_id)
            if prefer == "previous":
                ids = [m.id for m in session.thread]
                if new_id in ids:
                    at = ids.index(new_id)
                    session.thread = [*session.thread[:at], self.store.get_message(previous_id)]
        except StoreError as exc:
            return self.view(session, error(f"Your choice was not saved: {exc}"))
        session.pending_choice = None
        return self.view(session, info(f"Saved: the {prefer} reply is better."))

    # -- helpers -----------------------------------------------------------------------

    def _check_message(self, text: Any) -> str | None:
        """Why ``text`` cannot be sent, or None."""
        if not isinstance(text, str):
            return "The message must be text."
        if not text.strip():
            return "Type a message first: an empty message is not sent."
        limit = self.settings.max_message_chars
        if len(text) > limit:
            return f"Your message is too long: {len(text)} characters, the limit is {limit}."
        if "\x00" in text:
            return "Your message contains a NUL character."
        return None

    def _answer(self, prefix: list[Message], text: str, meta: dict[str, Any]) -> Message:
        return self.store.add_reply(content=text, parent_id=prefix[-1].id, **meta)



def _number(session: ChatSession, position: int) -> int:
    """The reply's number as the user counts them (1 = the first reply in the chat)."""
    return sum(1 for m in session.thread[: position + 1] if m.is_reply)
