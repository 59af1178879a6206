"""The chat page's conversation list, through its handlers with a real engine and store:
list and search, reopen and continue, rename, delete (gone from the page, from training
rows and exports, and recorded), and isolation between owners."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM

from chat_app.engine import Engine, EngineConfig, SamplingParams
from chat_app.hotswap import AdapterWatcher
from chat_app.ui.handlers import ChatHandlers
from chat_app.ui.options import ChatPageSettings
from chat_app.ui.session import ChatSession
from feedback_store import FeedbackStore, build_kto_rows
from feedback_store.export import rows_for

torch.set_num_threads(1)
SAMPLING = SamplingParams(max_new_tokens=12, temperature=0.8, seed=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("list-model") / "tiny")


@pytest.fixture
def engine(model_dir: Path) -> Iterator[Engine]:
    eng = Engine.from_config(EngineConfig(model=str(model_dir), torch_threads=1))
    yield eng
    eng.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FeedbackStore]:
    s = FeedbackStore.open(f"sqlite:///{tmp_path / 'feedback.db'}")
    yield s
    s.close()


@pytest.fixture
def ui(store: FeedbackStore, engine: Engine) -> ChatHandlers:
    return ChatHandlers(store=store, engine=engine,
                        settings=ChatPageSettings(sampling=SAMPLING, stream_interval_s=0.0))


def chat(ui: ChatHandlers, session: ChatSession, *texts: str) -> int:
    """Send ``texts`` in a new chat of ``session``; returns its conversation id."""
    ui.new_chat(session)
    for text in texts:
        final = list(ui.send(session, text))[-1]
        assert final.notice is None or not final.notice.is_error, final.notice
    assert session.conversation_id is not None
    return session.conversation_id


def titles(ui: ChatHandlers, session: ChatSession, search: str | None = None) -> list[str]:
    items, problem = ui.conversations(session, search)
    assert problem is None
    return [c.title for c in items]


def test_the_list_is_newest_first_titled_from_the_first_message_and_searchable(
        ui: ChatHandlers) -> None:
    session, _ = ui.load(None)
    chat(ui, session, "How do I cook rice?", "And pasta?")
    chat(ui, session, "Why is the sky blue? " + "Tell me everything about it. " * 5)
    chat(ui, session, "Hello there")
    listed = titles(ui, session)
    assert listed[0] == "Hello there" and listed[2] == "How do I cook rice?"
    assert listed[1].startswith("Why is the sky blue?") and listed[1].endswith("…")
    assert len(listed[1]) == 60
    assert titles(ui, session, "PASTA") == ["How do I cook rice?"]  # any message, any case
    assert titles(ui, session, "50%_") == []  # LIKE wildcards are matched literally
    assert titles(ui, session, "  ") == listed  # a blank search lists everything


def test_reopen_an_old_chat_and_continue_it(ui: ChatHandlers, store: FeedbackStore) -> None:
    session, _ = ui.load(None)
    old = chat(ui, session, "First chat")
    ui.rate(session, 1, False)
    chat(ui, session, "Second chat")
    page = ui.open_conversation(session, old)
    assert session.conversation_id == old and not page.notice
    assert [m["content"] for m in page.history][0] == "First chat"
    assert page.feedback == ["Dislike"]  # the user's vote shows again
    final = list(ui.send(session, "Back again"))[-1]
    assert not (final.notice and final.notice.is_error)
    assert [m.content for m in store.messages(old) if m.role == "user"] == [
        "First chat", "Back again"]
    assert titles(ui, session)[0] == "First chat"  # now the newest activity


def test_rename_shows_the_new_title_and_bad_titles_change_nothing(ui: ChatHandlers) -> None:
    session, _ = ui.load(None)
    assert ui.rename_conversation(session, "Too early").notice.is_error  # nothing stored yet
    chat(ui, session, "Plan a trip")
    done = ui.rename_conversation(session, "  Trip   to Rome ")
    assert done.notice.text == "Renamed this chat to “Trip to Rome”."
    assert titles(ui, session) == ["Trip to Rome"]
    for bad in ("", "   ", "x" * 10_000, "nul\x00"):
        refused = ui.rename_conversation(session, bad)
        assert refused.notice.is_error and "not renamed" in refused.notice.text
    assert titles(ui, session) == ["Trip to Rome"]
    assert titles(ui, session, "rome") == ["Trip to Rome"]


def test_delete_removes_the_chat_from_the_page_training_and_export_and_records_it(
        ui: ChatHandlers, store: FeedbackStore) -> None:
    session, _ = ui.load(None)
    kept = chat(ui, session, "Keep me")
    ui.rate(session, 1, True)
    gone = chat(ui, session, "Delete me")
    ui.rate(session, 1, False)
    assert len(build_kto_rows(store)) == 2
    page = ui.delete_conversation(session)
    assert not page.notice.is_error and "Deleted the chat" in page.notice.text
    assert page.history == [] and session.conversation_id is None
    assert titles(ui, session) == ["Keep me"]
    rows = rows_for(store, "kto")
    assert [r["prompt"][-1]["content"] for r in rows] == ["Keep me"]
    record = store.get_conversation(gone)
    assert record.deleted_at is not None and record.deleted_by == session.client_key
    assert store.messages(gone) == []
    assert ui.open_conversation(session, gone).notice.is_error
    assert ui.delete_conversation(session).notice.is_error  # nothing open to delete
    assert store.get_conversation(kept).deleted_at is None


def test_owners_never_see_or_touch_each_others_chats(ui: ChatHandlers,
                                                     store: FeedbackStore) -> None:
    alice, _ = ui.load(None, user_id="alice")
    bob, _ = ui.load(None, user_id="bob")
    browser, _ = ui.load(None)  # no login: this browser's own chats
    a = chat(ui, alice, "Alice's secret")
    chat(ui, bob, "Bob's chat")
    chat(ui, browser, "Anonymous chat")
    assert titles(ui, alice) == ["Alice's secret"]
    assert titles(ui, bob, "secret") == []
    assert titles(ui, browser) == ["Anonymous chat"]
    before = store.counts()
    for intruder in (bob, browser):
        opened = ui.open_conversation(intruder, a)
        assert opened.notice.is_error and "no chat" in opened.notice.text
        assert intruder.conversation_id != a
        intruder.conversation_id = a  # even with the id forced into its session
        assert ui.rename_conversation(intruder, "mine now").notice.is_error
        assert ui.delete_conversation(intruder).notice.is_error
    assert store.counts() == before
    assert store.get_conversation(a).deleted_at is None
    assert titles(ui, alice) == ["Alice's secret"]
    # Alice in another browser (a new session) sees her chats too
    elsewhere, _ = ui.load(None, user_id="alice")
    assert titles(ui, elsewhere) == ["Alice's secret"]
    for bad in ("1", None, True, 10**9):
        assert ui.open_conversation(elsewhere, bad).notice.is_error


def test_a_user_whose_feedback_trained_the_serving_version_is_told_once(
        ui: ChatHandlers, store: FeedbackStore, engine: Engine, model_dir: Path,
        tmp_path: Path) -> None:
    rater, _ = ui.load(None, user_id="rater")
    other, _ = ui.load(None, user_id="quiet")
    chat(ui, rater, "Rate this")
    ui.rate(rater, 1, True)
    chat(ui, other, "Just chatting")
    assert ui.update_notice(rater) is None  # the base serves: nothing was learnt yet
    # a round snapshots the feedback so far and its version goes live
    run = store.registry.start_run(trigger="manual")
    store.registry.update_run(run.id, kto_rows=41, dpo_rows=3,
                              last_event_id=store.last_event_id())
    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                             LoraConfig(r=2, target_modules=["q_proj"]))
    adapter.save_pretrained(tmp_path / "v0001")
    store.registry.update_run(run.id, status="succeeded")
    store.registry.register_version(version="v0001", path=str(tmp_path / "v0001"),
                                    run_id=run.id)
    store.registry.activate("v0001")
    AdapterWatcher(store.registry, engine).sync()
    assert engine.active_version == "v0001"
    line = ui.update_notice(rater)
    assert line is not None and line.startswith(
        "🎉 The model was updated with your feedback: version `v0001` has answered since ")
    assert line.endswith("trained on 44 ratings and pairs, one of them yours.")
    assert ui.update_notice(rater) is None  # once
    assert ui.update_notice(other) is None  # chatted, never rated
    again, _ = ui.load(rater.memory(), user_id="rater")  # a reload remembers it was shown
    assert ui.update_notice(again) is None
    fresh, _ = ui.load(None, user_id="rater")  # another browser: told there too, once
    assert ui.update_notice(fresh) is not None


@pytest.mark.parametrize("login", [None, "carol"], ids=["browser", "login"])
def test_delete_all_my_data_removes_every_chat_and_rating_of_the_owner_only(
        ui: ChatHandlers, store: FeedbackStore, login: str | None) -> None:
    me, _ = ui.load(None, user_id=login)
    other, _ = ui.load(None, user_id=None if login else "dave")
    mine = [chat(ui, me, f"My chat {i}") for i in range(3)]
    ui.rate(me, 1, True)
    theirs = chat(ui, other, "Someone else's")
    ui.rate(other, 1, False)
    done = ui.forget_me(me)
    assert not done.notice.is_error and "3 chat(s)" in done.notice.text
    assert titles(ui, me) == [] and me.conversation_id is None
    for cid in mine:
        record = store.get_conversation(cid)
        assert record.deleted_at is not None and store.messages(cid) == []
        assert record.deleted_by == (login or me.client_key)
    rows = rows_for(store, "kto")
    assert [r["prompt"][-1]["content"] for r in rows] == ["Someone else's"]
    assert store.get_conversation(theirs).deleted_at is None
    assert titles(ui, other) == ["Someone else's"]
    assert not ui.forget_me(me).notice.is_error  # nothing left: a no-op, not an error
