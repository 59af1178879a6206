"""The feedback log: filters typed by an operator, keyset pages, and exports of the view.

A ``LogView`` is what one browser tab looks at: the filter, the stack of page cursors
that led to the current page (so "newer" goes back exactly), the page's rows and the
number of matching events. Pages come from ``FeedbackStore.feedback_log`` (newest
first; the next page starts below the last row's event id), so a page deep in 100,000
events costs what the first one does.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from feedback_store import FeedbackLogRow, RowFilter
from feedback_store.export import rows_for, write_jsonl
from feedback_store.records import EVENT_KINDS
from feedback_store.reports import count_feedback

from .context import ConsoleContext, ConsoleError

TABLE_HEADERS = ["event", "time (UTC)", "kind", "user", "version", "prompt", "reply",
                 "comment / other reply", "conversation"]
CELL_CHARS = 160
EXPORT_KINDS = ("kto", "dpo")


@dataclass(frozen=True)
class LogFilter:
    """Filters of the feedback log; every field optional, all combined with AND."""

    kinds: tuple[str, ...] = ()
    since: datetime | None = None  # created at or after (UTC)
    until: datetime | None = None  # created before (UTC)
    adapter_version: str | None = None
    user_id: str | None = None
    search: str | None = None

    def store_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``feedback_log`` and ``count_feedback``."""
        return {"kinds": list(self.kinds) or None, "since": self.since, "until": self.until,
                "adapter_version": self.adapter_version, "user_id": self.user_id,
                "search": self.search}


@dataclass(frozen=True)
class LogView:
    flt: LogFilter
    cursors: tuple[int | None, ...]  # before_id of each page from the first to this one
    rows: tuple[FeedbackLogRow, ...]
    next_before_id: int | None  # None: this is the last page
    total: int

    @property
    def page_number(self) -> int:
        return len(self.cursors)

    @property
    def table(self) -> list[list[Any]]:
        return [table_row(r) for r in self.rows]

    def describe(self) -> str:
        if not self.rows:
            return "No feedback matches these filters." if self.total == 0 else "No more events."
        tail = "" if self.next_before_id else " (last page)"
        return (f"Page {self.page_number}: events #{self.rows[0].event.id} to "
                f"#{self.rows[-1].event.id}, newest first; {self.total} matching in all{tail}")


@dataclass(frozen=True)
class ExportResult:
    path: Path
    kind: str
    rows: int
    applied: tuple[str, ...]
    not_applied: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        text = f"Wrote {self.rows} {self.kind.upper()} rows"
        text += f" (filters applied: {', '.join(self.applied)})." if self.applied else \
            " (no filter applied: every event)."
        if self.not_applied:
            text += " Not applied to the export: " + "; ".join(self.not_applied) + "."
        return text


def _clip(text: str | None, limit: int = CELL_CHARS) -> str:
    if not text:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def table_row(r: FeedbackLogRow) -> list[Any]:
    """One row of the log table (cells are plain text; the page shows them as text)."""
    ev = r.event
    extra = ev.comment or ""
    if r.other_content is not None:
        label = "edited to" if ev.kind == "edit" else "over"
        extra = f"{label}: {r.other_content}" + (f" | {ev.comment}" if ev.comment else "")
    if ev.tags:
        extra += f" [{', '.join(ev.tags)}]"
    return [ev.id, ev.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"), ev.kind,
            ev.user_id or "", r.reply_adapter_version or "", _clip(r.prompt), _clip(r.reply_content),
            _clip(extra), ev.conversation_id]


def parse_time(text: str | None, what: str, *, end_of_day: bool = False) -> datetime | None:
    """An ISO date or date-time typed by an operator (naive means UTC); '' is None.

    With ``end_of_day`` a bare date means the end of that day (an inclusive "until").
    """
    text = (text or "").strip()
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("/", "-"))
    except ValueError:
        raise ConsoleError(f"{what}: {text!r} is not a date like 2026-11-21 or "
                           "2026-11-21 14:30") from None
    if end_of_day and len(text) <= 10:
        value += timedelta(days=1)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def parse_filter(
    kinds: Sequence[str] | None = None,
    since: str | None = None,
    until: str | None = None,
    adapter_version: str | None = None,
    user: str | None = None,
    search: str | None = None,
) -> LogFilter:
    """Build a LogFilter from the page's inputs; raise ConsoleError listing every problem.

    ``until`` given as a bare date includes that whole day.
    """
    problems = []
    kinds = tuple(kinds or ())
    bad = [k for k in kinds if k not in EVENT_KINDS]
    if bad:
        problems.append(f"unknown kinds {bad}; known: {', '.join(EVENT_KINDS)}")
    times = {}
    for name, raw, end in (("since", since, False), ("until", until, True)):
        try:
            times[name] = parse_time(raw, name, end_of_day=end)
        except ConsoleError as exc:
            problems += exc.problems
    if times.get("since") and times.get("until") and times["since"] >= times["until"]:
        problems.append("since must be before until")
    search = (search or "").strip() or None
    if search is not None and len(search) > 1000:
        problems.append("search text is longer than 1000 characters")
    if problems:
        raise ConsoleError(problems)
    return LogFilter(kinds=kinds, since=times.get("since"), until=times.get("until"),
                     adapter_version=(adapter_version or "").strip() or None,
                     user_id=(user or "").strip() or None, search=search)


