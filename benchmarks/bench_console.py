"""Operator console speed on a large store: the feedback log's pages, counts and the overview,
with 100,000 feedback events on SQLite and on PostgreSQL.

The store is filled in bulk (Core inserts of 5,000 rows at a time, explicit ids): 25,000
conversations of one question and two sibling replies (a tenth also have an edit), with
four events each (thumbs up, thumbs down, a choice, a comment or an edit) spread over 90
days, nine adapter versions in turn, 500 voters and 50 topics (one rare word in 1 of
1,000 conversations). For each filter of the log, the figures are medians of ``--repeat``
runs, in milliseconds:

* first page = ``feedback_log`` of the newest 50 + building the table rows the page shows;
* count = the "N matching" figure (``reports.count_feedback``), computed with a first page
  (so a filter's first view costs first page + count);
* page 20 = the 20th page reached by keyset paging (the 19 before are walked untimed), or
  the last page when the filter matches fewer (the "page" column says which);
* deep = a page starting below the 5% oldest event ids (as deep as keyset paging goes).

A second table times the overview (volume per day over 90 days, thumbs per version) and
opening one conversation. PostgreSQL: ``--postgres-url`` (an admin URL; default
$FEEDBACK_CHAT_TEST_POSTGRES_URL); the benchmark creates its own database there, runs
ANALYZE after the bulk load (as autovacuum would) and drops the database afterwards.

    python benchmarks/bench_console.py [--events N] [--repeat R] [--postgres-url URL]
                                       [--no-postgres] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import postgres_database  # noqa: E402
from sqlalchemy import insert, text  # noqa: E402

from chat_app.console.context import ConsoleContext  # noqa: E402
from chat_app.console.conversation import conversation_tree, render_conversation  # noqa: E402
from chat_app.console.queries import (  # noqa: E402
    LogFilter,
    LogView,
    fetch_page,
    older_page,
    open_log,
)
from feedback_store import FeedbackStore  # noqa: E402
from feedback_store.models import ConversationRow, FeedbackEventRow, MessageRow  # noqa: E402
from feedback_store.reports import (  # noqa: E402
    count_feedback,
    feedback_facets,
    feedback_volume,
    thumbs_by_version,
)

PG_ENV = "FEEDBACK_CHAT_TEST_POSTGRES_URL"
BATCH = 5000
VERSIONS = ["base"] + [f"v{n:04d}" for n in range(1, 9)]
TOPICS = ["weather", "cooking", "python", "travel", "music", "history", "football", "cats",
          "gardening", "taxes", "chess", "poetry", "physics", "movies", "coffee", "running",
          "painting", "banking", "hiking", "trains", "birds", "jazz", "sushi", "tennis",
          "linux", "baking", "rivers", "castles", "robots", "volcanoes", "planets", "sailing",
          "cheese", "knitting", "guitars", "deserts", "islands", "tea", "bridges", "dogs",
          "glaciers", "opera", "cycling", "forests", "markets", "clocks", "maps", "lamps",
          "kites", "shells"]
DAYS = 90
START = datetime(2026, 8, 1, tzinfo=UTC)


def bulk_load(store: FeedbackStore, events: int) -> dict[str, Any]:
    """Insert ``events`` feedback events (4 per conversation) with Core batch inserts."""
    n_conv = events // 4
    span = timedelta(days=DAYS).total_seconds()
    convs, msgs, evs = [], [], []
    mid = eid = 0
    for c in range(1, n_conv + 1):
        t0 = START + timedelta(seconds=span * (c - 1) / n_conv)
        user = f"user{c % 500}"
        version = VERSIONS[(c - 1) * len(VERSIONS) // n_conv]
        topic = "zebra" if c % 1000 == 0 else TOPICS[c % len(TOPICS)]
        convs.append({"id": c, "created_at": t0, "user_id": user, "source": "ui",
                      "system_prompt": None})
        q, r1, r2 = mid + 1, mid + 2, mid + 3
        base = {"conversation_id": c, "created_at": t0, "generation": None}
        msgs += [
            {**base, "id": q, "parent_id": None, "role": "user", "user_id": user,
             "content": f"Question {c}: tell me something about {topic}, please."},
            {**base, "id": r1, "parent_id": q, "role": "assistant", "origin": "generated",
             "adapter_version": version, "content": f"Here is a fact about {topic} ({c})."},
            {**base, "id": r2, "parent_id": q, "role": "assistant", "origin": "regenerated",
             "source_reply_id": r1, "adapter_version": version,
             "content": f"Another answer about {topic}, number {c}."},
        ]
        mid += 3
        last = {"kind": "comment", "reply_id": r2, "other_reply_id": None,
                "comment": f"nice answer on {topic}"}
        if c % 10 == 0:
            mid += 1
            msgs.append({**base, "id": mid, "parent_id": q, "role": "assistant",
                         "origin": "edit", "source_reply_id": r1, "user_id": user,
                         "content": f"My better answer about {topic}."})
            last = {"kind": "edit", "reply_id": r1, "other_reply_id": mid, "comment": None}
        for i, ev in enumerate([
            {"kind": "up", "reply_id": r2, "other_reply_id": None, "comment": None},
            {"kind": "down", "reply_id": r1, "other_reply_id": None, "comment": None},
            {"kind": "choice", "reply_id": r2, "other_reply_id": r1, "comment": None},
            last,
        ]):
            eid += 1
            evs.append({"id": eid, "conversation_id": c, "adapter_version": version,
                        "user_id": user, "tags": None,
                        "created_at": t0 + timedelta(seconds=i + 1), **ev})
    for m in msgs:
        for key in ("origin", "source_reply_id", "adapter_version", "user_id"):
            m.setdefault(key, None)
    t = time.perf_counter()
    with store.db.engine.begin() as conn:
        for table, rows in ((ConversationRow, convs), (MessageRow, msgs), (FeedbackEventRow, evs)):
            for i in range(0, len(rows), BATCH):
                conn.execute(insert(table.__table__), rows[i: i + BATCH])
        if store.db.engine.dialect.name == "postgresql":
            for name in ("conversations", "messages", "feedback_events"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), "
                                  f"(SELECT max(id) FROM {name}))"))
    if store.db.engine.dialect.name == "postgresql":
        with store.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE"))
    return {"conversations": n_conv, "messages": len(msgs), "events": len(evs),
            "load_seconds": round(time.perf_counter() - t, 2)}


def median_ms(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1000, 1)


def scenarios() -> list[tuple[str, LogFilter]]:
    mid = START + timedelta(days=40)
    week = {"since": mid, "until": mid + timedelta(days=7)}
    return [
        ("no filter", LogFilter()),
        ("kind=edit", LogFilter(kinds=("edit",))),
        ("version=v0003", LogFilter(adapter_version="v0003")),
        ("user=user42", LogFilter(user_id="user42")),
        ("7-day window", LogFilter(**week)),
        ("search 'weather' (2%)", LogFilter(search="weather")),
        ("search 'zebra' (0.1%)", LogFilter(search="zebra")),
        ("up,down+v0004+window", LogFilter(kinds=("up", "down"), adapter_version="v0004",
                                           since=START + timedelta(days=30),
                                           until=START + timedelta(days=45))),
    ]


def bench_backend(name: str, url: str, args: argparse.Namespace) -> tuple[list, list, dict]:
    store = FeedbackStore.open(url)
    try:
        loaded = bulk_load(store, args.events)
        print(f"  {name}: loaded {loaded['events']} events in {loaded['load_seconds']} s",
              file=sys.stderr)
        ctx = ConsoleContext(store=store, retrain_settings=dict,
                             export_dir=Path(tempfile.gettempdir()))
        deep_before = max(1, args.events // 20)
        rows = []
        for label, flt in scenarios():
            open_log(ctx, flt)  # warm the caches once
            first = median_ms(lambda flt=flt: LogView(flt, (None,), *fetch_page(ctx, flt, None),
                                                      0).table, args.repeat)
            count = median_ms(lambda flt=flt: count_feedback(store, **flt.store_kwargs()),
                              args.repeat)
            view = open_log(ctx, flt)
            total = view.total
            while view.page_number < 20 and view.next_before_id is not None:
                view = older_page(ctx, view)
            later = median_ms(lambda v=view: LogView(v.flt, v.cursors, *fetch_page(
                ctx, v.flt, v.cursors[-1]), 0).table, args.repeat)
            deep = median_ms(lambda flt=flt: LogView(flt, (None,), *fetch_page(
                ctx, flt, deep_before), 0).table, args.repeat)
            rows.append({"backend": name, "filter": label, "matching": total,
                         "first_page_ms": first, "count_ms": count,
                         "page": view.page_number, "page_20_ms": later,
                         "deep_page_ms": deep})
            print(f"  {name}: {label} done", file=sys.stderr)
        other = [
            {"backend": name, "what": "volume per day, 90 days",
             "ms": median_ms(lambda: feedback_volume(store, bucket="day",
                                                     since=START - timedelta(days=1)),
                             args.repeat)},
            {"backend": name, "what": "thumbs per version",
             "ms": median_ms(lambda: thumbs_by_version(store), args.repeat)},
            {"backend": name, "what": "filter pickers (facets)",
             "ms": median_ms(lambda: feedback_facets(store), args.repeat)},
            {"backend": name, "what": "open one conversation",
             "ms": median_ms(lambda: render_conversation(conversation_tree(
                 store, args.events // 8)), args.repeat)},
        ]
        return rows, other, loaded
    finally:
        store.close()


def print_tables(rows: list[dict[str, Any]], other: list[dict[str, Any]],
                 notes: list[str]) -> None:
    head = (f"{'backend':<10} {'filter':<22} {'matching':>8} {'first page':>10} "
            f"{'count':>8} {'page':>5} {'page 20':>8} {'deep':>8}   (ms, median)")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['backend']:<10} {r['filter']:<22} {r['matching']:>8} "
              f"{r['first_page_ms']:>10.1f} {r['count_ms']:>8.1f} {r['page']:>5} {r['page_20_ms']:>8.1f} "
              f"{r['deep_page_ms']:>8.1f}")
    print()
    head = f"{'backend':<10} {'overview and conversation':<28} {'ms':>8}"
    print(head)
    print("-" * len(head))
    for r in other:
        print(f"{r['backend']:<10} {r['what']:<28} {r['ms']:>8.1f}")
    for note in notes:
        print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000,
                        help="feedback events to load (a multiple of 4; default 100000)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per figure")
    parser.add_argument("--postgres-url", default=os.environ.get(PG_ENV),
                        help=f"PostgreSQL admin URL (default ${PG_ENV})")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.events < 4000 or args.events % 4:
        parser.error("--events must be a multiple of 4, at least 4000")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    rows: list[dict[str, Any]] = []
    other: list[dict[str, Any]] = []
    loads: dict[str, Any] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        r, o, loads["sqlite"] = bench_backend("sqlite", f"sqlite:///{Path(tmp) / 'f.db'}", args)
        rows, other = rows + r, other + o
    if args.no_postgres or not args.postgres_url:
        notes.append(f"PostgreSQL skipped: no server (set ${PG_ENV} or pass --postgres-url)")
    else:
        with postgres_database(args.postgres_url, "bench_console") as url:
            r, o, loads["postgresql"] = bench_backend("postgresql", url, args)
            rows, other = rows + r, other + o
    for backend, loaded in loads.items():
        notes.append(f"{backend}: bulk load of {loaded['events']} events, "
                     f"{loaded['messages']} messages in {loaded['load_seconds']} s")
    notes.append(f"{os.cpu_count()} CPUs; page size 50; 'count' (the 'N matching' figure) "
                 "is computed once per filter, beside the first page")
    print_tables(rows, other, notes)
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "bench_console", "events": args.events,
                                         "repeat": args.repeat, "log": rows, "other": other,
                                         "loads": loads, "notes": notes}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
