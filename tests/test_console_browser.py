"""The operator console in a real headless Chromium, against the real served app.

An operator logs in, filters the feedback log, opens a conversation (a hostile one's
markup is shown as text, never run), starts a training round on a tiny model and watches
it finish, sees the server switch to the new adapter and rolls it back, then downloads an
export whose rows are the store's. Training is kept small through the FEEDBACK_CHAT_TRAIN_*
and FEEDBACK_CHAT_GATE_* variables the training worker reads.
Needs Debian's Chromium at /usr/bin/chromium (``apt-get install chromium``).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import live_server as live_server_module
import pytest
import torch
from feedback_data import seed_preferences
from live_server import LiveServer, live_server
from screenshots import readme_screenshot
from tiny_models import make_tiny_model

from chat_app.console import CONSOLE_PATH, mount_console
from chat_app.server import create_app
from feedback_store import FeedbackStore, RowFilter, build_dpo_rows
from feedback_store.canary import CanaryConfig

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import Page, sync_playwright  # noqa: E402

pytestmark = pytest.mark.browser
torch.set_num_threads(1)

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
OPERATOR = ("ops", "operator-secret-1")
SMALL_ROUND = {
    "FEEDBACK_CHAT_TRAIN_KTO_STEPS": "4", "FEEDBACK_CHAT_TRAIN_DPO_STEPS": "4",
    "FEEDBACK_CHAT_TRAIN_BATCH_SIZE": "4", "FEEDBACK_CHAT_TRAIN_LEARNING_RATE": "0.005",
    "FEEDBACK_CHAT_TRAIN_MAX_LENGTH": "128", "FEEDBACK_CHAT_TRAIN_LORA_R": "8",
    "FEEDBACK_CHAT_TRAIN_LOG_EVERY": "1", "FEEDBACK_CHAT_GATE_MAX_DEGENERATE_SHARE": "1.0",
    "FEEDBACK_CHAT_GATE_MAX_DEGENERATE_INCREASE": "1.0", "FEEDBACK_CHAT_GATE_MAX_CANARY_KL": "5.0",
    "FEEDBACK_CHAT_GATE_MAX_NEW_TOKENS": "24",
}
# Records every heading the run summary shows, to see the page follow a run by itself.
WATCH_SUMMARY = """() => {
  window.__summaries = [];
  const box = document.querySelector('#run-summary');
  new MutationObserver(() => {
    const text = (box.querySelector('h3') || {}).innerText || '';
    if (text && window.__summaries[window.__summaries.length - 1] !== text)
      window.__summaries.push(text);
  }).observe(box, {subtree: true, childList: true, characterData: true});
}"""
HOSTILE = ('Hi <script>window.__xss1 = 1</script> <img src="x" onerror="window.__xss2 = 1"> '
           "${window.__xss3 = 1} **bold**")


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


@contextmanager
def console_server(model: Path, data_dir: Path, **overrides: Any) -> Iterator[LiveServer]:
    """The served app with the console mounted the way the server assembles it."""
    def assemble(services: Any) -> Any:
        app = create_app(services)
        if not any(getattr(r, "path", None) == CONSOLE_PATH for r in app.router.routes):
            mount_console(app, services)
        return app

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(live_server_module, "create_app", assemble)
        for key, value in SMALL_ROUND.items():
            mp.setenv(key, value)
        with live_server(model, data_dir, **overrides) as srv:
            yield srv


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Path]]:
    root = tmp_path_factory.mktemp("console-browser")
    model = make_tiny_model(root / "tiny")
    with console_server(model, root / "data", operator_user=OPERATOR[0],
                        operator_password=OPERATOR[1]) as srv:
        store = srv.services.store
        seed_preferences(store, rounds=3)
        conv = store.create_conversation(user_id="mallory")
        q = store.add_user_message(conversation_id=conv.id, content=HOSTILE)
        r = store.add_reply(parent_id=q.id, content="<b>not bold</b>", adapter_version="base")
        store.comment(reply_id=r.id, comment="<i>not italic</i>", user_id="mallory")
        yield srv, root


@pytest.fixture
def page(served: tuple[LiveServer, Path]) -> Iterator[Page]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1300, "height": 1000}, accept_downloads=True)
        finally:
            browser.close()


def table_column(page: Page, col: int) -> list[str]:
    return page.eval_on_selector_all(
        f'#log-table [data-testid^="cell-"][data-col="{col}"]', "els => els.map(e => e.innerText)")


def apply_filters(page: Page, *, kinds: tuple[str, ...] = (), user: str = "", search: str = "",
                  since: str = "") -> None:
    for box in page.query_selector_all("#f-kinds input[type=checkbox]"):
        if box.is_checked():
            box.click()
    for kind in kinds:
        page.click(f"#f-kinds label:has-text('{kind}')")
    page.fill("#f-user input, #f-user textarea", user)
    page.fill("#f-search input, #f-search textarea", search)
    page.fill("#f-since input, #f-since textarea", since)
    page.click("#f-apply")


def test_an_operator_reviews_feedback_retrains_rolls_back_and_exports(
    served: tuple[LiveServer, Path], page: Page
) -> None:
    srv, root = served
    store: FeedbackStore = srv.services.store
    engine = srv.services.engine

    # Log in on Gradio's login page.
    page.goto(srv.url + CONSOLE_PATH)
    page.fill("input[type=text]", OPERATOR[0])
    page.fill("input[type=password]", OPERATOR[1])
    page.keyboard.press("Enter")
    page.wait_for_selector('#log-table [data-testid="cell-0-0"]', timeout=60_000)
    assert "Signed in as ops" in page.inner_text("#console-who")
    total = store.counts()["events"]
    wait_for("the first page", lambda: f"{total} matching" in page.inner_text("#log-notice"))

    # Filter: edits about the moon.
    expected = [r.event.id for r in store.feedback_log(kinds=["edit"], search="moon")]
    assert expected
    apply_filters(page, kinds=("edit",), search="MOON")
    wait_for("the filtered log", lambda: f"{len(expected)} matching" in page.inner_text(
        "#log-notice"))
    assert table_column(page, 0) == [str(i) for i in expected]
    assert set(table_column(page, 2)) == {"edit"}

    # A row opens its conversation, with the edit marked.
    page.click('#log-table [data-testid="cell-0-6"]')
    wait_for("the conversation", lambda: "How far is the moon?" in page.inner_text(
        "#conversation"))
    conv_text = page.inner_text("#conversation")
    assert "edit (of #" in conv_text and "edited by user" in conv_text
    page.screenshot(path=str(root / "console-conversation.png"), full_page=True)
    readme_screenshot(page, "console-feedback.png")

    # A hostile conversation is shown as text.
    apply_filters(page, user="mallory")
    wait_for("mallory's events", lambda: table_column(page, 3) == ["mallory"])
    page.click('#log-table [data-testid="cell-0-2"]')
    wait_for("the hostile conversation", lambda: "<script>" in page.inner_text("#conversation"))
    assert "<b>not bold</b>" in page.inner_text("#conversation")
    assert page.locator("#conversation b:has-text('not bold')").count() == 0
    assert page.evaluate("[window.__xss1, window.__xss2, window.__xss3]") == [None, None, None]

    # Retrain now, and watch the run to its end: the page follows it by itself (its timer).
    page.click("button[role=tab]:has-text('Training')")
    page.evaluate(WATCH_SUMMARY)
    page.click("#retrain-now")
    wait_for("the run to start", lambda: "Started training run" in page.inner_text(
        "#train-notice"))
    run = store.registry.list_runs(limit=1)[0]
    page.screenshot(path=str(root / "console-run-live.png"), full_page=True)
    wait_for("the run to finish on the page", lambda: any(
        f"Run #{run.id}: {s}" in page.inner_text("#run-summary") for s in ("succeeded",
                                                                          "rejected")),
             timeout=480)
    run = store.registry.get_run(run.id)
    seen = page.evaluate("window.__summaries")
    assert seen[0] in (f"Run #{run.id}: queued", f"Run #{run.id}: running"), seen
    assert seen[-1] == f"Run #{run.id}: {run.status}"  # the timer's update, no click between
    summary = page.inner_text("#run-summary")
    assert f"Gate decision: {run.decision}" in summary and run.candidate_version in summary
    assert "pair_accuracy" in page.inner_text("#gate-table")
    wait_for("both phases in the loss plot", lambda: "dpo" in page.inner_text("#loss-plot")
             and "kto" in page.inner_text("#loss-plot"))
    page.screenshot(path=str(root / "console-run-done.png"), full_page=True)
    readme_screenshot(page, "console-training.png")

    # Adapters: promote the candidate if the gate did not, see the server switch, roll back.
    version = run.candidate_version
    page.click("button[role=tab]:has-text('Adapters')")
    page.click("#versions-refresh")
    wait_for("the new version", lambda: version in page.inner_text("#versions-table"))
    if run.decision != "promoted":
        page.click("#version-pick input")
        page.click(f"[role=option]:has-text('{version}')")
        page.click("#promote")
        wait_for("the promotion", lambda: "is now active" in page.inner_text(
            "#adapters-notice"))
    wait_for("the server to swap to the new adapter", lambda: engine.active_version == version)
    assert "★ active" in page.inner_text("#versions-table")
    page.click("#rollback")
    wait_for("the rollback", lambda: "base model" in page.inner_text("#adapters-notice"))
    assert store.registry.active_version() is None
    wait_for("the server to swap back", lambda: engine.active_version == "base")
    page.screenshot(path=str(root / "console-adapters.png"), full_page=True)

    # Canary: a candidate on trial with half of the new chats; the tab follows it by itself
    # (its timer); the operator rolls it back.
    trial = shutil.copytree(store.registry.get_version(version).path, root / "trial-adapter")
    store.registry.register_version(version="v0900", path=str(trial))
    page.click("button[role=tab]:has-text('Canary')")
    wait_for("the empty canary tab", lambda: "No canary is running" in page.inner_text(
        "#canary-summary"))
    store.canaries.start("v0900", CanaryConfig(share=0.5))
    wait_for("the canary on the page", lambda: "Canary v0900" in page.inner_text(
        "#canary-summary"), timeout=30)
    assert "canary" in page.inner_text("#canary-counts")
    wait_for("the server to load the canary", lambda: "v0900" in engine.loaded_versions())
    page.screenshot(path=str(root / "console-canary.png"), full_page=True)
    page.click("#canary-rollback")
    wait_for("the canary's end", lambda: "rolled back" in page.inner_text("#canary-notice"))
    assert store.registry.get_version("v0900").status == "rejected"
    assert "rolled back by hand by ops" in page.inner_text("#canary-history")
    wait_for("the server to unload it", lambda: "v0900" not in engine.loaded_versions())

    # Export the filtered view as DPO rows and download it.
    page.click("button[role=tab]:has-text('Feedback')")
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    apply_filters(page, since=today, user="user1")
    wait_for("the filtered log", lambda: table_column(page, 3)[:1] == ["user1"])
    page.click("#export-kind label:has-text('dpo')")
    page.click("#export")
    wait_for("the export", lambda: "Wrote" in page.inner_text("#export-note"))
    note = page.inner_text("#export-note")
    assert f"since {today} 00:00:00 UTC" in note and "user" in note.split("Not applied")[1]
    with page.expect_download() as download:
        page.click("#export-file a")
    path = download.value.path()
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    expected_rows = build_dpo_rows(store, RowFilter(since=datetime.fromisoformat(today)))
    assert rows == expected_rows and len(rows) >= 24
    page.screenshot(path=str(root / "console-export.png"), full_page=True)

    # Delete a conversation, after the confirmation; then forget a user.
    victim = store.feedback_log(limit=1)[0].event.conversation_id
    page.fill("#conv-id input", str(victim))
    page.click("#delete-conv")
    wait_for("the question", lambda: f"Delete conversation {victim}" in page.inner_text(
        "#confirm-erase-text"))
    assert store.get_conversation(victim).deleted_at is None  # nothing before the yes
    page.click("#confirm-erase-yes")
    wait_for("the deletion", lambda: f"Deleted conversation {victim}" in page.inner_text(
        "#erase-note"))
    record = store.get_conversation(victim)
    assert record.deleted_at is not None and record.deleted_by == "ops"
    assert store.messages(victim) == []
    assert "deleted" in page.inner_text("#conversation").lower()
    before = len(build_dpo_rows(store))
    page.fill("#forget-user input", "user1")
    page.click("#forget-user-btn")
    page.click("#confirm-erase-yes")
    wait_for("the user forgotten", lambda: "Forgot user1" in page.inner_text("#erase-note"))
    assert store.feedback_log(user_id="user1") == []
    assert len(build_dpo_rows(store)) < before
