"""Reading the store: conversations, messages, threads, feedback events and the
feedback log. :class:`StoreReads` is mixed into :class:`feedback_store.FeedbackStore`;
every method is one read-only unit of work on ``self.db``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Text, cast, func, or_, select
from sqlalchemy.orm import Session, aliased

from . import convert
from .convert import check_id, check_label, check_text, check_user, utc
from .db import Database
from .errors import InvalidInput, NotFound
from .models import ConversationRow, FeedbackEventRow, MessageRow
from .records import EVENT_KINDS, Conversation, FeedbackEvent, FeedbackLogRow, Message

MAX_REQUEST_ID_CHARS = 100


class StoreReads:
    """The read half of the store (see :mod:`feedback_store.store` for the writes)."""

    db: Database

    def get_conversation(self, conversation_id: int) -> Conversation:
        cid = check_id(conversation_id, "conversation id")
        return self.db.run(
            lambda s: convert.conversation(get_row(s, ConversationRow, cid, "conversation")),
            write=False,
        )

    def message_for_request(self, request_id: str) -> Message | None:
        """The message a write with ``request_id`` stored, if one did."""
        check_label(request_id, "request id", max_chars=MAX_REQUEST_ID_CHARS)

        def work(s: Session) -> Message | None:
            row = s.scalar(select(MessageRow).where(MessageRow.request_id == request_id))
            return convert.message(row) if row is not None else None

        return self.db.run(work, write=False)

    def get_message(self, message_id: int) -> Message:
        mid = check_id(message_id, "message id")
        return self.db.run(
            lambda s: convert.message(get_row(s, MessageRow, mid, "message")), write=False
        )

    def messages(self, conversation_id: int) -> list[Message]:
        """Every message of a conversation (all branches), oldest first."""
        cid = check_id(conversation_id, "conversation id")

        def work(s: Session) -> list[Message]:
            get_row(s, ConversationRow, cid, "conversation")
            rows = s.scalars(
                select(MessageRow).where(MessageRow.conversation_id == cid).order_by(MessageRow.id)
            )
            return [convert.message(r) for r in rows]

        return self.db.run(work, write=False)

    def context(self, message_id: int) -> list[Message]:
        """The thread from the first message down to ``message_id`` inclusive."""
        mid = check_id(message_id, "message id")

        def work(s: Session) -> list[Message]:
            row = get_row(s, MessageRow, mid, "message")
            rows = {
                r.id: r
                for r in s.scalars(
                    select(MessageRow).where(MessageRow.conversation_id == row.conversation_id)
                )
            }
            chain = []
            cur: MessageRow | None = row
            while cur is not None:
                chain.append(convert.message(cur))
                cur = rows.get(cur.parent_id) if cur.parent_id else None
            return chain[::-1]

        return self.db.run(work, write=False)

    def siblings(self, reply_id: int) -> list[Message]:
        """All replies to the same user message as ``reply_id`` (itself included)."""
        rid = check_id(reply_id, "reply id")

        def work(s: Session) -> list[Message]:
            reply = get_reply_row(s, rid)
            rows = s.scalars(
                select(MessageRow)
                .where(MessageRow.parent_id == reply.parent_id, MessageRow.role == "assistant")
                .order_by(MessageRow.id)
            )
            return [convert.message(r) for r in rows]

        return self.db.run(work, write=False)

    def events_for(self, reply_id: int) -> list[FeedbackEvent]:
        """Every feedback event about ``reply_id`` (as the rated or the other reply)."""
        rid = check_id(reply_id, "reply id")

        def work(s: Session) -> list[FeedbackEvent]:
            get_reply_row(s, rid)
            rows = s.scalars(
                select(FeedbackEventRow)
                .where(or_(FeedbackEventRow.reply_id == rid, FeedbackEventRow.other_reply_id == rid))
                .order_by(FeedbackEventRow.id)
            )
            return [convert.event(r) for r in rows]

        return self.db.run(work, write=False)

    def count_events(self, *, after_id: int | None = None, kinds: Sequence[str] | None = None) -> int:
        def work(s: Session) -> int:
            q = select(func.count(FeedbackEventRow.id))
            if after_id is not None:
                q = q.where(FeedbackEventRow.id > after_id)
            if kinds:
                q = q.where(FeedbackEventRow.kind.in_(list(kinds)))
            return int(s.scalar(q) or 0)

        return self.db.run(work, write=False)

    def last_event_id(self) -> int | None:
        return self.db.run(lambda s: s.scalar(select(func.max(FeedbackEventRow.id))), write=False)

    def counts(self) -> dict[str, int]:
        """Row counts per table and per feedback kind (for metrics and checks)."""

        def work(s: Session) -> dict[str, int]:
            out = {
                "conversations": int(s.scalar(select(func.count(ConversationRow.id))) or 0),
                "messages": int(s.scalar(select(func.count(MessageRow.id))) or 0),
                "events": int(s.scalar(select(func.count(FeedbackEventRow.id))) or 0),
            }
            for kind, n in s.execute(
                select(FeedbackEventRow.kind, func.count()).group_by(FeedbackEventRow.kind)
            ):
                out[f"events.{kind}"] = int(n)
            return out

        return self.db.run(work, write=False)

    def feedback_log(
        self,
        *,
        kinds: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        adapter_version: str | None = None,
        user_id: str | None = None,
        search: str | None = None,
        before_id: int | None = None,
        limit: int = 50,
    ) -> list[FeedbackLogRow]:
        """Newest-first page of feedback events with their reply and prompt.

        Filters combine with AND: ``kinds``; ``since`` <= created_at < ``until`` (naive
        datetimes are UTC); the adapter version that wrote the reply; the voter's
        ``user_id``; ``search``, a case-insensitive literal substring of the reply, the
        prompt, the comment, a tag (a reason picked with the vote) or the other reply. Keyset paging: pass the last row's
        event id as ``before_id`` for the next page.
        """
        if isinstance(kinds, str):
            kinds = [kinds]
        if kinds:
            bad = [k for k in kinds if k not in EVENT_KINDS]
            if bad:
                raise InvalidInput(f"unknown feedback kinds {bad}; known: {EVENT_KINDS}")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise InvalidInput("limit must be an integer between 1 and 1000")
        since, until = utc(since, "since"), utc(until, "until")
        user_id = check_user(user_id)
        if before_id is not None:
            before_id = check_id(before_id, "before_id")
        if search is not None:
            search = check_text(search, "search text", max_chars=1000, allow_empty=True).strip()
        reply = aliased(MessageRow)
        prompt = aliased(MessageRow)
        other = aliased(MessageRow)

        def work(s: Session) -> list[FeedbackLogRow]:
            q = (
                select(FeedbackEventRow, reply.content, reply.adapter_version, prompt.content,
                       other.content)
                .join(reply, reply.id == FeedbackEventRow.reply_id)
                .outerjoin(prompt, prompt.id == reply.parent_id)
                .outerjoin(other, other.id == FeedbackEventRow.other_reply_id)
            )
            q = log_filters(q, texts=(reply.content, prompt.content, other.content),
                            kinds=kinds, since=since, until=until,
                            adapter_version=adapter_version, user_id=user_id, search=search)
            if before_id is not None:
                q = q.where(FeedbackEventRow.id < before_id)
            q = q.order_by(FeedbackEventRow.id.desc()).limit(limit)
            return [
                FeedbackLogRow(
                    event=convert.event(ev), reply_content=rc, reply_adapter_version=rv,
                    prompt=pc, other_content=oc,
                )
                for ev, rc, rv, pc, oc in s.execute(q)
            ]

        return self.db.run(work, write=False)


def log_filters(
    q: Any,
    *,
    texts: Sequence[Any],
    kinds: Sequence[str] | None,
    since: datetime | None,
    until: datetime | None,
    adapter_version: str | None,
    user_id: str | None,
    search: str | None,
) -> Any:
    """The WHERE clauses of ``feedback_log`` (shared with the console's counts).

    ``texts``: the reply, prompt and other-reply content columns the query joined,
    searched with the event's comment and tags for ``search``, a literal substring (``%``
    and ``_`` are not wildcards).
    """
    if kinds:
        q = q.where(FeedbackEventRow.kind.in_(list(kinds)))
    if since is not None:
        q = q.where(FeedbackEventRow.created_at >= since)
    if until is not None:
        q = q.where(FeedbackEventRow.created_at < until)
    if adapter_version is not None:
        q = q.where(FeedbackEventRow.adapter_version == adapter_version)
    if user_id is not None:
        q = q.where(FeedbackEventRow.user_id == user_id)
    if search:
        tags = cast(FeedbackEventRow.tags, Text)  # the reasons picked with a vote, as JSON
        q = q.where(or_(*(col.icontains(search, autoescape=True)
                          for col in (*texts, FeedbackEventRow.comment, tags))))
    return q


def get_row(s: Session, model: type, key: Any, what: str) -> Any:
    row = s.get(model, key) if key is not None else None
    if row is None:
        raise NotFound(f"no {what} with id {key}")
    return row


def get_reply_row(s: Session, reply_id: int) -> MessageRow:
    row = get_row(s, MessageRow, reply_id, "reply")
    if row.role != "assistant":
        raise InvalidInput(f"message {reply_id} is a {row.role} message, not a reply")
    return row
