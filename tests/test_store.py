"""The store's contract: bad input is refused with a typed error and writes nothing;
the operator's feedback log filters and pages; schema upgrades; a database that
cannot be reached gives StoreUnavailable; model text SQL cannot hold is stored with a
replacement character. The registry's own behaviour (versions, activation and rollback,
training runs, service state) is proven in ``test_registry.py``.

Tests taking ``store``/``db_url`` run on a SQLite file and on PostgreSQL.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import fresh_postgres_url
from sqlalchemy import inspect

from feedback_store import (
    FeedbackStore,
    InvalidInput,
    Limits,
    NotFound,
    StoreError,
    StoreUnavailable,
)
from feedback_store.db import Database, current_revision, head_revision, upgrade

# -- bad input: a typed error and nothing written ----------------------------------------

Case = Callable[[FeedbackStore, SimpleNamespace], Any]


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def world(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FeedbackStore, SimpleNamespace]]:
    """One store per backend with a small thread, shared by the bad-input cases
    (each case checks that it wrote nothing, so sharing cannot hide a write)."""
    if request.param == "sqlite":
        urls: Iterator[str] = iter([f"sqlite:///{tmp_path_factory.mktemp('bad') / 'f.db'}"])
    else:
        urls = fresh_postgres_url()
    store = FeedbackStore.open(next(urls))
    conv = store.create_conversation(user_id="alice", system_prompt="sys")
    user = store.add_user_message(conversation_id=conv.id, content="Hello?")
    reply = store.add_reply(parent_id=user.id, content="Hi there.", adapter_version="v0001")
    sibling = store.add_reply(source_reply_id=reply.id, content="Hello!")
    user2 = store.add_user_message(conversation_id=conv.id, content="More?", parent_id=reply.id)
    reply2 = store.add_reply(parent_id=user2.id, content="Sure.")
    other = store.create_conversation()
    other_user = store.add_user_message(conversation_id=other.id, content="Elsewhere")
    other_reply = store.add_reply(parent_id=other_user.id, content="Yes.")
    store.registry.register_version(version="v0001", path="/adapters/v0001")
    run = store.registry.start_run(trigger="test")
    store.registry.update_run(run.id, status="failed", error="boom")
    ids = SimpleNamespace(conv=conv.id, user=user.id, reply=reply.id, sibling=sibling.id,
                          user2=user2.id, reply2=reply2.id, other_reply=other_reply.id,
                          run=run.id, missing=987_654)
    yield store, ids
    store.close()
    for _ in urls:  # drops the PostgreSQL database
        pass


def snapshot(store: FeedbackStore) -> tuple[Any, ...]:
    reg = store.registry
    return (store.counts(), reg.list_versions(), reg.list_runs(), reg.get_state("k"))


def rate(rating: object = "up", **kw: Any) -> Case:
    return lambda s, w: s.rate(**{"reply_id": w.reply, "rating": rating, **kw})


def user_msg(content: object) -> Case:
    return lambda s, w: s.add_user_message(conversation_id=w.conv, content=content,
                                           parent_id=w.reply2)


BAD_INPUT: dict[str, tuple[type[StoreError], Case]] = {
    # unknown ids
    "unknown conversation": (NotFound, lambda s, w: s.add_user_message(
        conversation_id=w.missing, content="x")),
    "unknown parent": (NotFound, lambda s, w: s.add_reply(parent_id=w.missing, content="x")),
    "unknown regenerated reply": (NotFound, lambda s, w: s.add_reply(
        source_reply_id=w.missing, content="x")),
    "unknown reply rated": (NotFound, lambda s, w: s.rate(reply_id=w.missing, rating="up")),
    "unknown reply commented": (NotFound, lambda s, w: s.comment(reply_id=w.missing,
                                                                 comment="x")),
    "unknown reply edited": (NotFound, lambda s, w: s.edit_reply(reply_id=w.missing,
                                                                 content="x")),
    "unknown chosen reply": (NotFound, lambda s, w: s.choose(chosen_id=w.missing,
                                                             rejected_id=w.reply)),
    "unknown rejected reply": (NotFound, lambda s, w: s.choose(chosen_id=w.reply,
                                                               rejected_id=w.missing)),
    "unknown message read": (NotFound, lambda s, w: s.get_message(w.missing)),
    "unknown conversation read": (NotFound, lambda s, w: s.get_conversation(w.missing)),
    "unknown conversation messages": (NotFound, lambda s, w: s.messages(w.missing)),
    "unknown thread": (NotFound, lambda s, w: s.context(w.missing)),
    "unknown siblings": (NotFound, lambda s, w: s.siblings(w.missing)),
    "unknown events": (NotFound, lambda s, w: s.events_for(w.missing)),
    "unknown version activated": (NotFound, lambda s, w: s.registry.activate("v0999")),
    "unknown version read": (NotFound, lambda s, w: s.registry.get_version("v0999")),
    "unknown run updated": (NotFound, lambda s, w: s.registry.update_run(w.missing,
                                                                         status="failed")),
    "unknown run read": (NotFound, lambda s, w: s.registry.get_run(w.missing)),
    # ids that are not positive integers
    **{f"reply id {v!r}": (InvalidInput, lambda s, w, v=v: s.rate(reply_id=v, rating="up"))
       for v in ("abc", 1.5, None, True, 0, -3, "-3", "0", 2**31, 10**20, [1])},
    "negative conversation id": (InvalidInput, lambda s, w: s.get_conversation(-1)),
    "text conversation id": (InvalidInput, lambda s, w: s.add_user_message(
        conversation_id="one", content="x")),
    "negative parent id": (InvalidInput, lambda s, w: s.add_reply(parent_id=-1, content="x")),
    "float chosen id": (InvalidInput, lambda s, w: s.choose(chosen_id=2.0, rejected_id=w.reply)),
    "negative message read": (InvalidInput, lambda s, w: s.get_message(-5)),
    # text
    "empty message": (InvalidInput, user_msg("")),
    "whitespace message": (InvalidInput, user_msg(" \n\t ")),
    "oversized message": (InvalidInput, user_msg("x" * (Limits().max_message_chars + 1))),
    "NUL in message": (InvalidInput, user_msg("a\x00b")),
    "lone surrogate in message": (InvalidInput, user_msg("a\ud800b")),
    "message not text": (InvalidInput, user_msg(42)),
    "oversized system prompt": (InvalidInput, lambda s, w: s.create_conversation(
        system_prompt="x" * (Limits().max_message_chars + 1))),
    "oversized reply": (InvalidInput, lambda s, w: s.add_reply(
        parent_id=w.user, content="x" * (Limits().max_message_chars + 1))),
    "empty comment": (InvalidInput, lambda s, w: s.comment(reply_id=w.reply, comment="  ")),
    "no comment": (InvalidInput, lambda s, w: s.comment(reply_id=w.reply, comment=None)),
    "oversized comment": (InvalidInput, rate(comment="c" * (Limits().max_comment_chars + 1))),
    "NUL in comment": (InvalidInput, rate(comment="bad\x00")),
    "empty edit": (InvalidInput, lambda s, w: s.edit_reply(reply_id=w.reply, content=" ")),
    "oversized edit": (InvalidInput, lambda s, w: s.edit_reply(
        reply_id=w.reply, content="e" * (Limits().max_message_chars + 1))),
    "NUL in user id": (InvalidInput, rate(user_id="al\x00ice")),
    "oversized user id": (InvalidInput, rate(user_id="u" * 201)),
    # ratings
    **{f"rating {v!r}": (InvalidInput, rate(v)) for v in ("UP", "like", "", None, 1, "thumbs")},
    # feedback on something that is not a reply
    "rating a user message": (InvalidInput, lambda s, w: s.rate(reply_id=w.user, rating="up")),
    "commenting a user message": (InvalidInput, lambda s, w: s.comment(reply_id=w.user,
                                                                       comment="x")),
    "editing a user message": (InvalidInput, lambda s, w: s.edit_reply(reply_id=w.user,
                                                                       content="new")),
    "choosing a user message": (InvalidInput, lambda s, w: s.choose(chosen_id=w.user,
                                                                    rejected_id=w.reply)),
    "rejecting a user message": (InvalidInput, lambda s, w: s.choose(chosen_id=w.reply,
                                                                     rejected_id=w.user)),
    "replying to a reply": (InvalidInput, lambda s, w: s.add_reply(parent_id=w.reply,
                                                                   content="x")),
    "regenerating a user message": (InvalidInput, lambda s, w: s.add_reply(
        source_reply_id=w.user, content="x")),
    "user message after a user message": (InvalidInput, lambda s, w: s.add_user_message(
        conversation_id=w.conv, content="x", parent_id=w.user)),
    "parent in another conversation": (InvalidInput, lambda s, w: s.add_user_message(
        conversation_id=w.conv, content="x", parent_id=w.other_reply)),
    # pairs
    "choosing a reply over itself": (InvalidInput, lambda s, w: s.choose(
        chosen_id=w.reply, rejected_id=w.reply)),
    "choosing between non-siblings": (InvalidInput, lambda s, w: s.choose(
        chosen_id=w.reply, rejected_id=w.reply2)),
    "choosing across conversations": (InvalidInput, lambda s, w: s.choose(
        chosen_id=w.reply, rejected_id=w.other_reply)),
    "edit identical to the original": (InvalidInput, lambda s, w: s.edit_reply(
        reply_id=w.reply, content="Hi there.")),
    "edit differing only in outer spaces": (InvalidInput, lambda s, w: s.edit_reply(
        reply_id=w.reply, content="  Hi there.\n")),
    # tags
    "tags as one string": (InvalidInput, rate(tags="rude")),
    "empty tag": (InvalidInput, rate(tags=["ok", ""])),
    "blank tag": (InvalidInput, rate(tags=["   "])),
    "tag not text": (InvalidInput, rate(tags=[1])),
    "oversized tag": (InvalidInput, rate(tags=["t" * 65])),
    "too many tags": (InvalidInput, rate(tags=[f"t{i}" for i in range(21)])),
    "NUL in tag": (InvalidInput, rate(tags=["a\x00"])),
    # reply metadata
    "parent and regenerated reply": (InvalidInput, lambda s, w: s.add_reply(
        parent_id=w.user, source_reply_id=w.reply, content="x")),
    "neither parent nor regenerated reply": (InvalidInput, lambda s, w: s.add_reply(
        content="x")),
    "unknown origin": (InvalidInput, lambda s, w: s.add_reply(parent_id=w.user, content="x",
                                                              origin="magic")),
    "oversized adapter version": (InvalidInput, lambda s, w: s.add_reply(
        parent_id=w.user, content="x", adapter_version="v" * 65)),
    "generation not a mapping": (InvalidInput, lambda s, w: s.add_reply(
        parent_id=w.user, content="x", generation="temperature=1")),  # type: ignore[arg-type]
    "generation not JSON": (InvalidInput, lambda s, w: s.add_reply(
        parent_id=w.user, content="x", generation={"stop": {1, 2}})),
    "negative token count": (InvalidInput, lambda s, w: s.add_reply(
        parent_id=w.user, content="x", prompt_tokens=-1)),
    "oversized finish reason": (InvalidInput, lambda s, w: s.add_reply(
        parent_id=w.user, content="x", finish_reason="f" * 17)),
    "oversized client key": (InvalidInput, lambda s, w: s.create_conversation(
        client_key="k" * 201)),
    "empty source": (InvalidInput, lambda s, w: s.create_conversation(source="")),
    # the feedback log
    "unknown feedback kind": (InvalidInput, lambda s, w: s.feedback_log(kinds=["like"])),
    "one unknown kind among known": (InvalidInput, lambda s, w: s.feedback_log(
        kinds=["up", "bogus"])),
    "log limit 0": (InvalidInput, lambda s, w: s.feedback_log(limit=0)),
    "log limit too large": (InvalidInput, lambda s, w: s.feedback_log(limit=1001)),
    "log before a negative id": (InvalidInput, lambda s, w: s.feedback_log(before_id=-1)),
    "log since not a datetime": (InvalidInput, lambda s, w: s.feedback_log(since="yesterday")),
    # the registry
    "version name without v": (InvalidInput, lambda s, w: s.registry.register_version(
        version="0002", path="/a")),
    "short version name": (InvalidInput, lambda s, w: s.registry.register_version(
        version="v12", path="/a")),
    "version registered active": (InvalidInput, lambda s, w: s.registry.register_version(
        version="v0002", path="/a", status="active")),
    "version metrics not JSON": (InvalidInput, lambda s, w: s.registry.register_version(
        version="v0002", path="/a", metrics={"m": object()})),
    "status set to active": (InvalidInput, lambda s, w: s.registry.set_status("v0001",
                                                                              "active")),
    "unknown run trigger": (InvalidInput, lambda s, w: s.registry.start_run(trigger="cron")),
    "unknown run status": (InvalidInput, lambda s, w: s.registry.update_run(w.run,
                                                                            status="done")),
    "unknown run field": (InvalidInput, lambda s, w: s.registry.update_run(w.run, colour=1)),
    "state not a mapping": (InvalidInput, lambda s, w: s.registry.set_state("k", [1])),
    "state not JSON": (InvalidInput, lambda s, w: s.registry.set_state("k", {"t": object()})),
    "empty state key": (InvalidInput, lambda s, w: s.registry.set_state("", {})),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_raises_its_typed_error_and_writes_nothing(
    world: tuple[FeedbackStore, SimpleNamespace], case: str
) -> None:
    store, ids = world
    error, call = BAD_INPUT[case]
    before = snapshot(store)
    with pytest.raises(error) as info:
        call(store, ids)
    assert type(info.value) is error
    assert str(info.value)  # a message fit to show
    assert snapshot(store) == before


def test_limits_are_configurable_and_the_limit_itself_is_accepted(sqlite_url: str) -> None:
    store = FeedbackStore.open(sqlite_url, limits=Limits(max_message_chars=10,
                                                         max_comment_chars=5))
    try:
        conv = store.create_conversation()
        user = store.add_user_message(conversation_id=conv.id, content="x" * 10)
        with pytest.raises(InvalidInput, match="too long"):
            store.add_user_message(conversation_id=conv.id, content="x" * 11)
        reply = store.add_reply(parent_id=user.id, content="")  # a model may stop at once
        store.rate(reply_id=reply.id, rating="down", comment="12345", tags=[" a ", "a", "b"])
        with pytest.raises(InvalidInput):
            store.rate(reply_id=reply.id, rating="down", comment="123456")
        assert store.events_for(reply.id)[0].tags == ("a", "b")
        assert store.counts() == {"conversations": 1, "messages": 2, "events": 1,
                                  "events.down": 1}
    finally:
        store.close()


# -- the feedback log ------------------------------------------------------------------


def test_feedback_log_filters_by_kind_version_user_text_and_time(store: FeedbackStore) -> None:
    conv = store.create_conversation()
    u1 = store.add_user_message(conversation_id=conv.id, content="Where is the Louvre?")
    r1 = store.add_reply(parent_id=u1.id, content="In Paris.", adapter_version="v0001")
    u2 = store.add_user_message(conversation_id=conv.id, content="Discount?", parent_id=r1.id)
    r2 = store.add_reply(parent_id=u2.id, content="100% off_today", adapter_version="v0002")
    r3 = store.add_reply(source_reply_id=r2.id, content="1000 percent off", adapter_version="v0002")

    up = store.rate(reply_id=r1.id, rating="up", user_id="alice")
    time.sleep(0.05)
    middle = datetime.now(UTC)
    time.sleep(0.05)
    down = store.rate(reply_id=r2.id, rating="down", user_id="bob", comment="Not a real offer")
    note = store.comment(reply_id=r3.id, comment="typo", user_id="bob", tags=["spelling"])
    edited, edit = store.edit_reply(reply_id=r1.id, content="In Paris, on the Seine.",
                                    user_id="alice")
    pick = store.choose(chosen_id=r3.id, rejected_id=r2.id, user_id="carol")

    def ids(**kw: Any) -> list[int]:
        return [row.event.id for row in store.feedback_log(**kw)]

    assert ids() == [pick.id, edit.id, note.id, down.id, up.id]  # newest first
    assert ids(kinds=["up", "down"]) == [down.id, up.id]
    assert ids(kinds="comment") == [note.id]
    assert ids(adapter_version="v0001") == [edit.id, up.id]
    assert ids(adapter_version="v0002") == [pick.id, note.id, down.id]
    assert ids(user_id="bob") == [note.id, down.id]
    assert ids(user_id="bob", kinds=["down"]) == [down.id]
    assert ids(search="louvre") == [edit.id, up.id]  # the prompt, case-insensitive
    assert ids(search="SEINE") == [edit.id]  # the edited (other) reply
    assert ids(search="real offer") == [down.id]  # the comment
    assert ids(search="100%") == [pick.id, down.id]  # a literal %, not a wildcard
    assert ids(search="f_t") == [pick.id, down.id]  # a literal _
    assert ids(search="nothing like this") == []
    assert ids(since=middle) == [pick.id, edit.id, note.id, down.id]
    assert ids(until=middle) == [up.id]
    for same in (middle.astimezone(timezone(timedelta(hours=5, minutes=30))),
                 middle.replace(tzinfo=None)):
        assert ids(since=same) == [pick.id, edit.id, note.id, down.id]
        assert ids(until=same) == [up.id]

    rows = {row.event.id: row for row in store.feedback_log()}
    assert rows[edit.id].reply_content == "In Paris." and rows[edit.id].prompt == u1.content
    assert rows[edit.id].other_content == edited.content
    assert rows[down.id].event.comment == "Not a real offer"
    assert rows[down.id].reply_adapter_version == "v0002"
    assert rows[note.id].event.tags == ("spelling",)
    assert rows[pick.id].other_content == "100% off_today"


def test_feedback_log_keyset_paging_returns_every_row_once(store: FeedbackStore) -> None:
    conv = store.create_conversation()
    user = store.add_user_message(conversation_id=conv.id, content="Q")
    replies = [store.add_reply(parent_id=user.id, content=f"A{i}").id for i in range(3)]
    made = []
    for i in range(23):
        made.append(store.rate(reply_id=replies[i % 3], rating="up" if i % 4 else "down",
                               user_id=f"user{i % 5}").id)
    made.append(store.comment(reply_id=replies[0], comment="fine").id)

    def pages(**kw: Any) -> list[list[int]]:
        out, before = [], None
        while True:
            page = [r.event.id for r in store.feedback_log(before_id=before, limit=5, **kw)]
            if not page:
                return out
            out.append(page)
            before = page[-1]

    got = pages()
    assert [len(p) for p in got] == [5, 5, 5, 5, 4]
    flat = [i for p in got for i in p]
    assert flat == sorted(made, reverse=True)
    ups = [i for p in pages(kinds=["up"]) for i in p]
    assert ups == sorted((e for i, e in enumerate(made[:23]) if i % 4), reverse=True)
    assert len(ups) == store.counts()["events.up"] == 17


# -- migrations ------------------------------------------------------------------------


def test_upgrade_is_idempotent_and_reaches_head(db_url: str) -> None:
    db = Database(db_url)
    try:
        assert current_revision(db) is None
        upgrade(db)
        assert current_revision(db) == head_revision() is not None
        tables = set(inspect(db.engine).get_table_names())
        assert {"conversations", "messages", "feedback_events", "adapter_versions",
                "training_runs", "service_state"} <= tables
        store = FeedbackStore(db)
        conv = store.create_conversation(system_prompt="kept")
        upgrade(db)
        upgrade(db)
        assert current_revision(db) == head_revision()
        reopened = FeedbackStore.open(db_url)
        assert reopened.get_conversation(conv.id).system_prompt == "kept"
        reopened.close()
    finally:
        db.dispose()


# -- an unreachable database -------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sqlite_folder_that_cannot_be_created_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for url in (f"sqlite:///{blocker}/sub/feedback.db", f"sqlite:///{blocker}/feedback.db"):
        for migrate in (True, False):
            with pytest.raises(StoreUnavailable, match="cannot create the database folder"):
                FeedbackStore.open(url, migrate=migrate)


def test_sqlite_path_that_is_a_folder_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="unable to open"):
        FeedbackStore.open(f"sqlite:///{tmp_path}")
    store = FeedbackStore.open(f"sqlite:///{tmp_path}", migrate=False, retry_seconds=0.2)
    try:
        with pytest.raises(StoreUnavailable):
            store.create_conversation()
        with pytest.raises(StoreUnavailable):
            store.db.ping()
    finally:
        store.close()


def test_postgres_on_a_closed_port_is_unavailable() -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/feedback"
    with pytest.raises(StoreUnavailable, match="unavailable"):
        FeedbackStore.open(url)
    store = FeedbackStore.open(url, migrate=False, retry_seconds=0.3)
    try:
        with pytest.raises(StoreUnavailable, match="Connection refused"):
            store.create_conversation()
        with pytest.raises(StoreUnavailable):
            store.counts()
        with pytest.raises(StoreUnavailable):
            store.registry.start_run(trigger="test")
    finally:
        store.close()


def test_model_text_that_sql_cannot_hold_is_stored_with_a_replacement_character(store):
    conv = store.create_conversation()
    q = store.add_user_message(conversation_id=conv.id, content="hi")
    reply = store.add_reply(parent_id=q.id, content="a\x00b\ud800c")
    assert store.get_message(reply.id).content == "a\ufffdb?c"