def fetch_page(ctx: ConsoleContext, flt: LogFilter, before_id: int | None,
               ) -> tuple[tuple[FeedbackLogRow, ...], int | None]:
    """(rows of the page below ``before_id``, the next page's before_id or None)."""
    rows = ctx.store.feedback_log(**flt.store_kwargs(), before_id=before_id,
                                  limit=ctx.page_size + 1)
    more = len(rows) > ctx.page_size
    rows = rows[: ctx.page_size]
    return tuple(rows), (rows[-1].event.id if more and rows else None)


def open_log(ctx: ConsoleContext, flt: LogFilter) -> LogView:
    """The first (newest) page of events matching ``flt``, with the matching count."""
    rows, nxt = fetch_page(ctx, flt, None)
    total = count_feedback(ctx.store, **flt.store_kwargs())
    return LogView(flt=flt, cursors=(None,), rows=rows, next_before_id=nxt, total=total)


def older_page(ctx: ConsoleContext, view: LogView) -> LogView:
    """The next page (older events); the same view when this is the last page."""
    if view.next_before_id is None:
        return view
    rows, nxt = fetch_page(ctx, view.flt, view.next_before_id)
    return replace(view, cursors=(*view.cursors, view.next_before_id), rows=rows,
                   next_before_id=nxt)


def newer_page(ctx: ConsoleContext, view: LogView) -> LogView:
    """The page before this one (newer events); the first page stays the first page."""
    cursors = view.cursors[:-1] or (None,)
    rows, nxt = fetch_page(ctx, view.flt, cursors[-1])
    return replace(view, cursors=cursors, rows=rows, next_before_id=nxt)


def export_filter(flt: LogFilter) -> tuple[RowFilter, tuple[str, ...], tuple[str, ...]]:
    """Map the log's filter onto the dataset builders' RowFilter.

    Returns (RowFilter, applied, not_applied): ``since`` and the adapter version map;
    kinds, ``until``, user and search do not (the dataset rules decide which events make
    rows: KTO rows come from thumbs, DPO rows from edits and choices).
    """
    applied, not_applied = [], []
    if flt.since is not None:
        applied.append(f"since {flt.since:%Y-%m-%d %H:%M:%S} UTC")
    if flt.adapter_version is not None:
        applied.append(f"adapter version {flt.adapter_version}")
    if flt.kinds:
        not_applied.append("kind (KTO rows come from thumbs, DPO rows from edits and choices)")
    if flt.until is not None:
        not_applied.append("until")
    if flt.user_id is not None:
        not_applied.append("user")
    if flt.search is not None:
        not_applied.append("text search")
    return (RowFilter(since=flt.since, adapter_version=flt.adapter_version), tuple(applied),
            tuple(not_applied))


def export_view(ctx: ConsoleContext, flt: LogFilter, kind: str) -> ExportResult:
    """Write the rows ``feedback-chat export --kind KIND`` writes for the mappable filters
    to a new JSONL file in ``ctx.export_dir`` (files older than a day are removed)."""
    if kind not in EXPORT_KINDS:
        raise ConsoleError(f"export kind must be kto or dpo, not {kind!r}")
    row_filter, applied, not_applied = export_filter(flt)
    rows = rows_for(ctx.store, kind, row_filter)
    ctx.export_dir.mkdir(parents=True, exist_ok=True)
    _prune(ctx.export_dir, ctx.export_max_age_seconds)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = ctx.export_dir / f"feedback-{kind}-{stamp}-{uuid.uuid4().hex[:8]}.jsonl"
    n = write_jsonl(rows, path)
    return ExportResult(path=path, kind=kind, rows=n, applied=applied, not_applied=not_applied)


def _prune(folder: Path, max_age: float) -> None:
    cutoff = time.time() - max_age
    for old in folder.glob("feedback-*.jsonl"):
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:
            pass  # another export removed it first
