"""Read-only aggregates for the operator console: volumes, thumbs rates, facets, lineage.

Each function takes a ``FeedbackStore``, runs one read transaction and returns frozen
dataclasses or plain data. Grouping happens in SQL (SQLite and PostgreSQL), so the
cost stays flat in Python however many events the store holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, func, select
from sqlalchemy.orm import Session, aliased

from . import convert
from .convert import check_text, check_user, utc
from .errors import InvalidInput
from .models import AdapterVersionRow, FeedbackEventRow, MessageRow, TrainingRunRow
from .reading import log_filters
from .records import EVENT_KINDS, AdapterVersion, FeedbackEvent
from .store import FeedbackStore

BUCKETS = ("day", "hour")
_BUCKET_FORMATS = {"day": ("%Y-%m-%d", "YYYY-MM-DD", 10), "hour": ("%Y-%m-%d %H", "YYYY-MM-DD HH24", 13)}
MAX_FACET_VALUES = 500


@dataclass(frozen=True)
class VolumePoint:
    """``count`` events of ``kind`` created in [bucket_start, bucket_start + 1 day/hour)."""

    bucket_start: datetime
    kind: str
    count: int


@dataclass(frozen=True)
class VersionThumbs:
    """Thumbs on replies written by ``adapter_version`` (None: replies with no version).

    Each voter's latest up/down per reply counts once (anonymous votes on a reply count
    as one voter, as in ``datasets``): ``up_rate = up / (up + down)``.
    """

    adapter_version: str | None
    up: int
    down: int

    @property
    def ratings(self) -> int:
        return self.up + self.down

    @property
    def up_rate(self) -> float | None:
        return self.up / self.ratings if self.ratings else None


@dataclass(frozen=True)
class Facets:
    """The values an operator can filter the feedback log by (at most MAX_FACET_VALUES each)."""

    adapter_versions: tuple[str, ...]
    users: tuple[str, ...]
    first_event_at: datetime | None
    last_event_at: datetime | None


@dataclass(frozen=True)
class VersionSummary:
    """An adapter version with the size of the data its training run used."""

    version: AdapterVersion
    kto_rows: int | None  # None: no run recorded for it
    dpo_rows: int | None
    run_status: str | None

    @property
    def data_rows(self) -> int | None:
        if self.kto_rows is None and self.dpo_rows is None:
            return None
        return (self.kto_rows or 0) + (self.dpo_rows or 0)


@dataclass(frozen=True)
class RunHeadline:
    """What a list of training runs shows, without the runs' (long) histories."""

    id: int
    trigger: str
    status: str
    created_at: datetime
    requested_by: str | None
    candidate_version: str | None


def _bucket_expr(s: Session, bucket: str) -> ColumnElement[Any]:
    py_fmt, pg_fmt, width = _BUCKET_FORMATS[bucket]
    col = FeedbackEventRow.created_at
    if s.get_bind().dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", col), pg_fmt)
    # SQLite keeps datetimes as UTC text "YYYY-MM-DD HH:MM:SS.ffffff": a prefix is a bucket.
    return func.substr(col, 1, width)


