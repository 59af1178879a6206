"""The chat page's handlers, called directly, over a real tiny engine and a real SQLite store.

Every test reads back what the store holds: a reply with the adapter version that wrote
it, thumbs, comments, edits (a linked reply and a DPO row), regenerations (siblings) and
choices, and nothing at all for refused input.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM

from chat_app.engine import Engine, EngineConfig, SamplingParams
from chat_app.hotswap import AdapterWatcher
from chat_app.ui.handlers import ChatHandlers
from chat_app.ui.markup import display_text, typed_text
from chat_app.ui.options import ChatPageSettings
from chat_app.ui.session import ChatSession
from chat_app.ui.view import PageUpdate
from feedback_store import FeedbackStore, build_dpo_rows, build_kto_rows
from feedback_store.canary import CanaryConfig

torch.set_num_threads(1)

# Seeded, so each reply is the same from run to run (a regenerate adds the number of
# siblings to the seed, so it still differs); LONG replies run long enough to cut short.
SAMPLING = SamplingParams(max_new_tokens=24, temperature=0.8, seed=1)
LONG = SamplingParams(max_new_tokens=400, temperature=0.8, seed=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("ui-model") / "tiny")


@pytest.fixture(scope="module")
def adapter_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter for the tiny model, with random (non-zero) B weights."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.5)
    out = tmp_path_factory.mktemp("ui-adapter") / "v0003"
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[Engine]:
    eng = Engine.from_config(EngineConfig(model=str(model_dir), torch_threads=1))
    yield eng
    eng.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FeedbackStore]:
    s = FeedbackStore.open(f"sqlite:///{tmp_path / 'feedback.db'}")
    yield s
    s.close()


def make_handlers(store: FeedbackStore, engine: Engine, **settings: object) -> ChatHandlers:
    options = {"sampling": SAMPLING, "stream_interval_s": 0.0, **settings}
    return ChatHandlers(store=store, engine=engine, settings=ChatPageSettings(**options))


@pytest.fixture
def ui(store: FeedbackStore, engine: Engine) -> ChatHandlers:
    return make_handlers(store, engine)


def run(updates: Iterator[PageUpdate]) -> list[PageUpdate]:
    return list(updates)


def chat(ui: ChatHandlers, *texts: str, user_id: str | None = None) -> ChatSession:
    """A session that sent ``texts`` one after another, each answered."""
    session, _ = ui.load(None, user_id=user_id)
    for text in texts:
        final = run(ui.send(session, text))[-1]
        assert final.notice is None or not final.notice.is_error, final.notice
    return session


def wait_until(condition, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# -- sending and streaming -------------------------------------------------------------


def test_send_streams_the_reply_and_stores_it_with_its_version(
    ui: ChatHandlers, store: FeedbackStore, engine: Engine
) -> None:
    session, first_view = ui.load(None)
    assert first_view.history == [] and "adapter: `base`" in first_view.model_line

    updates = run(ui.send(session, "Hello <b>there</b>"))

    assert updates[0].message_box == ""  # the box is cleared once the message is accepted
    assert updates[0].history[0] == {"role": "user", "content": "Hello &lt;b>there&lt;/b>"}
    assert updates[0].history[-1]["role"] == "assistant"  # the reply, streaming
    assert len(updates) >= 3 and all(u.generating for u in updates[:-1])
    partials = [u.history[-1]["content"] for u in updates[:-1]]
    assert len(set(partials)) >= 2  # the reply grew while streaming
    final = updates[-1]
    assert not final.generating and final.notice is None
    user, reply = store.messages(session.conversation_id)
    assert (user.role, user.content) == ("user", "Hello <b>there</b>")
    assert final.history == [
        {"role": "user", "content": "Hello &lt;b>there&lt;/b>"},
        {"role": "assistant", "content": display_text(reply.content)},
    ]
    assert reply.parent_id == user.id and reply.origin == "generated"
    assert reply.adapter_version == "base" and reply.model_name == engine.model_name
    assert reply.finish_reason in ("stop", "length")
    assert reply.prompt_tokens > 0 and reply.completion_tokens > 0
    assert reply.generation["max_new_tokens"] == 24 and reply.generation["temperature"] == 0.8
    assert [m.id for m in session.thread] == [user.id, reply.id]
    assert final.memory == {"client_key": session.client_key,
                            "conversation_id": session.conversation_id, "head_id": reply.id,
                            "seen_update": None}
    conv = store.get_conversation(session.conversation_id)
    assert conv.client_key == session.client_key and conv.source == "ui"


def test_each_reply_names_the_adapter_version_that_wrote_it(
    store: FeedbackStore, engine: Engine, adapter_dir: Path
) -> None:
    ui = make_handlers(store, engine, sampling=LONG)
    session, _ = ui.load(None)
    engine.load_adapter("v0003", adapter_dir)
    try:
        stream = ui.send(session, "Which version answers?")
        next(stream)
        next(stream)
        engine.activate("v0003")  # a hot-swap while the first reply is streaming
        first = list(stream)[-1]
        run(ui.send(session, "And now?"))
        second = ui.view(session)
    finally:
        engine.activate("base")
        engine.unload_adapter("v0003")
    replies = [m for m in store.messages(session.conversation_id) if m.is_reply]
    assert [r.adapter_version for r in replies] == ["base", "v0003"]
    assert first.model_line == f"Last reply from model: `{engine.model_name}` · adapter: `base`"
    assert second.model_line == f"Last reply from model: `{engine.model_name}` · adapter: `v0003`"


def test_a_canary_answers_its_share_of_new_chats_for_every_turn(
    store: FeedbackStore, engine: Engine, adapter_dir: Path
) -> None:
    store.registry.register_version(version="v0003", path=str(adapter_dir))
    state = store.canaries.start("v0003", CanaryConfig(share=0.5))
    watcher = AdapterWatcher(store.registry, engine, canaries=store.canaries)
    watcher.sync()  # loads the canary beside the base
    try:
        ui = ChatHandlers(store=store, engine=engine, router=watcher,
                          settings=ChatPageSettings(sampling=SAMPLING, stream_interval_s=0.0))
        seen = set()
        for _ in range(8):
            session = chat(ui, "Hi", "And then?")
            expected = state.version_for(session.conversation_id)
            replies = [m for m in store.messages(session.conversation_id) if m.is_reply]
            assert [r.adapter_version for r in replies] == [expected, expected]
            assert f"adapter: `{expected}`" in ui.view(session).model_line
            seen.add(expected)
        assert seen == {"base", "v0003"}
    finally:
        store.canaries.end_by_hand("stopped")
        watcher.sync()
        assert wait_until(lambda: "v0003" not in engine.loaded_versions())


def test_second_message_continues_the_same_thread(ui: ChatHandlers, store: FeedbackStore) -> None:
    session = chat(ui, "First question", "Second question")
    u1, r1, u2, r2 = store.messages(session.conversation_id)
    assert u2.parent_id == r1.id and r2.parent_id == u2.id
    assert r2.prompt_tokens > r1.prompt_tokens  # the model read the first exchange too
    assert len(ui.view(session).history) == 4


def test_system_prompt_is_stored_read_by_the_model_and_then_fixed(
    ui: ChatHandlers, store: FeedbackStore
) -> None:
    plain = chat(ui, "Hi")
    session, _ = ui.load(None)
    final = run(ui.send(session, "Hi", "Answer in one short sentence."))[-1]
    assert final.system_prompt_locked and final.system_prompt == "Answer in one short sentence."
    conv = store.get_conversation(session.conversation_id)
    assert conv.system_prompt == "Answer in one short sentence."
    assert session.thread[-1].prompt_tokens > plain.thread[-1].prompt_tokens
    run(ui.send(session, "Again", "A different prompt is ignored once the chat started"))
    assert store.get_conversation(session.conversation_id).system_prompt == conv.system_prompt


def test_the_system_prompt_box_keeps_what_the_user_types_until_a_new_chat(
    store: FeedbackStore, engine: Engine
) -> None:
    ui = make_handlers(store, engine, default_system_prompt="Be kind.")
    session, first = ui.load(None)
    assert first.system_prompt == "Be kind." and not first.system_prompt_locked
    refused = run(ui.send(session, "", "My own prompt, not sent yet"))[-1]
    assert refused.notice.is_error and refused.system_prompt is None  # the box is left alone
    run(ui.send(session, "Hi", "My own prompt"))
    assert store.get_conversation(session.conversation_id).system_prompt == "My own prompt"
    fresh = ui.new_chat(session)
    assert fresh.system_prompt == "Be kind." and not fresh.system_prompt_locked


# -- refused input -----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   \n", "x" * 4001, None, "nul\x00char"])
def test_bad_messages_are_refused_visibly_and_store_nothing(
    ui: ChatHandlers, store: FeedbackStore, text: object
) -> None:
    session, _ = ui.load(None)
    before = store.counts()
    updates = run(ui.send(session, text))
    assert len(updates) == 1
    assert updates[0].notice is not None and updates[0].notice.is_error
    assert updates[0].message_box is None  # what was typed stays in the box
    assert store.counts() == before and session.conversation_id is None


def test_a_message_of_exactly_the_limit_is_accepted(store: FeedbackStore, engine: Engine) -> None:
    ui = make_handlers(store, engine, max_message_chars=50)
    session, _ = ui.load(None)
    final = run(ui.send(session, "y" * 50))[-1]
    assert final.notice is None and len(store.messages(session.conversation_id)) == 2
    refused = run(ui.send(session, "y" * 51))[-1]
    assert refused.notice.is_error and "limit is 50" in refused.notice.text


def test_busy_engine_shows_busy_and_keeps_the_message(
    store: FeedbackStore, model_dir: Path
) -> None:
    eng = Engine.from_config(EngineConfig(model=str(model_dir), max_concurrent=1, max_queued=0))
    try:
        ui = make_handlers(store, eng)
        session, _ = ui.load(None)
        other = eng.stream([{"role": "user", "content": "a long one"}], LONG)
        updates = run(ui.send(session, "Are you there?"))
        assert len(updates) == 1 and updates[0].notice.is_error
        assert "busy" in updates[0].notice.text and updates[0].message_box is None
        assert store.counts()["messages"] == 0 and session.conversation_id is None
        other.cancel()
        other.result(timeout=60)
        final = run(ui.send(session, "Are you there?"))[-1]
        assert final.notice is None and len(store.messages(session.conversation_id)) == 2
    finally:
        eng.close()


# -- leaving or stopping mid-reply -------------------------------------------------------


def test_closing_the_stream_cancels_the_generation_and_keeps_the_partial_reply(
    store: FeedbackStore, engine: Engine
) -> None:
    ui = make_handlers(store, engine, sampling=LONG)
    session, _ = ui.load(None)
    stream = ui.send(session, "Tell me a long story")
    next(stream)  # accepted, empty reply shown
    shown = next(stream).history[-1]["content"]  # the first piece
    stream.close()  # what Gradio does when the page goes away
    assert wait_until(lambda: engine.in_flight() == 0)
    reply = store.get_message(session.thread[-1].id)
    assert reply.finish_reason == "cancelled"
    assert reply.content.startswith(typed_text(shown))
    assert 0 < reply.completion_tokens < LONG.max_new_tokens
    assert not session.generating


def test_stop_cuts_the_reply_short_and_stores_it_as_cancelled(
    store: FeedbackStore, engine: Engine
) -> None:
    ui = make_handlers(store, engine, sampling=LONG)
    session, _ = ui.load(None)
    stream = ui.send(session, "Tell me a long story")
    next(stream)
    next(stream)
    assert ui.stop(session).notice.text.startswith("Stopping")
    final = list(stream)[-1]
    assert "stopped" in final.notice.text and not final.generating
    reply = store.get_message(session.thread[-1].id)
    assert reply.finish_reason == "cancelled" and reply.completion_tokens < LONG.max_new_tokens
    assert display_text(reply.content) == final.history[-1]["content"]


# -- thumbs and comments -------------------------------------------------------------------


def test_thumbs_up_then_down_are_stored_and_the_latest_counts(
    ui: ChatHandlers, store: FeedbackStore
) -> None:
    session = chat(ui, "Rate me", user_id="alice")
    reply = session.thread[1]
    up = ui.rate(session, 1, True)
    assert up.feedback == ["Like"] and not up.notice.is_error
    down = ui.rate(session, 1, False)
    assert down.feedback == ["Dislike"]
    kinds = [(e.kind, e.user_id) for e in store.events_for(reply.id)]
    assert kinds == [("up", "alice"), ("down", "alice")]
    (row,) = build_kto_rows(store)
    assert row["label"] is False and row["completion"][0]["content"] == reply.content


def test_thumbs_on_a_user_message_or_unclicked_thumbs_store_nothing(
    ui: ChatHandlers, store: FeedbackStore
) -> None:
    session = chat(ui, "Hello")
    before = store.counts()
    assert ui.rate(session, 0, True).notice.is_error
    assert ui.rate(session, 7, False).notice.is_error
    cleared = ui.rate(session, 1, "")  # the same thumb clicked twice
    assert not cleared.notice.is_error and "changed but not withdrawn" in cleared.notice.text
    assert store.counts() == before


def test_a_reason_rates_the_reply_and_is_stored_as_its_tag(
    ui: ChatHandlers, store: FeedbackStore
) -> None:
    session = chat(ui, "Why so long?", user_id="bob")
    reply = session.thread[1]
    down = ui.rate(session, 1, "Too long")
    assert down.feedback == ["Dislike"] and not down.notice.is_error
    assert down.notice.text == "Saved your thumbs down (Too long) on reply 1."
    again = ui.rate(session, 1, "Too long")  # one pick sent twice is stored once
    assert again.feedback == ["Dislike"] and not again.notice.is_error
    up = ui.rate(session, 1, "Helpful")
    assert up.feedback == ["Like"]
    events = [(e.kind, e.tags, e.user_id) for e in store.events_for(reply.id)]
    assert events == [("down", ("Too long",), "bob"), ("up", ("Helpful",), "bob")]
    (row,) = build_kto_rows(store)
    assert row["label"] is True  # the latest vote counts, whatever its reason


def test_an_unknown_reason_is_refused_and_stores_nothing(
    ui: ChatHandlers, store: FeedbackStore
) -> None:
    session = chat(ui, "Hello")
    before = store.counts()
    refused = ui.rate(session, 1, "Boring" * 20)
    assert refused.notice.is_error and "Unknown feedback option" in refused.notice.text
    assert store.counts() == before
    custom = make_handlers(store, ui.engine, down_reasons=("Boring",), up_reasons=())
    assert not custom.rate(session, 1, "Boring").notice.is_error
    assert custom.rate(session, 1, "Helpful").notice.is_error


@pytest.mark.parametrize("reasons", [("Like",), ("Too long", "Too long"), ("",), (" padded",),
                                     ("x" * 41,), ["Too long"], tuple(f"r{i}" for i in range(13))])
def test_bad_reason_settings_are_refused(reasons: object) -> None:
    with pytest.raises(ValueError, match="reason"):
        ChatPageSettings(down_reasons=reasons, up_reasons=()).validate()  # type: ignore[arg-type]


def test_comment_goes_to_the_selected_reply_or_else_the_last(
    ui: ChatHandlers, store: FeedbackStore
) -> None:
    session = chat(ui, "One", "Two")
    first, last = session.thread[1], session.thread[3]
    saved = ui.comment(session, "  too vague  ")
    assert saved.comment_box == "" and "reply 2" in saved.notice.text
    ui.select(session, 1)
    ui.comment(session, "this one was fine")
    assert [e.comment for e in store.events_for(last.id)] == ["too vague"]
    assert [(e.kind, e.comment) for e in store.events_for(first.id)] == [
        ("comment", "this one was fine")]
    empty = ui.comment(session, "   ")
    assert empty.notice.is_error and empty.comment_box is None


# -- edits -----------------------------------------------------------------------------------


def test_editing_a_reply_stores_a_linked_reply_and_a_dpo_pair(
    ui: ChatHandlers, store: FeedbackStore
) -> None:
    session = chat(ui, "What is the capital of France?")
    original = session.thread[1]
    # The page sends the text as shown, markup escaped; it is stored as the user typed it.
    final = run(ui.edit(session, 1, display_text("Paris <b>is</b> the capital.")))[-1]
    assert not final.notice.is_error
    edited = store.get_message(session.thread[1].id)
    assert edited.content == "Paris <b>is</b> the capital."
    assert (edited.origin, edited.source_reply_id, edited.parent_id) == (
        "edit", original.id, original.parent_id)
    assert store.get_message(original.id).content == original.content  # never overwritten
    (event,) = [e for e in store.events_for(original.id) if e.kind == "edit"]
    assert event.other_reply_id == edited.id
    (row,) = build_dpo_rows(store)
    assert row["chosen"][0]["content"] == "Paris <b>is</b> the capital."
    assert row["rejected"][0]["content"] == original.content
    assert row["prompt"][-1] == {"role": "user", "content": "What is the capital of France?"}
    assert final.history[1]["content"] == "Paris &lt;b>is&lt;/b> the capital."


def test_an_unchanged_or_empty_edit_stores_nothing(ui: ChatHandlers, store: FeedbackStore) -> None:
    session = chat(ui, "Hi")
    before = store.counts()
    shown = ui.view(session).history[1]["content"]
    assert run(ui.edit(session, 1, shown))[-1].notice is None
    assert run(ui.edit(session, 1, "  "))[-1].notice.is_error
    assert store.counts() == before and ui.view(session).history[1]["content"] == shown


def test_editing_an_earlier_reply_branches_the_chat(ui: ChatHandlers, store: FeedbackStore) -> None:
    session = chat(ui, "One", "Two")
    final = run(ui.edit(session, 1, "A corrected first answer"))[-1]
    assert len(final.history) == 2 and "stay on the earlier branch" in final.notice.text
    run(ui.send(session, "Three"))
    u3 = store.get_message(session.thread[2].id)
    assert u3.parent_id == session.thread[1].id  # the chat continues from the edit
    assert store.get_message(session.thread[1].id).origin == "edit"


def test_editing_a_user_message_answers_it_on_a_new_branch(
    ui: ChatHandlers, store: FeedbackStore
) -> None:
    session = chat(ui, "One", "Two")
    old_reply = session.thread[1]
    final = run(ui.edit(session, 2, "Two, but better"))[-1]
    assert [h["role"] for h in final.history] == ["user", "assistant", "user", "assistant"]
    new_user, new_reply = session.thread[2], session.thread[3]
    assert new_user.content == "Two, but better" and new_user.parent_id == old_reply.id
    assert new_reply.parent_id == new_user.id
    assert len(store.messages(session.conversation_id)) == 6
    first = session.conversation_id
    run(ui.edit(session, 0, "A new first message"))  # nothing before it: a new chat
    assert session.conversation_id != first and len(session.thread) == 2


# -- regenerate and choose -----------------------------------------------------------------


def test_regenerate_stores_a_sibling_shown_in_place_of_the_old_reply(
    ui: ChatHandlers, store: FeedbackStore
) -> None:
    session = chat(ui, "Tell me about cats")
    old = session.thread[1]
    final = run(ui.regenerate(session))[-1]
    new = store.get_message(session.thread[1].id)
    assert len(final.history) == 2 and final.choice_visible
    assert final.history[1]["content"] == display_text(new.content)
    assert (new.origin, new.source_reply_id, new.parent_id) == ("regenerated", old.id,
                                                                 old.parent_id)
    assert new.adapter_version == "base" and new.finish_reason in ("stop", "length")
    assert [m.id for m in store.siblings(old.id)] == [old.id, new.id]
    assert session.pending_choice == (old.id, new.id)


def test_choosing_the_new_reply_stores_a_preference_pair(
    ui: ChatHandlers, store: FeedbackStore
) -> None:
    session = chat(ui, "Tell me about cats")
    old = session.thread[1]
    run(ui.regenerate(session))
    new = session.thread[1]
    done = ui.choose(session, "new")
    assert not done.choice_visible and "new reply is better" in done.notice.text
    (event,) = [e for e in store.events_for(new.id) if e.kind == "choice"]
    assert (event.reply_id, event.other_reply_id) == (new.id, old.id)
    (row,) = build_dpo_rows(store)
    assert row["chosen"][0]["content"] == new.content
    assert row["rejected"][0]["content"] == old.content
    assert ui.choose(session, "new").notice.is_error  # nothing left to compare


def test_choosing_the_previous_reply_shows_it_again(ui: ChatHandlers, store: FeedbackStore) -> None:
    session = chat(ui, "Tell me about dogs")
    old = session.thread[1]
    run(ui.regenerate(session))
    new = session.thread[1]
    done = ui.choose(session, "previous")
    assert session.thread[1].id == old.id
    assert done.history[1]["content"] == display_text(old.content)
    (event,) = [e for e in store.events_for(old.id) if e.kind == "choice"]
    assert (event.reply_id, event.other_reply_id) == (old.id, new.id)
    run(ui.send(session, "And then?"))
    assert store.get_message(session.thread[2].id).parent_id == old.id


def test_regenerate_with_nothing_to_regenerate_is_refused(
    ui: ChatHandlers, store: FeedbackStore
) -> None:
    session, _ = ui.load(None)
    assert run(ui.regenerate(session))[-1].notice.is_error
    assert store.counts()["messages"] == 0


def test_a_message_left_without_a_reply_gets_one_from_regenerate(
    ui: ChatHandlers, store: FeedbackStore
) -> None:
    # As after a reply that could not be stored: the thread ends with the user's message.
    session = chat(ui, "One")
    conv = session.conversation_id
    user = store.add_user_message(conversation_id=conv, content="Two")
    again, view = ui.load({"client_key": session.client_key, "conversation_id": conv,
                           "head_id": user.id})
    assert [h["role"] for h in view.history] == ["user", "assistant", "user"]
    refused = run(ui.send(again, "Three"))[-1]
    assert refused.notice.is_error and "Regenerate" in refused.notice.text
    final = run(ui.regenerate(again))[-1]
    assert [h["role"] for h in final.history] == ["user", "assistant", "user", "assistant"]
    reply = store.get_message(again.thread[-1].id)
    assert (reply.parent_id, reply.origin) == (user.id, "generated") and not final.choice_visible


# -- one conversation per browser, kept across reloads --------------------------------------


def test_reload_restores_the_chat_the_browser_remembers(
    ui: ChatHandlers, store: FeedbackStore
) -> None:
    session = chat(ui, "One", "Two")
    run(ui.regenerate(session))
    ui.choose(session, "previous")
    ui.rate(session, 3, False)
    memory = ui.view(session).memory

    again, view = ui.load(memory)
    assert [m.id for m in again.thread] == [m.id for m in session.thread]
    assert again.client_key == session.client_key
    assert view.history == ui.view(session).history and view.feedback == [None, "Dislike"]

    stranger, fresh = ui.load({**memory, "client_key": "b-someone-else"})
    assert stranger.thread == [] and fresh.history == []
    other_user, _ = ui.load(memory, user_id="mallory")
    assert other_user.thread == []


def test_reload_shows_a_reply_cut_short_when_the_page_closed(
    store: FeedbackStore, engine: Engine
) -> None:
    ui = make_handlers(store, engine, sampling=LONG)
    session, _ = ui.load(None)
    stream = ui.send(session, "Keep talking")
    accepted = next(stream)  # the browser last heard: the user message, no reply yet
    next(stream)
    stream.close()
    again, view = ui.load(accepted.memory)
    assert [h["role"] for h in view.history] == ["user", "assistant"]
    assert again.thread[-1].finish_reason == "cancelled"


def test_new_chat_starts_a_new_conversation(ui: ChatHandlers, store: FeedbackStore) -> None:
    session = chat(ui, "One")
    first = session.conversation_id
    cleared = ui.new_chat(session)
    assert cleared.history == [] and cleared.memory["conversation_id"] is None
    run(ui.send(session, "Another topic"))
    assert session.conversation_id != first
    assert store.get_conversation(session.conversation_id).client_key == session.client_key
    assert len(store.messages(first)) == 2  # the old chat is kept


def test_new_chat_while_a_reply_streams_stops_it_and_keeps_the_chats_apart(
    store: FeedbackStore, engine: Engine
) -> None:
    ui = make_handlers(store, engine, sampling=LONG)
    session, _ = ui.load(None)
    stream = ui.send(session, "A long story please")
    next(stream)
    next(stream)
    first = session.conversation_id
    assert ui.new_chat(session).history == []
    list(stream)  # the old reply ends (cancelled) without writing into the new chat
    assert session.thread == [] and session.conversation_id is None and not session.generating
    (_, reply) = store.messages(first)
    assert reply.finish_reason == "cancelled"


def test_bad_page_settings_are_refused_all_at_once(store: FeedbackStore, engine: Engine) -> None:
    with pytest.raises(ValueError) as err:
        make_handlers(store, engine, max_message_chars=0, title=" ",
                      sampling=SamplingParams(temperature=-1))
    assert all(word in str(err.value) for word in ("max_message_chars", "title", "temperature"))


# -- markup is text ------------------------------------------------------------------------


@given(st.text(alphabet="<>`~&ab \n/", max_size=40))
def test_typed_text_undoes_display_text(text: str) -> None:
    if "&lt;" not in text:
        assert typed_text(display_text(text)) == text


def test_display_text_escapes_tags_outside_code_only() -> None:
    assert display_text("<script>x</script>") == "&lt;script>x&lt;/script>"
    assert display_text("use `a<b` here") == "use `a<b` here"
    assert display_text("```\n<div>\n```\n<img>") == "```\n<div>\n```\n&lt;img>"
