"""A user's own conversations: list (newest first, searchable), rename.

With logins a conversation belongs to its ``user_id``; without them, to the browser that
made it (its ``client_key``, with no user). Every call names the owner, and a
conversation of anybody else is answered as if it did not exist (``NotFound``), so ids
cannot be probed. Deleted conversations are never listed.

:class:`ConversationLists` is mixed into :class:`feedback_store.FeedbackStore`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from .convert import aware, check_id, check_label, check_text, check_user
from .db import Database
from .errors import InvalidInput, NotFound
from .models import AdapterVersionRow, ConversationRow, FeedbackEventRow, MessageRow, TrainingRunRow

MAX_TITLE_CHARS = 200
MAX_SEARCH_CHARS = 200
TITLE_FROM_MESSAGE_CHARS = 60
UNTITLED = "New chat"


@dataclass(frozen=True)
class ConversationSummary:
    """One line of a user's conversation list. ``title``: the name the user gave it, else
    the start of its first message; ``updated_at``: its newest message (else creation)."""

    id: int
    title: str
    created_at: datetime
    updated_at: datetime
    messages: int
    renamed: bool


@dataclass(frozen=True)
class VersionUpdate:
    """What a version that serves now learnt from one owner: ``yours`` of the owner's
    feedback events were in the data of the round that made it (``ratings`` thumbs
    and pairs in all)."""

    version: str
    activated_at: datetime | None
    ratings: int
    yours: int


def _owner_clause(user_id: str | None, client_key: str | None):  # type: ignore[no-untyped-def]
    user = check_user(user_id)
    if user is not None:
        return ConversationRow.user_id == user
    if client_key is None:
        raise InvalidInput("name the owner: a user id or a client key")
    key = check_label(client_key, "client key", max_chars=200)
    return (ConversationRow.user_id.is_(None)) & (ConversationRow.client_key == key)


def _title_from(text: str | None) -> str:
    if not text or not text.strip():
        return UNTITLED
    line = " ".join(text.split())
    if len(line) <= TITLE_FROM_MESSAGE_CHARS:
        return line
    return line[:TITLE_FROM_MESSAGE_CHARS - 1].rstrip() + "…"


def check_title(value: object) -> str:
    title = " ".join(check_text(value, "a title", max_chars=MAX_TITLE_CHARS * 4).split())
    if not title:
        raise InvalidInput("a title must not be empty")
    if len(title) > MAX_TITLE_CHARS:
        raise InvalidInput(f"a title has at most {MAX_TITLE_CHARS} characters, "
                           f"this one has {len(title)}")
    return title


class ConversationLists:
    """The conversation-list methods of the store (see the module docstring)."""

    db: Database

    def list_conversations(self, *, user_id: str | None = None, client_key: str | None = None,
                           search: str | None = None, limit: int = 50
                           ) -> list[ConversationSummary]:
        """The owner's conversations that have a message, newest activity first; with
        ``search``, those whose title or any message contains it (case-insensitive)."""
        owner = _owner_clause(user_id, client_key)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 500:
            raise InvalidInput(f"limit must be an integer from 1 to 500, not {limit!r}")
        needle = None
        if search is not None:
            needle = check_text(search, "a search", max_chars=MAX_SEARCH_CHARS,
                                allow_empty=True).strip().lower() or None

        def work(s: Session) -> list[ConversationSummary]:
            stats = (select(MessageRow.conversation_id.label("cid"),
                            func.max(MessageRow.created_at).label("last"),
                            func.count(MessageRow.id).label("n"),
                            func.min(MessageRow.id).label("first_id"))
                     .group_by(MessageRow.conversation_id).subquery())
            q = (select(ConversationRow, stats.c.last, stats.c.n)
                 .join(stats, stats.c.cid == ConversationRow.id)
                 .where(owner, ConversationRow.deleted_at.is_(None)))
            if needle is not None:
                hits = select(MessageRow.conversation_id).where(
                    func.lower(MessageRow.content).contains(needle, autoescape=True))
                q = q.where(or_(func.lower(ConversationRow.title).contains(needle,
                                                                          autoescape=True),
                                ConversationRow.id.in_(hits)))
            rows = s.execute(q.order_by(stats.c.last.desc(), ConversationRow.id.desc())
                             .limit(limit)).all()
            untitled = [conv.id for conv, _, _ in rows if not conv.title]
            first_user: dict[int, str] = {}
            if untitled:
                firsts = (select(func.min(MessageRow.id))
                          .where(MessageRow.conversation_id.in_(untitled),
                                 MessageRow.role == "user")
                          .group_by(MessageRow.conversation_id))
                for m in s.scalars(select(MessageRow).where(MessageRow.id.in_(firsts))):
                    first_user[m.conversation_id] = m.content
            return [ConversationSummary(
                id=conv.id, title=conv.title or _title_from(first_user.get(conv.id)),
                created_at=aware(conv.created_at), updated_at=aware(last or conv.created_at),
                messages=int(n), renamed=bool(conv.title)) for conv, last, n in rows]

        return self.db.run(work, write=False)

    def owns_conversation(self, conversation_id: int, *, user_id: str | None = None,
                          client_key: str | None = None) -> bool:
        """Whether the live (not deleted) conversation belongs to that owner."""
        cid = check_id(conversation_id, "conversation id")
        owner = _owner_clause(user_id, client_key)

        def work(s: Session) -> bool:
            return s.scalar(select(ConversationRow.id).where(
                ConversationRow.id == cid, owner, ConversationRow.deleted_at.is_(None))) is not None

        return self.db.run(work, write=False)

    def feedback_in_version(self, version: str, *, user_id: str | None = None,
                            client_key: str | None = None) -> VersionUpdate | None:
        """How much of the owner's feedback went into ``version``'s training round (the
        round's snapshot of events); None for an unknown version or one made without a
        round (a manual import)."""
        label = check_label(version, "version", max_chars=64)
        owner = _owner_clause(user_id, client_key)

        def work(s: Session) -> VersionUpdate | None:
            row = s.get(AdapterVersionRow, label)
            run = s.get(TrainingRunRow, row.run_id) if row is not None and row.run_id else None
            if row is None or run is None or run.last_event_id is None:
                return None
            yours = s.scalar(
                select(func.count(FeedbackEventRow.id))
                .join(ConversationRow, ConversationRow.id == FeedbackEventRow.conversation_id)
                .where(owner, FeedbackEventRow.id <= run.last_event_id,
                       FeedbackEventRow.kind.in_(("up", "down", "edit", "choice")))) or 0
            return VersionUpdate(version=row.version, activated_at=aware(row.activated_at),
                                 ratings=(run.kto_rows or 0) + (run.dpo_rows or 0),
                                 yours=int(yours))

        return self.db.run(work, write=False)

    def rename_conversation(self, conversation_id: int, title: str, *,
                            user_id: str | None = None, client_key: str | None = None) -> str:
        """Give the owner's conversation a title (spaces collapsed); returns it."""
        cid = check_id(conversation_id, "conversation id")
        owner = _owner_clause(user_id, client_key)
        clean = check_title(title)

        def work(s: Session) -> str:
            conv = s.scalar(select(ConversationRow).where(
                ConversationRow.id == cid, owner, ConversationRow.deleted_at.is_(None)))
            if conv is None:
                raise NotFound(f"no conversation with id {cid}")
            conv.title = clean
            return clean

        return self.db.run(work)