def feedback_volume(
    store: FeedbackStore,
    *,
    bucket: str = "day",
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[VolumePoint]:
    """Events per UTC ``bucket`` ("day" or "hour") and kind, with since <= created_at < until.

    Oldest bucket first; buckets with no event of a kind are left out.
    """
    if bucket not in BUCKETS:
        raise InvalidInput(f"bucket must be one of {BUCKETS}, not {bucket!r}")
    since, until = utc(since, "since"), utc(until, "until")
    py_fmt = _BUCKET_FORMATS[bucket][0]

    def work(s: Session) -> list[VolumePoint]:
        b = _bucket_expr(s, bucket).label("b")
        q = select(b, FeedbackEventRow.kind, func.count()).group_by(b, FeedbackEventRow.kind)
        if since is not None:
            q = q.where(FeedbackEventRow.created_at >= since)
        if until is not None:
            q = q.where(FeedbackEventRow.created_at < until)
        out = [
            VolumePoint(datetime.strptime(str(label), py_fmt).replace(tzinfo=UTC), kind, int(n))
            for label, kind, n in s.execute(q)
        ]
        return sorted(out, key=lambda p: (p.bucket_start, EVENT_KINDS.index(p.kind)
                                          if p.kind in EVENT_KINDS else 99))

    return store.db.run(work, write=False)


def thumbs_by_version(store: FeedbackStore) -> list[VersionThumbs]:
    """Up and down votes per adapter version (see VersionThumbs), in version order."""

    def work(s: Session) -> list[VersionThumbs]:
        voter = func.coalesce(FeedbackEventRow.user_id, "")
        latest = (
            select(func.max(FeedbackEventRow.id).label("id"))
            .where(FeedbackEventRow.kind.in_(("up", "down")))
            .group_by(FeedbackEventRow.reply_id, voter)
            .subquery()
        )
        q = (
            select(FeedbackEventRow.adapter_version, FeedbackEventRow.kind, func.count())
            .join(latest, latest.c.id == FeedbackEventRow.id)
            .group_by(FeedbackEventRow.adapter_version, FeedbackEventRow.kind)
        )
        tally: dict[str | None, dict[str, int]] = {}
        for version, kind, n in s.execute(q):
            tally.setdefault(version, {"up": 0, "down": 0})[kind] = int(n)
        return [VersionThumbs(v, t["up"], t["down"])
                for v, t in sorted(tally.items(), key=lambda kv: (kv[0] is not None, kv[0] or ""))]

    return store.db.run(work, write=False)


def _log_conditions(
    q: Select[Any],
    *,
    kinds: Sequence[str] | None,
    since: datetime | None,
    until: datetime | None,
    adapter_version: str | None,
    user_id: str | None,
    search: str | None,
) -> Select[Any]:
    """The WHERE clauses of ``FeedbackStore.feedback_log`` (same joins, same meaning)."""
    reply, prompt, other = aliased(MessageRow), aliased(MessageRow), aliased(MessageRow)
    if search:  # the text columns are needed only to search them
        q = (
            q.join(reply, reply.id == FeedbackEventRow.reply_id)
            .outerjoin(prompt, prompt.id == reply.parent_id)
            .outerjoin(other, other.id == FeedbackEventRow.other_reply_id)
        )
    return log_filters(q, texts=(reply.content, prompt.content, other.content), kinds=kinds,
                       since=since, until=until, adapter_version=adapter_version,
                       user_id=user_id, search=search)


def count_feedback(
    store: FeedbackStore,
    *,
    kinds: Sequence[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    adapter_version: str | None = None,
    user_id: str | None = None,
    search: str | None = None,
) -> int:
    """How many events ``FeedbackStore.feedback_log`` pages through with these filters."""
    if isinstance(kinds, str):
        kinds = [kinds]
    bad = [k for k in kinds or () if k not in EVENT_KINDS]
    if bad:
        raise InvalidInput(f"unknown feedback kinds {bad}; known: {EVENT_KINDS}")
    since, until = utc(since, "since"), utc(until, "until")
    user_id = check_user(user_id)
    if search is not None:
        search = check_text(search, "search text", max_chars=1000, allow_empty=True).strip()
    q = _log_conditions(select(func.count(FeedbackEventRow.id)), kinds=kinds, since=since,
                        until=until, adapter_version=adapter_version, user_id=user_id,
                        search=search)
    return store.db.run(lambda s: int(s.scalar(q) or 0), write=False)


def feedback_facets(store: FeedbackStore) -> Facets:
    """Distinct adapter versions and voters seen in feedback, and the time span of it."""

    def work(s: Session) -> Facets:
        versions = s.scalars(
            select(FeedbackEventRow.adapter_version).distinct()
            .where(FeedbackEventRow.adapter_version.is_not(None))
            .order_by(FeedbackEventRow.adapter_version).limit(MAX_FACET_VALUES))
        users = s.scalars(
            select(FeedbackEventRow.user_id).distinct()
            .where(FeedbackEventRow.user_id.is_not(None))
            .order_by(FeedbackEventRow.user_id).limit(MAX_FACET_VALUES))
        first, last = s.execute(select(func.min(FeedbackEventRow.created_at),
                                       func.max(FeedbackEventRow.created_at))).one()
        return Facets(tuple(versions), tuple(users), _aware(first), _aware(last))

    return store.db.run(work, write=False)


def _aware(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):  # SQLite's MIN/MAX hand back the stored text
        value = datetime.fromisoformat(value)
    return convert.aware(value)


def conversation_events(store: FeedbackStore, conversation_id: int) -> list[FeedbackEvent]:
    """Every feedback event of a conversation, oldest first (one query for the whole tree)."""
    cid = convert.check_id(conversation_id, "conversation id")

    def work(s: Session) -> list[FeedbackEvent]:
        rows = s.scalars(select(FeedbackEventRow).where(FeedbackEventRow.conversation_id == cid)
                         .order_by(FeedbackEventRow.id))
        return [convert.event(r) for r in rows]

    return store.db.run(work, write=False)


def run_headlines(store: FeedbackStore, *, limit: int = 30) -> list[RunHeadline]:
    """The newest ``limit`` training runs, newest first (a cheap query for a picker)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise InvalidInput("limit must be an integer between 1 and 1000")
    t = TrainingRunRow

    def work(s: Session) -> list[RunHeadline]:
        q = (select(t.id, t.trigger, t.status, t.created_at, t.requested_by,
                    t.candidate_version).order_by(t.id.desc()).limit(limit))
        return [RunHeadline(i, trig, st, convert.aware(c), who, cand)
                for i, trig, st, c, who, cand in s.execute(q)]

    return store.db.run(work, write=False)


def version_summaries(store: FeedbackStore) -> list[VersionSummary]:
    """Every adapter version, oldest first, with its run's row counts and status."""

    def work(s: Session) -> list[VersionSummary]:
        q = (
            select(AdapterVersionRow, TrainingRunRow.kto_rows, TrainingRunRow.dpo_rows,
                   TrainingRunRow.status)
            .outerjoin(TrainingRunRow, TrainingRunRow.id == AdapterVersionRow.run_id)
            .order_by(AdapterVersionRow.created_at, AdapterVersionRow.version)
        )
        return [VersionSummary(convert.version(v), kto, dpo, status)
                for v, kto, dpo, status in s.execute(q)]

    return store.db.run(work, write=False)


__all__ = [
    "BUCKETS", "Facets", "RunHeadline", "VersionSummary", "VersionThumbs", "VolumePoint",
    "conversation_events", "count_feedback", "feedback_facets", "feedback_volume",
    "run_headlines", "thumbs_by_version", "version_summaries",
]
