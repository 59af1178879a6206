"""The chat page's habits in a real headless Chromium, at desktop and phone widths:
keyboard (Enter sends, Shift+Enter adds a line, Esc stops a reply), the system's dark
mode, no sideways scrolling at 375 px, and an axe-core accessibility scan with no
serious or critical violation. With FEEDBACK_CHAT_SCREENSHOTS=DIR set, the pages are
also saved there as PNGs (the README's screenshots come from this run).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from playwright.sync_api import Page, sync_playwright
from screenshots import readme_screenshot
from test_ui_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    free_port,
    newest_conversation,
    replies,
    settled,
    streaming,
    wait_for,
)
from tiny_models import make_tiny_adapter, make_tiny_model

from chat_app.engine import Engine, EngineConfig, SamplingParams
from chat_app.hotswap import AdapterWatcher
from chat_app.ui.page import PAGE_CSS, ChatPageSettings, build_chat_page
from feedback_store import FeedbackStore

pytestmark = pytest.mark.browser
torch.set_num_threads(1)

DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 740}
SERIOUS = ("serious", "critical")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("ui-page")
    model = make_tiny_model(root / "tiny")
    engine = Engine.from_config(EngineConfig(model=str(model), torch_threads=1))
    store = FeedbackStore.open(f"sqlite:///{root / 'feedback.db'}")
    # an adapter serves, so "Compare with another version" has the base to compare with
    make_tiny_adapter(model, root / "v0001")
    store.registry.register_version(version="v0001", path=str(root / "v0001"))
    store.registry.activate("v0001")
    AdapterWatcher(store.registry, engine).sync()
    settings = ChatPageSettings(
        sampling=SamplingParams(max_new_tokens=400, temperature=0.8, seed=7),
        stream_interval_s=0.02, browser_state_secret="test-secret")
    demo = build_chat_page(store=store, engine=engine, settings=settings)
    demo.queue(default_concurrency_limit=4)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                css=PAGE_CSS)
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "store": store, "root": root}
    finally:
        demo.close()
        engine.close()
        store.close()


def open_page(p: Any, viewport: dict[str, int], **context: Any) -> Page:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    return browser.new_context(viewport=viewport, **context).new_page()


def serious_violations(page: Page) -> list[tuple[str, str, int]]:
    from axe_playwright_python.sync_playwright import Axe

    found = Axe().run(page).response["violations"]
    return [(v["id"], v["impact"], [(n["target"], n.get("failureSummary", "")[:200])
                                    for n in v["nodes"]])
            for v in found if v["impact"] in SERIOUS]


def test_enter_sends_shift_enter_adds_a_line_and_esc_stops_the_reply(
        served: dict[str, Any]) -> None:
    store: FeedbackStore = served["store"]
    with sync_playwright() as p:
        page = open_page(p, DESKTOP)
        page.goto(served["url"])
        box = page.locator("#message textarea")
        box.click()
        box.type("line one")
        page.keyboard.press("Shift+Enter")
        box.type("line two")
        page.keyboard.press("Enter")
        wait_for("the reply to start", lambda: streaming(page, 1))
        conv = newest_conversation(store)
        assert store.messages(conv)[0].content == "line one\nline two"
        page.keyboard.press("Escape")
        wait_for("the stop", lambda: settled(page, 1))
        (reply,) = wait_for("the stored reply", lambda: replies(store, conv))
        assert reply.finish_reason == "cancelled" and reply.completion_tokens < 400


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_the_page_works_at_desktop_and_phone_width_in_dark_mode_and_passes_axe(
        served: dict[str, Any], viewport: dict[str, int]) -> None:
    store: FeedbackStore = served["store"]
    name = "desktop" if viewport is DESKTOP else "phone"
    with sync_playwright() as p:
        page = open_page(p, viewport, color_scheme="dark")
        page.goto(served["url"])
        page.wait_for_selector("#message textarea")
        assert page.evaluate("document.body.classList.contains('dark')"), "dark mode"
        page.fill("#message textarea", "Hello from a " + name)
        page.locator("#send").click()
        wait_for("the reply to start", lambda: streaming(page, 1))
        page.locator("#stop").click()
        wait_for("the reply to settle", lambda: settled(page, 1))
        conv = newest_conversation(store)
        assert store.messages(conv)[0].content == "Hello from a " + name
        wait_for("the chat in the list", lambda: page.locator("#chat-list label").count() == 1)
        width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1] + 1, f"sideways scrolling at {name} width: {width}"
        readme_screenshot(page, f"chat-{name}.png")
        assert serious_violations(page) == []


def test_a_side_by_side_pick_is_a_preference_pair_in_the_dpo_export(
        served: dict[str, Any]) -> None:
    store: FeedbackStore = served["store"]
    with sync_playwright() as p:
        page = open_page(p, DESKTOP)
        page.goto(served["url"])
        page.wait_for_selector("#message textarea")
        page.fill("#message textarea", "Compare these")
        page.locator("#send").click()
        wait_for("the reply to start", lambda: streaming(page, 1))
        page.locator("#stop").click()
        wait_for("the reply to settle", lambda: settled(page, 1))
        assert not page.locator("#pick-a").is_visible()
        page.locator("#compare").click()
        wait_for("the two replies side by side", lambda: page.locator("#pick-a").is_visible()
                 and "A" in page.inner_text("#side-a"))
        conv = newest_conversation(store)
        first, second = replies(store, conv)
        assert {first.adapter_version, second.adapter_version} == {"v0001", "base"}
        shown_a = page.inner_text("#side-a")
        page.locator("#pick-a").click()
        wait_for("the panel to close", lambda: not page.locator("#pick-a").is_visible())
        wait_for("the choice", lambda: any(e.kind == "choice" for e in
                                           store.events_for(first.id) + store.events_for(
                                               second.id)))
    out = served["root"] / "pairs.jsonl"
    subprocess.run([sys.executable, "-m", "chat_app.cli", "export", "--kind", "dpo", "--out",
                    str(out), "--database-url", str(store.db.engine.url)], check=True)
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
    assert {chosen, rejected} == {first.content, second.content}
    def words(text: str) -> str:
        return " ".join(re.findall(r"[A-Za-z]+", text))

    assert words(chosen)[:40] in words(shown_a)  # the reply shown as A is the one chosen
