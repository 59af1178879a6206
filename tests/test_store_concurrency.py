"""Many writers at once lose nothing; a writer killed mid-stream loses nothing it
reported committed; many processes may open (and migrate) a fresh database at once.

Threads share one store (one engine, as the web server does); processes are real
subprocesses running a small writer script, each with its own engine.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from sqlalchemy.engine import make_url

from feedback_store import FeedbackStore
from feedback_store.db import current_revision, head_revision

REPO = Path(__file__).resolve().parent.parent

# A writer process: says "ready" once imported, waits for the go file, opens (and
# migrates) the store; then each of its threads stores a conversation turn and rates
# the reply again and again, printing each committed event id (flushed) as "id <n>".
# A negative count writes until killed.
WRITER = r"""
import sys, threading, time
from pathlib import Path
from feedback_store import FeedbackStore

url, go, n_writes, n_threads = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print("ready", flush=True)
while go.name != "-" and not go.exists():
    time.sleep(0.005)
store = FeedbackStore.open(url)
out = threading.Lock()

def write(t):
    conv = store.create_conversation(user_id=f"thread{t}")
    user = store.add_user_message(conversation_id=conv.id, content=f"question {t}")
    reply = store.add_reply(parent_id=user.id, content=f"answer {t}")
    i = 0
    while n_writes < 0 or i < n_writes:
        ev = store.rate(reply_id=reply.id, rating="up" if i % 2 else "down",
                        user_id=f"p{t}-{i}", comment="crash test" if i % 3 == 0 else None)
        with out:
            sys.stdout.write(f"id {ev.id}\n")
            sys.stdout.flush()
        i += 1

threads = [threading.Thread(target=write, args=(t,)) for t in range(n_threads)]
for th in threads:
    th.start()
for th in threads:
    th.join()
print("done", flush=True)
"""


def writer_cmd(tmp_path: Path, url: str, go: str, writes: int, threads: int) -> list[str]:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return [sys.executable, str(script), url, go, str(writes), str(threads)]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def seed_replies(store: FeedbackStore, n: int) -> list[int]:
    conv = store.create_conversation()
    user = store.add_user_message(conversation_id=conv.id, content="Q")
    return [store.add_reply(parent_id=user.id, content=f"answer {i}").id for i in range(n)]


def test_sixteen_threads_writing_at_once_lose_nothing(store: FeedbackStore) -> None:
    replies = seed_replies(store, 4)
    n_threads, per_thread = 16, 15
    barrier = threading.Barrier(n_threads)
    made: list[list[int]] = [[] for _ in range(n_threads)]
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                reply = replies[(t + i) % len(replies)]
                if i % 5 == 4:  # a new turn and reply too, not only events
                    conv = store.create_conversation(user_id=f"t{t}")
                    user = store.add_user_message(conversation_id=conv.id, content=f"q{t}.{i}")
                    reply = store.add_reply(parent_id=user.id, content=f"a{t}.{i}").id
                rating = "up" if (t + i) % 2 else "down"
                made[t].append(store.rate(reply_id=reply, rating=rating, user_id=f"t{t}").id)
                if i % 3 == 0:
                    made[t].append(store.comment(reply_id=reply, comment=f"c{t}.{i}").id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()

    assert errors == []
    ids = [i for per in made for i in per]
    assert len(ids) == len(set(ids)) == n_threads * (per_thread + 5)
    counts = store.counts()
    new_turns = n_threads * 3
    assert counts["events"] == len(ids)
    assert counts["events.up"] + counts["events.down"] == n_threads * per_thread
    assert counts["events.comment"] == n_threads * 5
    assert counts["conversations"] == 1 + new_turns
    assert counts["messages"] == 1 + len(replies) + 2 * new_turns
    logged = {row.event.id for row in store.feedback_log(limit=1000)}
    assert logged == set(ids)


def test_eight_engines_open_a_fresh_database_at_once(db_url: str) -> None:
    """Eight stores (each its own engine and connections, as separate machines would
    have) migrate the same empty database at the same moment; all succeed."""
    barrier = threading.Barrier(8)
    opened: list[FeedbackStore] = []
    errors: list[BaseException] = []

    def open_and_write(i: int) -> None:
        try:
            barrier.wait()
            store = FeedbackStore.open(db_url)
            opened.append(store)
            store.create_conversation(user_id=f"engine{i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_and_write, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert errors == []
        assert current_revision(opened[0].db) == head_revision()
        assert opened[0].counts()["conversations"] == 8
    finally:
        for store in opened:
            store.close()


def test_four_processes_open_a_fresh_sqlite_file_at_once_and_write_without_loss(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Every process migrates the empty file at the same moment, then writes."""
    db_url = sqlite_url
    n_procs, n_threads, writes = 4, 2, 25
    go = tmp_path / "go"
    procs = [subprocess.Popen(writer_cmd(tmp_path, db_url, str(go), writes, n_threads),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=child_env()) for _ in range(n_procs)]
    for p in procs:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    reported: list[int] = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert out.rstrip().endswith("done")
        reported += [int(line.split()[1]) for line in out.splitlines() if line.startswith("id ")]

    turns = n_procs * n_threads
    assert len(reported) == len(set(reported)) == turns * writes
    store = FeedbackStore.open(db_url, migrate=False)
    try:
        assert current_revision(store.db) == head_revision()
        counts = store.counts()
        assert (counts["conversations"], counts["messages"]) == (turns, 2 * turns)
        assert counts["events"] == len(reported)
        commented = store.feedback_log(search="crash test", limit=1000)
        assert len(commented) == turns * len(range(0, writes, 3))
        assert {row.event.id for row in store.feedback_log(limit=1000)} == set(reported)
    finally:
        store.close()


def test_a_writer_killed_mid_stream_loses_nothing_it_reported(
    db_url: str, tmp_path: Path
) -> None:
    proc = subprocess.Popen(writer_cmd(tmp_path, db_url, "-", -1, 4),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env())
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    reported: list[int] = []
    deadline = time.monotonic() + 120
    while len(reported) < 60 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        reported.append(int(line.split()[1]))
    os.kill(proc.pid, signal.SIGKILL)  # mid-stream: its threads are inside transactions
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    reported += [int(line.split()[1]) for line in rest.splitlines(keepends=True)
                 if line.startswith("id ") and line.endswith("\n")]
    assert len(reported) >= 60

    after = FeedbackStore.open(db_url)
    try:
        stored = {row.event.id for row in after.feedback_log(limit=1000)}
        assert set(reported) <= stored
        assert after.counts()["events"] == len(stored)
        # the database still takes writes
        reply = after.feedback_log(limit=1)[0].event.reply_id
        assert after.rate(reply_id=reply, rating="up").id > max(stored)
    finally:
        after.close()
    if db_url.startswith("sqlite"):
        conn = sqlite3.connect(make_url(db_url).database)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        finally:
            conn.close()
