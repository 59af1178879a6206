"""Feedback store write speed: thumbs per second and the latency of one write, with 1, 8
and 32 writer threads sharing one store, on SQLite and on PostgreSQL.

One write is ``store.rate(reply_id=..., rating=..., user_id=...)`` on replies that
already exist: one committed transaction (read the reply, insert the event), as the
web server does for each click. Figures per (backend, threads):

* writes/s = writes committed / wall time from the common start to the last commit;
* p50 / p99 = the 50th / 99th percentile (nearest rank) of one call's wall time, waits
  for a pooled connection and for the database's write lock included;
* x vs 1 = writes/s over the same backend's 1-thread writes/s, in the same run.

After each run the store's event count must have grown by exactly the writes made;
a mismatch or any error is reported (and makes the exit status 1).

PostgreSQL: ``--postgres-url`` (an admin URL; default $FEEDBACK_CHAT_TEST_POSTGRES_URL,
e.g. from ``deploy/test-postgres.sh start DIR PORT``); the benchmark creates its own
database there and drops it afterwards. Without one, PostgreSQL is skipped with a note.

    python benchmarks/bench_store.py [--seconds S | --writes N] [--threads 1,8,32]
                                     [--postgres-url URL] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import postgres_database  # noqa: E402

from feedback_store import FeedbackStore  # noqa: E402

PG_ENV = "FEEDBACK_CHAT_TEST_POSTGRES_URL"


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q% of values <= it."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n * q / 100)
    return sorted_values[int(rank) - 1]


def seed(store: FeedbackStore, conversations: int, replies_each: int) -> list[int]:
    """Conversations with one user turn and a few sibling replies; returns the reply ids."""
    ids = []
    for c in range(conversations):
        conv = store.create_conversation(user_id=f"seed{c}", system_prompt="Be brief.")
        user = store.add_user_message(conversation_id=conv.id, content=f"Question {c}?")
        first = store.add_reply(parent_id=user.id, content=f"Answer {c}.",
                                adapter_version="v0001", generation={"temperature": 0.7})
        ids.append(first.id)
        for r in range(1, replies_each):
            ids.append(store.add_reply(source_reply_id=first.id, content=f"Answer {c}.{r}",
                                       adapter_version="v0001").id)
    return ids


def run_writers(store: FeedbackStore, replies: list[int], threads: int, *,
                seconds: float | None, writes: int | None) -> dict[str, Any]:
    """``threads`` writers start together and rate random replies until ``seconds`` pass
    (or ``writes`` in all are made); returns the figures of this run."""
    per_thread = None
    if writes is not None:
        per_thread = [writes // threads + (1 if t < writes % threads else 0)
                      for t in range(threads)]
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[str] = []
    barrier = threading.Barrier(threads + 1)
    state: dict[str, float] = {}

    def writer(t: int) -> None:
        rng = random.Random(t)
        mine = latencies[t]
        barrier.wait()
        deadline = state["start"] + seconds if seconds is not None else float("inf")
        i = 0
        while True:
            if per_thread is not None and i >= per_thread[t]:
                break
            t0 = time.perf_counter()
            if per_thread is None and t0 >= deadline:
                break
            try:
                store.rate(reply_id=rng.choice(replies), rating=rng.choice(("up", "down")),
                           user_id=f"bench{t}", tags=["bench"] if i % 10 == 0 else None)
            except Exception as exc:  # noqa: BLE001 - counted and shown, never hidden
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
            else:
                mine.append(time.perf_counter() - t0)
            i += 1
        state[f"end{t}"] = time.perf_counter()

    before = store.counts()["events"]
    pool = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    state["start"] = time.perf_counter()
    barrier.wait()
    for th in pool:
        th.join()
    wall = max(state[f"end{t}"] for t in range(threads)) - state["start"]
    flat = sorted(x for per in latencies for x in per)
    committed = store.counts()["events"] - before
    return {
        "threads": threads,
        "writes": len(flat),
        "seconds": round(wall, 3),
        "writes_per_s": round(len(flat) / wall, 1) if wall > 0 else None,
        "p50_ms": round(percentile(flat, 50) * 1000, 2),
        "p99_ms": round(percentile(flat, 99) * 1000, 2),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "events_committed": committed,
        "count_ok": committed == len(flat),
    }


def bench_backend(name: str, url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    store = FeedbackStore.open(url)
    try:
        replies = seed(store, args.conversations, 3)
        # warm the pool and the caches so the first configuration is not penalised
        run_writers(store, replies, max(args.threads), seconds=None, writes=max(args.threads) * 3)
        rows = []
        for n in args.threads:
            row = {"backend": name, **run_writers(store, replies, n, seconds=args.seconds,
                                                  writes=args.writes)}
            rows.append(row)
            print(f"  {name}: {n} threads done ({row['writes']} writes)", file=sys.stderr)
        base = next((r["writes_per_s"] for r in rows if r["threads"] == 1), None)
        for r in rows:
            r["x_vs_1_thread"] = round(r["writes_per_s"] / base, 2) if base else None
        return rows
    finally:
        store.close()


def print_table(rows: list[dict[str, Any]], notes: list[str]) -> None:
    head = f"{'backend':<10} {'threads':>7} {'writes':>7} {'seconds':>8} {'writes/s':>9} " \
           f"{'x vs 1':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'count':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = f"{r['x_vs_1_thread']:.2f}" if r["x_vs_1_thread"] is not None else "-"
        print(f"{r['backend']:<10} {r['threads']:>7} {r['writes']:>7} {r['seconds']:>8.2f} "
              f"{r['writes_per_s']:>9.1f} {ratio:>7} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
              f"{r['errors']:>6} {'ok' if r['count_ok'] else 'LOST':>6}")
    for note in notes:
        print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bound = parser.add_mutually_exclusive_group()
    bound.add_argument("--seconds", type=float, default=None,
                       help="run each configuration this long (default 4)")
    bound.add_argument("--writes", type=int, default=None,
                       help="make exactly this many writes per configuration instead")
    parser.add_argument("--threads", default="1,8,32",
                        help="comma-separated writer thread counts (default 1,8,32)")
    parser.add_argument("--conversations", type=int, default=100,
                        help="seeded conversations (3 replies each) the writes are spread on")
    parser.add_argument("--postgres-url", default=os.environ.get(PG_ENV),
                        help=f"PostgreSQL admin URL (default ${PG_ENV})")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    try:
        args.threads = [int(x) for x in args.threads.split(",") if x.strip()]
    except ValueError:
        parser.error("--threads takes integers such as 1,8,32")
    problems = []
    if not args.threads or min(args.threads) < 1:
        problems.append("--threads needs positive counts")
    if args.writes is not None and args.writes < max(args.threads or [1]):
        problems.append("--writes must be at least the largest thread count")
    if args.seconds is not None and args.seconds <= 0:
        problems.append("--seconds must be positive")
    if args.conversations < 1:
        problems.append("--conversations must be positive")
    if problems:
        parser.error("; ".join(problems))
    if args.seconds is None and args.writes is None:
        args.seconds = 4.0

    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        rows += bench_backend("sqlite", f"sqlite:///{Path(tmp) / 'feedback.db'}", args)
    if args.no_postgres or not args.postgres_url:
        notes.append(f"PostgreSQL skipped: no server (set ${PG_ENV} or pass --postgres-url)")
    else:
        with postgres_database(args.postgres_url, "bench_store") as url:
            rows += bench_backend("postgresql", url, args)

    notes.append(f"{os.cpu_count()} CPUs; one engine per backend shared by all threads "
                 "(SQLite: a pool of at most 15 connections, writes serialised by the file "
                 "lock; PostgreSQL: at most 50)")
    print_table(rows, notes)
    if args.json:
        bound_desc = {"seconds": args.seconds} if args.writes is None else {"writes": args.writes}
        args.json.write_text(json.dumps(
            {"benchmark": "bench_store", "write": "store.rate on an existing reply",
             **bound_desc, "threads": args.threads, "results": rows, "notes": notes},
            indent=2))
    bad = [r for r in rows if r["errors"] or not r["count_ok"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
