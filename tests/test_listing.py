"""The store's conversation list, on SQLite and PostgreSQL: owners, order, titles,
search (case-insensitive, wildcards literal), rename, and deleted chats left out."""

from __future__ import annotations

import pytest

from feedback_store import FeedbackStore, InvalidInput, NotFound


def _chat(store: FeedbackStore, first: str, *, user: str | None = None,
          key: str | None = "browser-1", more: tuple[str, ...] = ()) -> int:
    conv = store.create_conversation(user_id=user, client_key=key)
    parent = None
    for text in (first, *more):
        msg = store.add_user_message(conversation_id=conv.id, content=text, parent_id=parent)
        parent = store.add_reply(parent_id=msg.id, content=f"About {text}").id
    return conv.id


def test_lists_the_owners_live_chats_newest_first_and_searches_them(
        store: FeedbackStore) -> None:
    rice = _chat(store, "How do I cook RICE?", more=("And 100% pasta_ok?",))
    sky = _chat(store, "Why is the sky blue?")
    _chat(store, "Someone else's", key="browser-2")
    _chat(store, "A logged-in user's", user="alice")
    empty = store.create_conversation(client_key="browser-1")  # no message yet: not listed
    listed = store.list_conversations(client_key="browser-1")
    assert [(c.id, c.title, c.messages) for c in listed] == [
        (sky, "Why is the sky blue?", 2), (rice, "How do I cook RICE?", 4)]
    assert listed[0].updated_at >= listed[1].updated_at
    assert empty.id not in {c.id for c in listed}
    assert [c.id for c in store.list_conversations(client_key="browser-1", search="rice")] == [rice]
    assert [c.id for c in store.list_conversations(client_key="browser-1", search="100%")] == [rice]
    assert store.list_conversations(client_key="browser-1", search="100_") == []
    assert store.list_conversations(client_key="browser-1", search="else") == []
    assert [c.title for c in store.list_conversations(user_id="alice")] == ["A logged-in user's"]
    assert store.list_conversations(user_id="alice", client_key="browser-1")[0].title == \
        "A logged-in user's"  # a user name wins over the browser's key
    assert [c.id for c in store.list_conversations(client_key="browser-1", limit=1)] == [sky]


def test_rename_is_searchable_refused_for_others_and_erased_with_the_chat(
        store: FeedbackStore) -> None:
    mine = _chat(store, "Plan a trip")
    theirs = _chat(store, "Theirs", key="browser-2")
    assert store.rename_conversation(mine, "  Trip\tto   Rome ", client_key="browser-1") == \
        "Trip to Rome"
    (row,) = store.list_conversations(client_key="browser-1", search="ROME")
    assert (row.id, row.title, row.renamed) == (mine, "Trip to Rome", True)
    assert store.get_conversation(mine).title == "Trip to Rome"
    with pytest.raises(NotFound):
        store.rename_conversation(theirs, "mine now", client_key="browser-1")
    with pytest.raises(NotFound):
        store.rename_conversation(mine, "x", user_id="alice")
    for bad in ("", "  ", "x" * 201, "a\x00b", 5):
        with pytest.raises(InvalidInput):
            store.rename_conversation(mine, bad, client_key="browser-1")  # type: ignore[arg-type]
    store.delete_conversation(mine, by="browser-1")
    assert store.list_conversations(client_key="browser-1") == []
    assert store.get_conversation(mine).title is None  # the user's words go with the chat
    assert not store.owns_conversation(mine, client_key="browser-1")
    with pytest.raises(NotFound):
        store.rename_conversation(mine, "back", client_key="browser-1")


@pytest.mark.parametrize("kwargs", [{}, {"client_key": ""}, {"client_key": "k" * 201},
                                    {"client_key": "k", "search": "s" * 201},
                                    {"client_key": "k", "limit": 0},
                                    {"client_key": "k", "limit": True}])
def test_bad_list_requests_are_refused(store: FeedbackStore, kwargs: dict) -> None:
    with pytest.raises(InvalidInput):
        store.list_conversations(**kwargs)


def test_feedback_in_version_counts_the_owners_events_in_the_rounds_snapshot(
        store: FeedbackStore) -> None:
    mine = _chat(store, "Rate me")
    (reply,) = [m for m in store.messages(mine) if m.is_reply]
    store.rate(reply_id=reply.id, rating="up")
    store.rate(reply_id=reply.id, rating="down")
    theirs = _chat(store, "Not mine", key="browser-2")
    (other,) = [m for m in store.messages(theirs) if m.is_reply]
    store.rate(reply_id=other.id, rating="up")
    run = store.registry.start_run(trigger="manual")
    store.registry.update_run(run.id, kto_rows=2, dpo_rows=0, last_event_id=store.last_event_id())
    store.rate(reply_id=reply.id, rating="up")  # after the snapshot: not in this version
    store.registry.update_run(run.id, status="succeeded")
    store.registry.register_version(version="v0001", path="/nowhere", run_id=run.id)
    store.registry.register_version(version="v0002", path="/nowhere")  # no round behind it
    got = store.feedback_in_version("v0001", client_key="browser-1")
    assert (got.version, got.ratings, got.yours) == ("v0001", 2, 2)
    assert store.feedback_in_version("v0001", client_key="browser-2").yours == 1
    assert store.feedback_in_version("v0001", user_id="nobody").yours == 0
    assert store.feedback_in_version("v0002", client_key="browser-1") is None
    assert store.feedback_in_version("v0404", client_key="browser-1") is None


def test_the_feedback_log_search_finds_a_vote_by_its_reason(store: FeedbackStore) -> None:
    cid = _chat(store, "Explain tides")
    (reply,) = [m for m in store.messages(cid) if m.is_reply]
    store.rate(reply_id=reply.id, rating="down", tags=["Too long"])
    store.rate(reply_id=reply.id, rating="up")
    found = store.feedback_log(search="too LONG")
    assert [(r.event.kind, r.event.tags) for r in found] == [("down", ("Too long",))]
    assert store.feedback_log(search="Too short") == []
