"""Deleting a conversation, and forgetting a user: gone from every view, from the next
round's training rows and from exports; a record of the deletion stays, without text
(on SQLite and PostgreSQL, and through the command line)."""

from __future__ import annotations

import json

import pytest
from feedback_data import seed_preferences

from chat_app.cli import main as cli_main
from feedback_store import FeedbackStore, NotFound, build_dpo_rows, build_kto_rows
from feedback_store.export import export
from feedback_store.threads import append_turns


def _texts(rows: list[dict]) -> str:
    return json.dumps(rows)


def test_a_deleted_conversation_leaves_views_training_rows_and_exports(
        store: FeedbackStore, tmp_path) -> None:
    seed_preferences(store, rounds=2)  # user0 and user1, 8 conversations each
    conv_id = store.feedback_log(limit=1)[0].event.conversation_id
    target = store.get_conversation(conv_id)
    question = store.messages(conv_id)[0].content
    reply = next(m for m in store.messages(conv_id) if m.is_reply)
    before_kto, before_dpo = build_kto_rows(store), build_dpo_rows(store)
    assert any(r["prompt"][-1]["content"] == question for r in before_kto)

    other = "user1" if target.user_id == "user0" else "user0"
    with pytest.raises(NotFound):  # someone else's: refused as if it did not exist
        store.delete_conversation(conv_id, by=other, owner=other)
    done = store.delete_conversation(conv_id, by=target.user_id, owner=target.user_id)
    assert done["messages"] >= 3 and done["events"] >= 3
    assert store.delete_conversation(conv_id, by="ops") == {"messages": 0, "events": 0}

    kto, dpo = build_kto_rows(store), build_dpo_rows(store)
    assert len(kto) < len(before_kto) and len(dpo) < len(before_dpo)
    asked = [r for r in before_kto + before_dpo if r["prompt"][-1]["content"] == question]
    left = [r for r in kto + dpo if r["prompt"][-1]["content"] == question]
    assert len(left) < len(asked)  # the other user asked it too; this conversation is gone
    assert not [e for e in store.feedback_log(limit=500) if e.event.conversation_id == conv_id]
    export(store, kind="kto", out=tmp_path / "kto.jsonl")
    exported = (tmp_path / "kto.jsonl").read_text().splitlines()
    assert len(exported) == len(kto)

    record = store.get_conversation(conv_id)
    assert record.deleted_by == target.user_id and record.deleted_at is not None
    assert record.system_prompt is None and store.messages(conv_id) == []
    assert [c.id for c in store.deletions()] == [conv_id]
    from chat_app.console.conversation import conversation_tree, render_conversation

    page = render_conversation(conversation_tree(store, conv_id))
    assert "<b>Deleted</b>" in page and question not in page
    with pytest.raises(NotFound, match="was deleted"):
        store.add_user_message(conversation_id=conv_id, content="still there?")
    with pytest.raises(NotFound, match="was deleted"):
        append_turns(store, turns=[("user", "hello?")], conversation_id=conv_id)
    with pytest.raises(NotFound):
        store.rate(reply_id=reply.id, rating="up")


def test_forgetting_a_user_deletes_all_they_wrote(store: FeedbackStore, db_url: str,
                                                  capsys) -> None:
    seed_preferences(store, rounds=2)
    mine = {c.id for c in _conversations(store, "user0")}
    assert len(mine) == 8
    assert cli_main(["users", "forget", "user0", "--database-url", db_url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("forgot user0: 8 conversations, ")
    assert {c.id for c in store.deletions(limit=100)} == mine
    assert all(r["prompt"] for r in build_kto_rows(store))
    users = {e.event.user_id for e in store.feedback_log(limit=1000)}
    assert users == {"user1"}
    assert cli_main(["conversations", "deleted", "--database-url", db_url]) == 0
    assert capsys.readouterr().out.count("user=user0") == 8
    one = next(iter({c.id for c in _conversations(store, "user1")}))
    assert cli_main(["conversations", "delete", str(one), "--database-url", db_url]) == 0
    assert f"conversation {one} deleted" in capsys.readouterr().out
    assert cli_main(["conversations", "delete", "999999", "--database-url", db_url]) == 1


def _conversations(store: FeedbackStore, user: str) -> list:  # type: ignore[type-arg]
    ids = {e.event.conversation_id for e in store.feedback_log(limit=1000)}
    return [c for c in (store.get_conversation(i) for i in sorted(ids)) if c.user_id == user]


def test_a_browser_without_a_login_deletes_only_the_chats_it_started(
        store: FeedbackStore) -> None:
    mine = store.create_conversation(client_key="browser-1")
    signed_in = store.create_conversation(user_id="alice", client_key="browser-1")
    store.add_user_message(conversation_id=mine.id, content="mine")
    for conv, key in ((mine.id, "browser-2"), (signed_in.id, "browser-1")):
        with pytest.raises(NotFound):  # another browser's, or a signed-in user's
            store.delete_conversation(conv, by=key, client_key=key)
    assert store.messages(mine.id)  # nothing was deleted
    assert store.delete_conversation(mine.id, by="browser-1",
                                     client_key="browser-1")["messages"] == 1
    assert store.get_conversation(mine.id).deleted_at is not None
