"""The feedback store: conversations, replies, and what users said about them.

Every public method is one unit of work (one transaction) and takes keyword
arguments only. Records returned are frozen dataclasses. Nothing is overwritten:
an edit is a new reply linked to the original, a regenerate is a sibling, a vote
change is a new event (the latest vote of a user counts, see ``datasets``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import convert
from .convert import (
    check_count,
    check_id,
    check_label,
    check_tags,
    check_text,
    check_user,
    clean_model_text,
    json_object,
)
from .db import Database, upgrade
from .errors import Conflict, InvalidInput, NotFound
from .listing import ConversationLists
from .models import ConversationRow, FeedbackEventRow, MessageRow
from .reading import MAX_REQUEST_ID_CHARS, StoreReads, get_reply_row, get_row
from .records import (
    RATINGS,
    REPLY_ORIGINS,
    Conversation,
    FeedbackEvent,
    Message,
)

DEFAULT_MAX_MESSAGE_CHARS = 32_000
DEFAULT_MAX_COMMENT_CHARS = 4_000
# Column widths of the schema (models.py): longer values are refused, not truncated.
MAX_LABEL_CHARS = 200  # client key
MAX_SOURCE_CHARS = 20
MAX_VERSION_CHARS = 64
MAX_MODEL_NAME_CHARS = 500
MAX_FINISH_REASON_CHARS = 16


T = TypeVar("T")


def _reused(request_id: str | None) -> Conflict:
    return Conflict(f"request id {request_id!r} was already used for a different write")


@dataclass(frozen=True)
class Limits:
    max_message_chars: int = DEFAULT_MAX_MESSAGE_CHARS
    max_comment_chars: int = DEFAULT_MAX_COMMENT_CHARS


class FeedbackStore(StoreReads, ConversationLists):
    """Open with ``FeedbackStore.open(url)``; see the module docstring for the contract."""

    def __init__(self, db: Database, *, limits: Limits | None = None) -> None:
        self.db = db
        self.limits = limits or Limits()

    @classmethod
    def open(
        cls,
        url: str,
        *,
        migrate: bool = True,
        limits: Limits | None = None,
        retry_seconds: float | None = None,
    ) -> FeedbackStore:
        """Connect (and upgrade the schema unless ``migrate=False``).

        ``retry_seconds`` bounds how long a unit of work retries a locked or
        unreachable database before raising StoreUnavailable (default
        ``db.RETRY_SECONDS``). Raises StoreUnavailable when the database cannot be
        reached or created.
        """
        db = Database(url) if retry_seconds is None else Database(url, retry_seconds=retry_seconds)
        if migrate:
            upgrade(db)
        return cls(db, limits=limits)

    @property
    def registry(self):  # type: ignore[no-untyped-def]
        from .registry import Registry

        return Registry(self.db)

    @property
    def canaries(self):  # type: ignore[no-untyped-def]
        from .canary import Canaries

        return Canaries(self.db)

    def close(self) -> None:
        self.db.dispose()

    # -- conversations and messages ---------------------------------------------------

    def create_conversation(
        self,
        *,
        user_id: str | None = None,
        client_key: str | None = None,
        source: str = "ui",
        system_prompt: str | None = None,
    ) -> Conversation:
        user_id = check_user(user_id)
        client_key = check_label(client_key, "client key", max_chars=MAX_LABEL_CHARS)
        source = check_label(source, "source", max_chars=MAX_SOURCE_CHARS)
        if source is None:
            raise InvalidInput("source must be non-empty text")
        if system_prompt is not None:
            system_prompt = check_text(
                system_prompt, "system prompt", max_chars=self.limits.max_message_chars,
                allow_empty=True,
            ) or None

        def work(s: Session) -> Conversation:
            row = ConversationRow(
                user_id=user_id, client_key=client_key, source=source, system_prompt=system_prompt
            )
            s.add(row)
            s.flush()
            return convert.conversation(row)

        return self.db.run(work)

    def add_user_message(
        self,
        *,
        conversation_id: int,
        content: str,
        parent_id: int | None = None,
        user_id: str | None = None,
        request_id: str | None = None,
    ) -> Message:
        """Append a user turn. ``parent_id`` defaults to the conversation's latest message.
        ``request_id``: see :meth:`_once`."""
        conversation_id = check_id(conversation_id, "conversation id")
        content = check_text(content, "message", max_chars=self.limits.max_message_chars)
        user_id = check_user(user_id)
        if parent_id is not None:
            parent_id = check_id(parent_id, "parent id")

        def work(s: Session) -> Message:
            conv = _live(s, conversation_id)
            parent = parent_id
            if parent is None:
                parent = s.scalar(
                    select(func.max(MessageRow.id)).where(MessageRow.conversation_id == conv.id)
                )
            else:
                p = get_row(s, MessageRow, parent, "message")
                if p.conversation_id != conv.id:
                    raise InvalidInput(f"message {parent} belongs to another conversation")
                if p.role == "user":
                    raise InvalidInput("a user message must follow a reply, not another user message")
            row = MessageRow(
                conversation_id=conv.id, parent_id=parent, role="user", content=content,
                user_id=user_id or conv.user_id, request_id=request_id,
            )
            s.add(row)
            s.flush()
            return convert.message(row)

        def found(s: Session, row: MessageRow) -> Message:
            if row.role != "user" or row.conversation_id != conversation_id:
                raise _reused(request_id)
            return convert.message(row)

        return self._once(MessageRow, request_id, work, found)

    def add_reply(
        self,
        *,
        content: str,
        parent_id: int | None = None,
        source_reply_id: int | None = None,
        origin: str | None = None,
        adapter_version: str | None = None,
        model_name: str | None = None,
        generation: dict[str, Any] | None = None,
        finish_reason: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        request_id: str | None = None,
    ) -> Message:
        """Store a model reply to the user message ``parent_id`` (``request_id``: see
        :meth:`_once`).

        A regeneration passes ``source_reply_id`` (the reply it replaces) instead of
        ``parent_id``; it becomes a sibling of that reply. A generated reply may be
        empty (the model can stop at once); it is stored as it was, except that NUL and
        lone surrogates, which no SQL text column holds, become U+FFFD.
        """
        content = check_text(
            clean_model_text(content), "reply", max_chars=self.limits.max_message_chars, allow_empty=True
        )
        if (parent_id is None) == (source_reply_id is None):
            raise InvalidInput("give exactly one of parent_id or source_reply_id")
        if source_reply_id is not None:
            source_reply_id = check_id(source_reply_id, "reply id")
        else:
            parent_id = check_id(parent_id, "parent id")
        origin = origin or ("regenerated" if source_reply_id is not None else "generated")
        if origin not in REPLY_ORIGINS:
            raise InvalidInput(f"origin must be one of {REPLY_ORIGINS}, not {origin!r}")
        adapter_version = check_label(
            adapter_version, "adapter version", max_chars=MAX_VERSION_CHARS
        )
        model_name = check_label(model_name, "model name", max_chars=MAX_MODEL_NAME_CHARS)
        finish_reason = check_label(
            finish_reason, "finish reason", max_chars=MAX_FINISH_REASON_CHARS
        )
        generation = json_object(generation, "generation settings")
        prompt_tokens = check_count(prompt_tokens, "prompt_tokens")
        completion_tokens = check_count(completion_tokens, "completion_tokens")

        def work(s: Session) -> Message:
            if source_reply_id is not None:
                src = get_reply_row(s, source_reply_id)
                parent = get_row(s, MessageRow, src.parent_id, "message")
            else:
                parent = get_row(s, MessageRow, parent_id, "message")
                if parent.role != "user":
                    raise InvalidInput(f"message {parent.id} is not a user message")
            row = MessageRow(
                conversation_id=parent.conversation_id, parent_id=parent.id, role="assistant",
                content=content, origin=origin, source_reply_id=source_reply_id,
                adapter_version=adapter_version, model_name=model_name,
                generation=generation, finish_reason=finish_reason,
                prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                request_id=request_id,
            )
            s.add(row)
            s.flush()
            return convert.message(row)

        def found(s: Session, row: MessageRow) -> Message:
            if row.role != "assistant" or row.source_reply_id != source_reply_id or (
                    parent_id is not None and row.parent_id != parent_id):
                raise _reused(request_id)
            return convert.message(row)

        return self._once(MessageRow, request_id, work, found)

    def edit_reply(
        self, *, reply_id: int, content: str, user_id: str | None = None,
        request_id: str | None = None,
    ) -> tuple[Message, FeedbackEvent]:
        """Store the reply the user wanted as a new reply linked to the original.

        Returns the new reply and the ``edit`` event; the pair (edit = chosen,
        original = rejected) is DPO data. The original is never changed.
        """
        reply_id = check_id(reply_id, "reply id")
        content = check_text(content, "edited reply", max_chars=self.limits.max_message_chars)
        user_id = check_user(user_id)

        def work(s: Session) -> tuple[Message, FeedbackEvent]:
            orig = get_reply_row(s, reply_id)
            if content.strip() == orig.content.strip():
                raise InvalidInput("the edited reply is the same as the original")
            row = MessageRow(
                conversation_id=orig.conversation_id, parent_id=orig.parent_id, role="assistant",
                content=content, origin="edit", source_reply_id=orig.id, user_id=user_id,
                model_name="human edit",
            )
            s.add(row)
            s.flush()
            ev = FeedbackEventRow(
                kind="edit", reply_id=orig.id, other_reply_id=row.id,
                conversation_id=orig.conversation_id, adapter_version=orig.adapter_version,
                user_id=user_id, request_id=request_id,
            )
            s.add(ev)
            s.flush()
            return convert.message(row), convert.event(ev)

        def found(s: Session, ev: FeedbackEventRow) -> tuple[Message, FeedbackEvent]:
            if ev.kind != "edit" or ev.reply_id != reply_id:
                raise _reused(request_id)
            edited = get_row(s, MessageRow, ev.other_reply_id, "message")
            return convert.message(edited), convert.event(ev)

        return self._once(FeedbackEventRow, request_id, work, found)

    # -- feedback ---------------------------------------------------------------------

    def rate(
        self,
        *,
        reply_id: int,
        rating: str,
        comment: str | None = None,
        tags: Iterable[str] | None = None,
        user_id: str | None = None,
        request_id: str | None = None,
    ) -> FeedbackEvent:
        """Record a thumbs up or down (optionally with a comment and free tags)."""
        if rating not in RATINGS:
            raise InvalidInput(f"rating must be 'up' or 'down', not {rating!r}")
        return self._add_event(kind=rating, reply_id=reply_id, comment=comment, tags=tags,
                               user_id=user_id, request_id=request_id)

    def comment(
        self,
        *,
        reply_id: int,
        comment: str,
        tags: Iterable[str] | None = None,
        user_id: str | None = None,
        request_id: str | None = None,
    ) -> FeedbackEvent:
        """Record a comment (and tags) on a reply, without a vote."""
        if comment is None:
            raise InvalidInput("comment is empty")
        return self._add_event(kind="comment", reply_id=reply_id, comment=comment, tags=tags,
                               user_id=user_id, request_id=request_id)

    def choose(
        self, *, chosen_id: int, rejected_id: int, user_id: str | None = None,
        request_id: str | None = None,
    ) -> FeedbackEvent:
        """Record that the user preferred one sibling reply over another."""
        chosen_id = check_id(chosen_id, "chosen reply id")
        rejected_id = check_id(rejected_id, "rejected reply id")
        user_id = check_user(user_id)
        if chosen_id == rejected_id:
            raise InvalidInput("a reply cannot be chosen over itself")

        def work(s: Session) -> FeedbackEvent:
            chosen = get_reply_row(s, chosen_id)
            rejected = get_reply_row(s, rejected_id)
            if chosen.parent_id != rejected.parent_id:
                raise InvalidInput(
                    f"replies {chosen_id} and {rejected_id} answer different messages; "
                    "only sibling replies can be compared"
                )
            ev = FeedbackEventRow(
                kind="choice", reply_id=chosen.id, other_reply_id=rejected.id,
                conversation_id=chosen.conversation_id, adapter_version=chosen.adapter_version,
                user_id=user_id, request_id=request_id,
            )
            s.add(ev)
            s.flush()
            return convert.event(ev)

        def found(s: Session, ev: FeedbackEventRow) -> FeedbackEvent:
            if ev.kind != "choice" or (ev.reply_id, ev.other_reply_id) != (chosen_id, rejected_id):
                raise _reused(request_id)
            return convert.event(ev)

        return self._once(FeedbackEventRow, request_id, work, found)

    def _add_event(
        self,
        *,
        kind: str,
        reply_id: int,
        comment: str | None,
        tags: Iterable[str] | None,
        user_id: str | None,
        request_id: str | None = None,
    ) -> FeedbackEvent:
        reply_id = check_id(reply_id, "reply id")
        if comment is not None:
            comment = check_text(comment, "comment", max_chars=self.limits.max_comment_chars)
        tag_list = check_tags(tags)
        user_id = check_user(user_id)

        def work(s: Session) -> FeedbackEvent:
            reply = get_reply_row(s, reply_id)
            ev = FeedbackEventRow(
                kind=kind, reply_id=reply.id, conversation_id=reply.conversation_id,
                adapter_version=reply.adapter_version, user_id=user_id, comment=comment,
                tags=tag_list or None, request_id=request_id,
            )
            s.add(ev)
            s.flush()
            return convert.event(ev)

        def found(s: Session, ev: FeedbackEventRow) -> FeedbackEvent:
            if ev.kind != kind or ev.reply_id != reply_id:
                raise _reused(request_id)
            return convert.event(ev)

        return self._once(FeedbackEventRow, request_id, work, found)

    # -- deletion -----------------------------------------------------------------------

    def delete_conversation(self, conversation_id: int, *, by: str | None = None,
                            owner: str | None = None,
                            client_key: str | None = None) -> dict[str, int]:
        """Delete a conversation's messages and feedback, so no view, training round or
        export sees them again; its row stays, without its text, as the record of who
        deleted it and when. ``owner`` (a user) or else ``client_key`` (a browser without
        a login): refuse (NotFound, as for a missing id) unless the conversation belongs
        to that owner, checked in the same transaction. Deleting twice is a no-op."""
        cid = check_id(conversation_id, "conversation id")
        by = check_user(by)
        owner = check_user(owner)
        key = None if client_key is None else check_label(client_key, "client key",
                                                          max_chars=MAX_LABEL_CHARS)

        def work(s: Session) -> dict[str, int]:
            conv = get_row(s, ConversationRow, cid, "conversation")
            if owner is not None:
                mine = conv.user_id == owner
            elif key is not None:
                mine = conv.user_id is None and conv.client_key == key
            else:
                mine = True
            if not mine:
                raise NotFound(f"no conversation with id {cid}")
            return _erase(s, conv, by)

        return self.db.run(work)

    def forget_user(self, user_id: str, *, by: str | None = None) -> dict[str, int]:
        """Delete every conversation of ``user_id`` and every feedback event they gave
        (as :meth:`delete_conversation`, recorded the same way)."""
        user = check_user(user_id)
        if user is None:
            raise InvalidInput("name the user to forget")
        by = check_user(by)

        def work(s: Session) -> dict[str, int]:
            total = {"conversations": 0, "messages": 0, "events": 0}
            for conv in s.scalars(select(ConversationRow).where(
                    ConversationRow.user_id == user, ConversationRow.deleted_at.is_(None))):
                done = _erase(s, conv, by)
                for k in ("messages", "events"):
                    total[k] += done[k]
                total["conversations"] += 1
            others = s.execute(delete(FeedbackEventRow).where(FeedbackEventRow.user_id == user))
            total["events"] += others.rowcount or 0
            return total

        return self.db.run(work)

    def deletions(self, *, limit: int = 100) -> list[Conversation]:
        """Deleted conversations (the records left), newest deletion first."""
        def work(s: Session) -> list[Conversation]:
            rows = s.scalars(select(ConversationRow)
                             .where(ConversationRow.deleted_at.is_not(None))
                             .order_by(ConversationRow.deleted_at.desc()).limit(limit))
            return [convert.conversation(r) for r in rows]

        return self.db.run(work, write=False)

    def _once(self, row_type: type, request_id: str | None, work: Callable[[Session], T],
              found: Callable[[Session, Any], T]) -> T:
        """Run the write ``work`` once per ``request_id`` (None: always).

        A client that retries a write (its answer was lost) or sends it twice gives the
        same request id; the store then returns what the first attempt wrote, via
        ``found`` (which refuses an id used for a different write). This also covers the
        store's own retry after a connection lost just as a commit went through: the
        retry finds the committed row. Two attempts at once: the unique index lets one
        insert, and the other returns that row.
        """
        if request_id is None:
            return self.db.run(work)
        check_label(request_id, "request id", max_chars=MAX_REQUEST_ID_CHARS)

        def attempt(s: Session) -> T:
            row = s.scalar(select(row_type).where(row_type.request_id == request_id))
            return work(s) if row is None else found(s, row)

        try:
            return self.db.run(attempt)
        except IntegrityError:
            return self.db.run(attempt)



def _erase(s: Session, conv: ConversationRow, by: str | None) -> dict[str, int]:
    if conv.deleted_at is not None:
        return {"messages": 0, "events": 0}
    events = s.execute(delete(FeedbackEventRow)
                       .where(FeedbackEventRow.conversation_id == conv.id)).rowcount or 0
    s.execute(update(MessageRow).where(MessageRow.conversation_id == conv.id)
              .values(parent_id=None, source_reply_id=None))
    messages = s.execute(delete(MessageRow)
                         .where(MessageRow.conversation_id == conv.id)).rowcount or 0
    conv.system_prompt = conv.title = None
    conv.deleted_at = datetime.now(UTC)
    conv.deleted_by = by
    s.flush()
    return {"messages": messages, "events": events}


def _live(s: Session, conversation_id: int) -> ConversationRow:
    """The conversation, refused with NotFound once deleted."""
    conv = get_row(s, ConversationRow, conversation_id, "conversation")
    if conv.deleted_at is not None:
        raise NotFound(f"conversation {conversation_id} was deleted")
    return conv
