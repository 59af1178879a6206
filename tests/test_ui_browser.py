"""The chat page in a real headless Chromium: everything a user does ends up in the database.

A user sends a message holding markup and script (shown as text, never run), watches the
reply stream in, gives a thumbs down, edits the reply, regenerates it, says the new one is
better, and reloads the page to find the chat again. Then the store is read back.
Needs Debian's Chromium at /usr/bin/chromium (``apt-get install chromium``).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import make_tiny_model

from chat_app.engine import Engine, EngineConfig, SamplingParams
from chat_app.ui.page import ChatPageSettings, build_chat_page
from feedback_store import FeedbackStore, Message, build_dpo_rows, build_kto_rows

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import Page, sync_playwright  # noqa: E402

pytestmark = pytest.mark.browser
torch.set_num_threads(1)

MAX_NEW_TOKENS = 400  # long enough to press Stop (or leave) while a reply streams
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
HOSTILE = ('Hi <script>window.__xss1 = 1</script> <img src="x" onerror="window.__xss2 = 1"> '
           "**bold**")
# Records every text the reply shows while it streams in.
WATCH_REPLY = """() => {
  window.__seen = [];
  const chat = document.querySelector('#chat');
  new MutationObserver(() => {
    const bots = chat.querySelectorAll('[data-testid="bot"]');
    if (bots.length) window.__seen.push(bots[bots.length - 1].innerText);
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60.0,
             state: Callable[[], Any] | None = None) -> Any:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` (and what
    ``state()`` shows then) if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}" + (f"; found {state()!r}" if state else ""))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("ui-browser")
    engine = Engine.from_config(EngineConfig(model=str(make_tiny_model(root / "tiny")),
                                             torch_threads=1))
    store = FeedbackStore.open(f"sqlite:///{root / 'feedback.db'}")
    settings = ChatPageSettings(
        sampling=SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.8, seed=5),
        stream_interval_s=0.0, browser_state_secret="test-secret")
    demo = build_chat_page(store=store, engine=engine, settings=settings)
    demo.queue(default_concurrency_limit=4)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "store": store, "root": root}
    finally:
        demo.close()
        engine.close()
        store.close()


@pytest.fixture
def page(served: dict[str, Any]) -> Iterator[Page]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1100, "height": 1000})
        finally:
            browser.close()


def replies(store: FeedbackStore, conversation_id: int) -> list[Message]:
    return [m for m in store.messages(conversation_id) if m.is_reply]


def newest_conversation(store: FeedbackStore) -> int:
    return store.counts()["conversations"]  # ids count up from 1 in a fresh database


def streaming(page: Page, n_bot: int) -> bool:
    """The ``n_bot``-th reply has started to show text."""
    return page.evaluate(
        """(n) => { const b = document.querySelectorAll('#chat [data-testid="bot"]');
                    return b.length === n && b[n - 1].innerText.trim().length > 0; }""", n_bot)


def settled(page: Page, n_bot: int) -> bool:
    """The page shows ``n_bot`` replies and no reply is streaming (Stop is disabled)."""
    return page.evaluate(
        """(n) => document.querySelectorAll('#chat [data-testid="bot"]').length === n
                  && document.querySelector('#stop').disabled""", n_bot)


def test_a_user_chats_rates_edits_regenerates_and_chooses_and_it_is_all_stored(
    served: dict[str, Any], page: Page
) -> None:
    store: FeedbackStore = served["store"]
    page.goto(served["url"])
    page.wait_for_selector("#message textarea")
    page.evaluate(WATCH_REPLY)

    # Send a message full of markup; the reply streams in.
    page.fill("#message textarea", HOSTILE)
    page.click("#send")
    wait_for("the conversation", lambda: store.counts()["conversations"] == 1)
    conv_id = 1  # the first conversation of a fresh database
    assert store.get_conversation(conv_id).source == "ui"
    (reply,) = wait_for("the stored reply", lambda: replies(store, conv_id))
    wait_for("the reply to finish on the page", lambda: settled(page, 1))
    seen = [t for t in page.evaluate("window.__seen") if t.strip()]
    assert len(set(seen)) >= 3, "the reply should appear piece by piece"
    assert reply.completion_tokens > 3 and reply.adapter_version == "base"
    assert "adapter: base" in page.inner_text("#model-line")

    # Markup and script are shown as text and never run.
    user_text = page.inner_text('#chat [data-testid="user"]')
    assert '<script>window.__xss1 = 1</script>' in user_text
    assert '<img src="x" onerror="window.__xss2 = 1">' in user_text
    assert page.evaluate("[window.__xss1, window.__xss2]") == [None, None]
    assert page.locator('#chat img[src="x"]').count() == 0
    assert page.locator("#chat strong").first.inner_text() == "bold"  # Markdown still renders
    assert store.messages(conv_id)[0].content == HOSTILE
    page.screenshot(path=str(served["root"] / "after-send.png"), full_page=True)

    # Thumbs down on the reply.
    page.click('#chat button[aria-label="Dislike"]')
    wait_for("the thumbs down", lambda: [e.kind for e in store.events_for(reply.id)] == ["down"])
    wait_for("the notice", lambda: "thumbs down" in page.inner_text("#notice"),
             state=lambda: page.inner_text("#notice"))

    # Edit the reply in place.
    page.click('#chat .message-buttons-left button[aria-label="Edit"]')
    page.fill("#chat textarea", "A better reply, with <b>tags</b> kept as text.")
    page.click('#chat button[aria-label="Submit"]')
    (edit,) = wait_for("the edit", lambda: [e for e in store.events_for(reply.id)
                                            if e.kind == "edit"])
    edited = store.get_message(edit.other_reply_id)
    assert edited.content == "A better reply, with <b>tags</b> kept as text."
    assert (edited.origin, edited.source_reply_id) == ("edit", reply.id)
    wait_for("the edit on the page", lambda: "<b>tags</b>" in page.inner_text(
        '#chat [data-testid="bot"]'))

    # Regenerate: a sibling shown in place of the edited reply, then say the new one is better.
    page.click('#chat button[aria-label="Retry"]')
    regenerated = wait_for("the regenerated reply", lambda: [
        m for m in replies(store, conv_id) if m.origin == "regenerated"])[0]
    assert regenerated.source_reply_id == edited.id and regenerated.parent_id == reply.parent_id
    wait_for("the regenerated reply on the page", lambda: settled(page, 1))
    page.wait_for_selector("#prefer-new", state="visible")
    page.screenshot(path=str(served["root"] / "after-regenerate.png"), full_page=True)
    page.click("#prefer-new")
    (choice,) = wait_for("the choice", lambda: [e for e in store.events_for(regenerated.id)
                                                if e.kind == "choice"])
    assert (choice.reply_id, choice.other_reply_id) == (regenerated.id, edited.id)
    page.wait_for_selector("#prefer-new", state="hidden")

    # All of it is training data now.
    kto = build_kto_rows(store)
    assert [(r["completion"][0]["content"], r["label"]) for r in kto] == [(reply.content, False)]
    dpo = [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in build_dpo_rows(store)]
    assert dpo == [(edited.content, reply.content), (regenerated.content, edited.content)]

    # A reload finds the same chat, on the chosen reply.
    shown = page.inner_text('#chat [data-testid="bot"]')
    page.reload()
    page.wait_for_selector('#chat [data-testid="bot"]')
    wait_for("the restored chat", lambda: settled(page, 1))
    assert page.inner_text('#chat [data-testid="bot"]') == shown
    assert "<script>" in page.inner_text('#chat [data-testid="user"]')
    page.screenshot(path=str(served["root"] / "after-reload.png"), full_page=True)


def test_a_reason_from_the_flag_menu_rates_the_reply_and_is_stored_as_its_tag(
    served: dict[str, Any], page: Page
) -> None:
    store: FeedbackStore = served["store"]
    page.goto(served["url"])
    page.wait_for_selector("#message textarea")
    page.fill("#message textarea", "Tell me about rice")
    page.click("#send")
    wait_for("the reply to finish on the page", lambda: settled(page, 1))
    conv_id = newest_conversation(store)
    (reply,) = replies(store, conv_id)
    options = page.locator("#chat .extra-feedback-option")
    assert options.all_inner_texts() == ["Helpful", "Clear", "Inaccurate", "Off topic",
                                         "Too long", "Too short", "Unsafe"]
    page.hover('#chat button[aria-label="Feedback"]')
    page.click('#chat .extra-feedback-option:has-text("Too long")')
    wait_for("the tagged thumbs down",
             lambda: [(e.kind, e.tags) for e in store.events_for(reply.id)]
             == [("down", ("Too long",))],
             state=lambda: store.events_for(reply.id))
    wait_for("the notice", lambda: "thumbs down (Too long)" in page.inner_text("#notice"),
             state=lambda: page.inner_text("#notice"))


def test_the_sidebar_lists_reopens_renames_and_deletes_chats(
    served: dict[str, Any], page: Page
) -> None:
    store: FeedbackStore = served["store"]
    page.goto(served["url"])
    page.wait_for_selector("#message textarea")
    chats = page.locator("#chat-list label")

    def send(text: str, n_bot: int) -> int:
        page.fill("#message textarea", text)
        page.click("#send")
        wait_for("the reply to finish on the page", lambda: settled(page, n_bot),
                 timeout=120, state=lambda: page.evaluate(
                     """() => [document.querySelectorAll('#chat [data-testid="bot"]').length,
                              document.querySelector('#stop').disabled,
                              document.querySelector('#notice').innerText]"""))
        return newest_conversation(store)

    first = send("Sidebar chat one", 1)
    wait_for("the first chat in the list", lambda: chats.all_inner_texts() == ["Sidebar chat one"],
             state=chats.all_inner_texts)
    page.click("#new-chat")
    wait_for("the new, empty chat", lambda: page.locator('#chat [data-testid="bot"]').count() == 0
             and "adapter" in page.inner_text("#model-line")
             and page.locator("#chat-list input:checked").count() == 0)
    second = send("Sidebar chat two", 1)
    wait_for("both chats, newest first",
             lambda: chats.all_inner_texts() == ["Sidebar chat two", "Sidebar chat one"],
             state=chats.all_inner_texts)

    # Reopen the first chat and continue it.
    chats.filter(has_text="Sidebar chat one").click()
    wait_for("the old chat on the page",
             lambda: page.inner_text('#chat [data-testid="user"]') == "Sidebar chat one")
    send("Continued", 2)
    assert [m.content for m in store.messages(first) if m.role == "user"] == [
        "Sidebar chat one", "Continued"]

    # Search, rename.
    page.fill("#chat-search textarea, #chat-search input", "two")
    wait_for("the search result", lambda: chats.all_inner_texts() == ["Sidebar chat two"],
             state=chats.all_inner_texts)
    page.fill("#chat-search textarea, #chat-search input", "")
    page.fill("#chat-title textarea, #chat-title input", "Renamed one")
    page.click("#rename-chat")
    wait_for("the new title", lambda: "Renamed one" in chats.all_inner_texts(),
             state=chats.all_inner_texts)
    assert store.get_conversation(first).title == "Renamed one"

    # Delete the open chat, after the confirmation.
    page.click("#delete-chat")
    page.click("#confirm-delete-yes")
    wait_for("the chat gone from the list", lambda: chats.all_inner_texts() == ["Sidebar chat two"],
             state=chats.all_inner_texts)
    assert store.get_conversation(first).deleted_at is not None
    assert store.messages(first) == []
    assert page.locator('#chat [data-testid="user"]').count() == 0
    assert store.get_conversation(second).deleted_at is None


def test_an_empty_message_shows_an_error_and_stores_nothing(
    served: dict[str, Any], page: Page
) -> None:
    store: FeedbackStore = served["store"]
    before = store.counts()
    page.goto(served["url"])
    page.wait_for_selector("#message textarea")
    page.fill("#message textarea", "   ")
    page.click("#send")
    wait_for("the error line", lambda: "empty message" in page.inner_text("#notice"))
    assert page.locator('#chat [data-testid="user"]').count() == 0
    assert store.counts() == before


def test_stop_and_leaving_mid_reply_store_the_partial_reply_as_cancelled(
    served: dict[str, Any], page: Page
) -> None:
    store: FeedbackStore = served["store"]
    page.goto(served["url"])
    page.wait_for_selector("#message textarea")
    page.fill("#message textarea", "Tell me a long story")
    page.click("#send")
    wait_for("the reply to start", lambda: streaming(page, 1))
    page.click("#stop")
    conv_id = newest_conversation(store)
    (stopped,) = wait_for("the stopped reply", lambda: [
        m for m in replies(store, conv_id) if m.finish_reason])
    assert stopped.finish_reason == "cancelled"
    assert 0 < stopped.completion_tokens < MAX_NEW_TOKENS
    wait_for("the notice", lambda: "stopped" in page.inner_text("#notice"))
    wait_for("the page to settle", lambda: settled(page, 1))

    # Closing the page while the next reply streams cancels it; what was written is kept.
    page.fill("#message textarea", "Another long story, please")
    page.click("#send")
    wait_for("the second reply to start", lambda: streaming(page, 2))
    page.close()
    left = wait_for("the reply cut short by leaving", lambda: [
        m for m in replies(store, conv_id)[1:] if m.finish_reason])[0]
    assert left.finish_reason == "cancelled"
    assert 0 < left.completion_tokens < MAX_NEW_TOKENS
