"""Writes that survive retries: a write sent again with the same request id, or retried
by the store after the connection dropped just as its commit went through, is stored
once (on SQLite and on a real PostgreSQL server, whose connection is really cut)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import OperationalError

from feedback_store import Conflict, FeedbackStore, InvalidInput


def _reply(store: FeedbackStore) -> int:
    conv = store.create_conversation(source="api")
    user = store.add_user_message(conversation_id=conv.id, content="Hello?")
    return store.add_reply(content="Hi there.", parent_id=user.id, adapter_version="base").id


@contextmanager
def commit_then_cut(store: FeedbackStore, db_url: str) -> Iterator[list[int]]:
    """The next commit goes through, then the client is told it failed: on PostgreSQL
    the server process of that connection is terminated and the driver's error on the
    dead connection is what the store sees (as when the network drops before the
    commit's answer arrives); on SQLite the commit reports the database locked.
    Yields a list that counts the cuts made."""
    cuts: list[int] = []
    admin = create_engine(db_url) if db_url.startswith("postgresql") else None

    def on_commit(conn) -> None:  # type: ignore[no-untyped-def]
        if cuts:
            return
        cuts.append(1)
        dbapi = conn.connection.dbapi_connection
        dbapi.commit()  # the write is durable from here on
        if admin is None:
            raise OperationalError("COMMIT", None, sqlite3.OperationalError("database is locked"))
        with admin.connect() as c:
            c.execute(text("SELECT pg_terminate_backend(:p)"), {"p": dbapi.info.backend_pid})
        try:  # the client's next word on that connection meets the cut
            dbapi.execute("SELECT 1")
        except Exception as exc:  # psycopg's own OperationalError
            conn.invalidate(exc)
            raise OperationalError("COMMIT", None, exc, connection_invalidated=True) from exc
        raise AssertionError("the connection survived pg_terminate_backend")

    event.listen(store.db.engine, "commit", on_commit)
    try:
        yield cuts
    finally:
        event.remove(store.db.engine, "commit", on_commit)
        if admin is not None:
            admin.dispose()


def test_a_lost_commit_is_retried_without_doubling_a_row(store: FeedbackStore,
                                                        db_url: str) -> None:
    reply_id = _reply(store)
    before = store.counts()["events"]
    # without a request id the store's own retry writes the thumb twice: the test can fail
    with commit_then_cut(store, db_url) as cuts:
        store.rate(reply_id=reply_id, rating="up")
    assert cuts == [1] and store.counts()["events"] == before + 2
    # with one, the retry finds the committed row
    with commit_then_cut(store, db_url) as cuts:
        ev = store.rate(reply_id=reply_id, rating="down", request_id="thumb-1")
    assert cuts == [1] and store.counts()["events"] == before + 3
    assert store.rate(reply_id=reply_id, rating="down", request_id="thumb-1") == ev
    assert store.counts()["events"] == before + 3


def test_every_write_kind_is_stored_once_per_request_id(store: FeedbackStore) -> None:
    conv = store.create_conversation(source="api")
    user = store.add_user_message(conversation_id=conv.id, content="Hi", request_id="u1")
    assert store.add_user_message(conversation_id=conv.id, content="Hi", request_id="u1") == user
    reply = store.add_reply(content="Hello.", parent_id=user.id, request_id="r1")
    assert store.add_reply(content="Hello.", parent_id=user.id, request_id="r1") == reply
    sibling = store.add_reply(content="Hey.", source_reply_id=reply.id, request_id="r2")
    assert store.add_reply(content="Hey.", source_reply_id=reply.id, request_id="r2") == sibling
    edited = store.edit_reply(reply_id=reply.id, content="Hello, friend.", request_id="e1")
    assert store.edit_reply(reply_id=reply.id, content="Hello, friend.",
                            request_id="e1") == edited
    pick = store.choose(chosen_id=sibling.id, rejected_id=reply.id, request_id="c1")
    assert store.choose(chosen_id=sibling.id, rejected_id=reply.id, request_id="c1") == pick
    note = store.comment(reply_id=reply.id, comment="nice", request_id="n1")
    assert store.comment(reply_id=reply.id, comment="nice", request_id="n1") == note
    assert len(store.messages(conv.id)) == 4  # user, reply, sibling, edit
    assert store.counts()["events"] == 3  # edit, choice, comment
    # an id used for another write is refused, and writes nothing
    with pytest.raises(Conflict, match="already used for a different write"):
        store.rate(reply_id=reply.id, rating="up", request_id="n1")
    with pytest.raises(Conflict):
        store.add_user_message(conversation_id=conv.id, content="Hi", request_id="r1")
    with pytest.raises(InvalidInput, match="request id"):
        store.rate(reply_id=reply.id, rating="up", request_id="x" * 101)
    assert store.counts()["events"] == 3


def test_a_database_of_the_first_schema_upgrades_in_place(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from feedback_store.db import Database, current_revision, head_revision, upgrade
    from feedback_store.models import Base

    db = Database(db_url)
    upgrade(db, "0001")
    with db.engine.begin() as c:
        c.execute(text("INSERT INTO conversations (id, created_at, source) "
                       "VALUES (1, CURRENT_TIMESTAMP, 'api')"))
        c.execute(text("INSERT INTO messages (id, conversation_id, role, content, created_at) "
                       "VALUES (1, 1, 'user', 'kept', CURRENT_TIMESTAMP)"))
    db.dispose()
    store = FeedbackStore.open(db_url)  # migrates to the newest schema
    try:
        assert current_revision(store.db) == head_revision() != "0001"
        assert store.get_message(1).content == "kept"
        with store.db.engine.connect() as c:
            assert compare_metadata(MigrationContext.configure(c), Base.metadata) == []
        again = store.add_user_message(conversation_id=1, content="x", request_id="k")
        assert store.add_user_message(conversation_id=1, content="x", request_id="k") == again
    finally:
        store.close()
