"""The operator console: its handlers on a real store, a real training round on a tiny model,
and its access control over HTTP against the real served app.

Handlers are called directly (filtering, paging, conversation view, export, retrain now,
promote, rollback, schedule, overview) on SQLite and, with FEEDBACK_CHAT_TEST_POSTGRES_URL,
on PostgreSQL. The HTTP tests run the app assembled as ``chat_app.server.create_app`` does,
with the console mounted by ``mount_console``, and check that nothing of the console
answers without the operator's login, a chat user's login included.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import live_server as live_server_module
import pytest
import torch
from feedback_data import seed_preferences
from live_server import LiveServer, live_server
from sqlalchemy import select, update
from starlette.routing import Mount
from tiny_models import make_tiny_model

from chat_app.cli import main as cli_main
from chat_app.console import (
    CONSOLE_PATH,
    ConsoleContext,
    ConsoleError,
    actions,
    mount_console,
    plots,
    queries,
    runs,
)
from chat_app.console.context import context_from_services
from chat_app.console.conversation import conversation_tree, render_conversation
from chat_app.console.mount import PUBLIC_PATHS, PUBLIC_PREFIXES
from chat_app.server import create_app
from chat_app.settings import retrain_settings
from feedback_store import FeedbackStore, RowFilter, build_dpo_rows, build_kto_rows
from feedback_store.models import FeedbackEventRow, MessageRow
from feedback_store.reports import feedback_facets, feedback_volume, thumbs_by_version
from retrain import start_scheduler

torch.set_num_threads(1)

SMALL_TRAIN = {"kto_steps": 4, "dpo_steps": 4, "batch_size": 4, "learning_rate": 5e-3,
               "max_length": 128, "lora_r": 8, "log_every": 1,
               # a random-weight model's replies never end: the KL probe and the own-reply
               # pairs sample 24 tokens, as the gate does, not 256
               "kl_probe_tokens": 24}
TINY_GATE = {"max_degenerate_share": 1.0, "max_degenerate_increase": 1.0, "max_canary_kl": 5.0,
             "max_new_tokens": 24}
OPERATOR = ("ops", "operator-secret-1")
CHAT_USER = ("alice", "alice-secret")
HOSTILE = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2"> **b**'


def make_ctx(store: FeedbackStore, tmp_path: Path, **kw: Any) -> ConsoleContext:
    return ConsoleContext(store=store, retrain_settings=lambda: {}, export_dir=tmp_path / "exp",
                          **kw)


def set_times(store: FeedbackStore, when: dict[int, datetime]) -> None:
    """Give events chosen creation times (a real UPDATE, as if they were made then)."""
    def work(s):  # type: ignore[no-untyped-def]
        for event_id, t in when.items():
            s.execute(update(FeedbackEventRow).where(FeedbackEventRow.id == event_id)
                      .values(created_at=t))
    store.db.run(work)


def all_events(store: FeedbackStore) -> list[dict[str, Any]]:
    """Every event with the texts a search looks at, read straight from the tables."""
    def work(s):  # type: ignore[no-untyped-def]
        msgs = {m.id: m for m in s.scalars(select(MessageRow))}
        out = []
        for e in s.scalars(select(FeedbackEventRow).order_by(FeedbackEventRow.id.desc())):
            reply = msgs[e.reply_id]
            texts = [reply.content, msgs[reply.parent_id].content, e.comment or "",
                     msgs[e.other_reply_id].content if e.other_reply_id else ""]
            out.append({"id": e.id, "kind": e.kind, "user": e.user_id,
                        "version": e.adapter_version, "texts": texts,
                        "day": e.created_at.strftime("%Y-%m-%d")})
        return out
    return store.db.run(work, write=False)


def seed_log(store: FeedbackStore) -> dict[str, int]:
    """Preference feedback on version "base", plus a conversation on v0001 with every kind."""
    seed_preferences(store, rounds=2)
    conv = store.create_conversation(user_id="ann", system_prompt="Be kind.")
    q = store.add_user_message(conversation_id=conv.id, content="Tell me about the MOON " + HOSTILE)
    r1 = store.add_reply(parent_id=q.id, content="The moon is far away.", adapter_version="v0001")
    store.rate(reply_id=r1.id, rating="down", user_id="ann")
    r2 = store.add_reply(source_reply_id=r1.id, content="It orbits Earth.", adapter_version="v0001")
    store.choose(chosen_id=r2.id, rejected_id=r1.id, user_id="ann")
    edit, _ = store.edit_reply(reply_id=r1.id, content="The moon is 384,000 km away.",
                               user_id="ann")
    store.comment(reply_id=r2.id, comment="Short but <b>fine</b>", tags=["brief"], user_id="ann")
    q2 = store.add_user_message(conversation_id=conv.id, content="And the sun?", parent_id=r2.id)
    r3 = store.add_reply(parent_id=q2.id, content="Much farther.", adapter_version="v0001")
    store.rate(reply_id=r3.id, rating="up")  # anonymous
    return {"conv": conv.id, "r1": r1.id, "r2": r2.id, "edit": edit.id, "r3": r3.id}


# -- feedback log ------------------------------------------------------------------------


def test_filters_select_exactly_the_events_asked_for(store: FeedbackStore, tmp_path: Path):
    seed_log(store)
    events = all_events(store)
    old = [e["id"] for e in events[-10:]]  # the ten oldest events happened in January
    set_times(store, {i: datetime(2026, 1, 5, 12, tzinfo=UTC) for i in old})
    ctx = make_ctx(store, tmp_path, page_size=500)

    def ids(**form: Any) -> list[int]:
        view = queries.open_log(ctx, queries.parse_filter(**form))
        got = [r.event.id for r in view.rows]
        assert view.total == len(got)  # the count and the page agree
        return got

    assert ids(kinds=["up"]) == [e["id"] for e in events if e["kind"] == "up"]
    assert ids(kinds=["edit", "choice"]) == [e["id"] for e in events
                                             if e["kind"] in ("edit", "choice")]
    assert ids(adapter_version="v0001") == [e["id"] for e in events if e["version"] == "v0001"]
    assert ids(user="user1") == [e["id"] for e in events if e["user"] == "user1"]
    assert ids(search="moon") == [e["id"] for e in events
                                  if any("moon" in t.lower() for t in e["texts"])]
    assert ids(search="<b>fine") == [e["id"] for e in events if e["kind"] == "comment"]
    assert ids(until="2026-01-05") == sorted(old, reverse=True)  # a bare date: the whole day
    assert ids(since="2026-01-06") == [e["id"] for e in events if e["id"] not in old]
    assert ids(since="2026-01-05 11:00", until="2026-01-05T13:00+00:00") == sorted(old,
                                                                                 reverse=True)
    assert ids(kinds=["down"], user="ann", adapter_version="v0001") == [
        e["id"] for e in events if (e["kind"], e["user"], e["version"]) == ("down", "ann", "v0001")]
    assert ids(search="no such text anywhere") == []
    facets = feedback_facets(store)
    assert facets.adapter_versions == ("base", "v0001")
    assert facets.users == ("ann", "user0", "user1")  # anonymous votes name no one
    assert facets.first_event_at == datetime(2026, 1, 5, 12, tzinfo=UTC)
    table = queries.open_log(ctx, queries.parse_filter(kinds=["comment"])).table
    assert table[0][2] == "comment" and "Short but <b>fine</b> [brief]" in table[0][7]


def test_bad_filters_are_refused_with_every_problem_at_once():
    with pytest.raises(ConsoleError) as err:
        queries.parse_filter(kinds=["meh"], since="yesterday", until="2026-13-01")
    assert len(err.value.problems) == 3
    assert "meh" in str(err.value) and "yesterday" in str(err.value)
    with pytest.raises(ConsoleError, match="before until"):
        queries.parse_filter(since="2026-02-01", until="2026-01-01")


def test_keyset_paging_walks_every_event_once_and_back(store: FeedbackStore, tmp_path: Path):
    seed_log(store)
    expected = [e["id"] for e in all_events(store) if e["kind"] in ("up", "down")]
    ctx = make_ctx(store, tmp_path, page_size=7)
    view = queries.open_log(ctx, queries.parse_filter(kinds=["up", "down"]))
    pages = [view]
    while view.next_before_id is not None:
        view = queries.older_page(ctx, view)
        pages.append(view)
    seen = [r.event.id for p in pages for r in p.rows]
    assert seen == expected and len(pages) == -(-len(expected) // 7)
    assert all(len(p.rows) == 7 for p in pages[:-1]) and view.total == len(expected)
    assert "last page" in view.describe()
    assert queries.older_page(ctx, view) == view  # the last page stays the last page
    back = queries.newer_page(ctx, view)
    assert [r.event.id for r in back.rows] == [r.event.id for r in pages[-2].rows]
    assert back.page_number == len(pages) - 1
    first = queries.newer_page(ctx, queries.newer_page(ctx, pages[1]))
    assert [r.event.id for r in first.rows] == [r.event.id for r in pages[0].rows]


# -- conversation view -------------------------------------------------------------------


def test_conversation_view_shows_each_turn_with_all_replies_and_their_feedback(
    store: FeedbackStore,
):
    ids = seed_log(store)
    tree = conversation_tree(store, ids["conv"])
    (turn,) = tree.roots
    assert turn.message.content.startswith("Tell me about the MOON")
    origins = [(r.message.id, r.message.origin) for r in turn.replies]
    assert origins == [(ids["r1"], "generated"), (ids["r2"], "regenerated"),
                       (ids["edit"], "edit")]
    r1, r2, edit = turn.replies
    assert [line.split(" (")[0] for line in r1.feedback] == [
        "thumbs down by ann", f"not chosen: ann chose reply #{ids['r2']} over this one",
        f"edited by ann into reply #{ids['edit']}"]
    assert any("comment by ann" in line and "Short but <b>fine</b>" in line and "brief" in line
               for line in r2.feedback)
    assert edit.feedback[0].startswith(f"ann's edit of reply #{ids['r1']}")
    assert [t.message.content for t in r2.followups] == ["And the sun?"]
    assert r2.followups[0].replies[0].feedback[0].startswith("thumbs up by anonymous")

    page = render_conversation(tree, highlight={ids["r2"]})
    assert "<script>" not in page and "<img" not in page and "<b>fine" not in page
    assert "&lt;script&gt;window.__xss = 1&lt;/script&gt;" in page
    assert f"regenerated (in place of #{ids['r1']})" in page
    assert f"edit (of #{ids['r1']} by ann)" in page and "version v0001" in page
    assert f'class="fc-reply fc-highlight" id="fc-reply-{ids["r2"]}"' in page
    assert f"continued from reply #{ids['r2']}" in page and "Be kind." in page


def test_branches_are_drawn_under_their_replies_and_long_chats_render(store: FeedbackStore):
    conv = store.create_conversation()
    q = store.add_user_message(conversation_id=conv.id, content="root")
    a = store.add_reply(parent_id=q.id, content="a")
    b = store.add_reply(source_reply_id=a.id, content="b")
    store.add_user_message(conversation_id=conv.id, content="after a", parent_id=a.id)
    store.add_user_message(conversation_id=conv.id, content="after b", parent_id=b.id)
    page = render_conversation(conversation_tree(store, conv.id))
    assert page.count('class="fc-branch"') == 2 and "continued from" not in page

    long = store.create_conversation()
    parent = None
    for i in range(600):  # deeper than Python's recursion limit if drawn recursively
        u = store.add_user_message(conversation_id=long.id, content=f"turn {i}", parent_id=parent)
        parent = store.add_reply(parent_id=u.id, content=f"reply {i}").id
    page = render_conversation(conversation_tree(store, long.id))
    assert page.count('class="fc-user"') == 600 and "reply 599" in page


# -- export ------------------------------------------------------------------------------


def test_export_writes_the_rows_of_the_store_and_of_the_export_command(
    store: FeedbackStore, db_url: str, tmp_path: Path
):
    seed_log(store)
    events = all_events(store)
    set_times(store, {e["id"]: datetime(2026, 1, 5, tzinfo=UTC) for e in events[-9:]})
    ctx = make_ctx(store, tmp_path)
    flt = queries.parse_filter(since="2026-01-06", kinds=["up"], user="bob", search="x")
    kto_with_tags = functools.partial(build_kto_rows, with_tags=True)  # as exported
    for kind, build in (("kto", kto_with_tags), ("dpo", build_dpo_rows)):
        result = queries.export_view(ctx, flt, kind)
        assert result.path.parent == ctx.export_dir
        rows = [json.loads(line) for line in result.path.read_text().splitlines()]
        expected = build(store, RowFilter(since=datetime(2026, 1, 6, tzinfo=UTC)))
        assert rows == expected and result.rows == len(rows) > 0
        assert len(expected) < len(build(store))  # the since filter did remove rows
        cli_out = tmp_path / f"cli-{kind}.jsonl"
        assert cli_main(["export", "--kind", kind, "--out", str(cli_out), "--since",
                         "2026-01-06", "--database-url", db_url]) == 0
        assert cli_out.read_bytes() == result.path.read_bytes()
        text = result.describe()
        assert "since 2026-01-06" in text and "kind" in text and "user" in text
        assert "text search" in text and "until" not in text

    by_version = queries.export_view(ctx, queries.parse_filter(adapter_version="v0001"), "dpo")
    rows = [json.loads(line) for line in by_version.path.read_text().splitlines()]
    assert rows == build_dpo_rows(store, RowFilter(adapter_version="v0001")) and len(rows) == 2
    with pytest.raises(ConsoleError):
        queries.export_view(ctx, flt, "csv")


# -- adapters and schedule ---------------------------------------------------------------


def test_promote_and_rollback_move_the_active_version(store: FeedbackStore, tmp_path: Path):
    ctx = make_ctx(store, tmp_path)
    reg = store.registry
    run = reg.start_run(trigger="test")
    reg.update_run(run.id, status="succeeded", kto_rows=5, dpo_rows=3)
    reg.register_version(version="v0001", path=str(tmp_path / "v0001"), run_id=run.id,
                         metrics={"pair_accuracy": 0.75})
    reg.register_version(version="v0002", path=str(tmp_path / "v0002"), parent_version="v0001")

    (choice,) = runs.run_choices(ctx)
    assert choice[1] == run.id and choice[0].startswith(f"#{run.id} succeeded (test, ")
    assert runs.default_run_id(ctx) == run.id
    assert actions.promote(ctx, "v0001", by="ops").ok
    assert reg.active_version().version == "v0001"
    assert reg.active_version().reasons == ("promoted by operator ops",)
    again = actions.promote(ctx, "v0001")
    assert not again.ok and "already active" in again.message
    assert actions.promote(ctx, "v0002").ok
    rows, names, line = runs.versions_table(ctx)
    assert names == ["v0002", "v0001"] and "Active in the registry:** v0002" in line
    assert rows[0][:3] == ["v0002", "★ active", "v0001"] and rows[1][1] == "retired"
    assert rows[1][5] == "8" and rows[1][6] == "0.75"  # data rows of its run, gate metric

    back = actions.rollback(ctx)
    assert back.ok and back.version == "v0001" and reg.active_version().version == "v0001"
    base = actions.rollback(ctx)
    assert base.ok and "base model" in base.message and reg.active_version() is None
    nothing = actions.rollback(ctx)
    assert not nothing.ok and "Nothing to roll back" in nothing.message
    missing = actions.promote(ctx, "v0099")
    assert not missing.ok and "no adapter version" in missing.message
    assert not actions.promote(ctx, "").ok and reg.active_version() is None


def test_a_run_shows_live_progress_then_its_error_when_it_fails(store: FeedbackStore,
                                                                tmp_path: Path):
    ctx = make_ctx(store, tmp_path)
    assert runs.run_view(ctx, None).run is None
    reg = store.registry
    run = reg.start_run(trigger="manual", requested_by="ops")
    queued = runs.run_view(ctx, None)
    assert queued.run.id == run.id and queued.running and "Progress:** queued" in queued.summary
    steps = [{"phase": "kto", "step": i, "total_steps": 4, "loss": 0.5 / i,
              "reward_margin": float("nan") if i == 1 else 0.1 * i} for i in (1, 2)]
    reg.update_run(run.id, status="running", progress=steps[-1], history=steps)
    live = runs.run_view(ctx, run.id)
    assert "kto, step 2 of 4 (50%), loss 0.25, reward margin 0.2" in live.summary
    assert list(live.curves["step"]) == [1, 2] and live.curves["reward_margin"].isna().tolist() \
        == [True, False]
    assert live.fingerprint != queued.fingerprint and live.error == ""
    reg.update_run(run.id, status="failed", error="RuntimeError: <boom>\n  at step 3")
    failed = runs.run_view(ctx, run.id)
    assert not failed.running and failed.error == "RuntimeError: <boom>\n  at step 3"
    assert "The run failed" in failed.summary and failed.fingerprint != live.fingerprint
    assert "no training run 99" in runs.run_view(ctx, 99).summary


def test_schedule_changes_land_in_the_store_where_every_scheduler_reads_them(
    sqlite_url: str, tmp_path: Path
):
    store = FeedbackStore.open(sqlite_url)
    ctx = make_ctx(store, tmp_path, default_schedule=(45.0, 7))
    view = actions.schedule_view(ctx)
    assert (view.interval_minutes, view.min_feedback, view.paused) == (45.0, 7, False)
    assert "another process" in view.describe()
    view = actions.update_schedule(ctx, interval_minutes="15", min_feedback=3.0, paused=True)
    assert store.registry.get_state("schedule") == {"interval_minutes": 15.0, "min_feedback": 3,
                                                    "paused": True}
    assert view.paused and "paused" in view.describe()
    with pytest.raises(ConsoleError) as err:
        actions.update_schedule(ctx, interval_minutes=0, min_feedback=2.5, paused=False)
    assert len(err.value.problems) == 2
    assert store.registry.get_state("schedule")["interval_minutes"] == 15.0  # unchanged

    settings = {"database_url": sqlite_url, "adapters_dir": str(tmp_path / "a"), "model": "m"}
    scheduler = start_scheduler(settings=settings, interval_minutes=60, min_feedback=20)
    try:  # a scheduler starting later takes the console's schedule
        state = scheduler.state()
        assert (state["interval_minutes"], state["min_feedback"], state["paused"]) == (15, 3, True)
        ctx.scheduler = scheduler
        view = actions.update_schedule(ctx, interval_minutes=30, min_feedback=1, paused=False)
        assert view.runs_here and view.next_run_time and not view.paused
        nxt = datetime.fromisoformat(scheduler.state()["next_run_time"])
        assert 0 < (nxt - datetime.now(nxt.tzinfo)).total_seconds() <= 30 * 60 + 5
        assert store.registry.get_state("schedule")["interval_minutes"] == 30.0
        paused = actions.update_schedule(ctx, interval_minutes=30, min_feedback=1, paused=True)
        assert paused.next_run_time is None and "none while paused" in paused.describe()
    finally:
        scheduler.shutdown()
        store.close()


# -- overview ----------------------------------------------------------------------------


def test_overview_counts_volume_by_kind_and_thumbs_per_version(store: FeedbackStore,
                                                              tmp_path: Path):
    ids = seed_log(store)
    store.rate(reply_id=ids["r1"], rating="up", user_id="ann")  # ann changes her mind
    store.rate(reply_id=ids["r3"], rating="down")  # anonymous votes on a reply count once
    events = all_events(store)
    days = {e["id"]: datetime(2026, 3, 1 + i % 3, 10 + i % 2, tzinfo=UTC)
            for i, e in enumerate(events)}
    set_times(store, days)
    expected: dict[tuple[str, str], int] = {}
    for e in events:
        key = (days[e["id"]].strftime("%Y-%m-%d"), e["kind"])
        expected[key] = expected.get(key, 0) + 1
    points = feedback_volume(store, bucket="day")
    assert {(p.bucket_start.strftime("%Y-%m-%d"), p.kind): p.count for p in points} == expected
    hours = feedback_volume(store, bucket="hour", since=datetime(2026, 3, 2, tzinfo=UTC),
                            until=datetime(2026, 3, 3, tzinfo=UTC))
    assert {p.bucket_start.hour for p in hours} == {10, 11}
    assert sum(p.count for p in hours) == sum(1 for t in days.values() if t.day == 2)

    thumbs = {t.adapter_version: t for t in thumbs_by_version(store)}
    assert (thumbs["v0001"].up, thumbs["v0001"].down) == (1, 1)  # ann's latest: up; anon: down
    base_votes = [e for e in events if e["version"] == "base" and e["kind"] in ("up", "down")]
    assert thumbs["base"].ratings == len(base_votes) and thumbs["base"].up_rate == 0.5

    ctx = make_ctx(store, tmp_path)
    vol, th = plots.overview(ctx, bucket="day", days=3660, now=datetime(2026, 3, 4, tzinfo=UTC))
    assert vol["events"].sum() == len(events) and list(vol.columns) == plots.VOLUME_COLUMNS
    assert set(th["label"]) == {f"base (n={len(base_votes)})", "v0001 (n=2)"}
    with pytest.raises(ConsoleError):
        plots.overview(ctx, days="a week")


# -- retrain now, end to end, with the served engine following ---------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("console") / "tiny")


@contextmanager
def console_server(model: Path, data_dir: Path, **overrides: Any) -> Iterator[LiveServer]:
    """The served app with the console mounted the way the server assembles it; the
    FastAPI app is kept as ``srv.app``."""
    assembled: list[Any] = []

    def assemble(services: Any) -> Any:
        app = create_app(services)
        if not any(getattr(r, "path", None) == CONSOLE_PATH for r in app.router.routes):
            mount_console(app, services)
        assembled.append(app)
        return app

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(live_server_module, "create_app", assemble)
        with live_server(model, data_dir, **overrides) as srv:
            srv.app = assembled[0]  # type: ignore[attr-defined]
            yield srv


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with console_server(tiny_model, tmp_path_factory.mktemp("served") / "data",
                        operator_user=OPERATOR[0], operator_password=OPERATOR[1],
                        users=":".join(CHAT_USER)) as srv:
        yield srv


def wait_for(what: str, probe: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}")


def test_retrain_now_trains_to_the_end_and_the_server_follows_promote_and_rollback(
    server: LiveServer,
):
    store, engine = server.services.store, server.services.engine
    seed_preferences(store, rounds=3)
    ctx = context_from_services(server.services, retrain_settings={
        **retrain_settings(server.settings), "train": SMALL_TRAIN, "gate": TINY_GATE,
        "eval_fraction": 0.3, "heartbeat_seconds": 0.5})
    started = actions.retrain_now(ctx, requested_by="ops")
    assert started.ok and started.run_id is not None, started.message
    second = actions.retrain_now(ctx, requested_by="ops")
    assert not second.ok and "already in progress" in second.message
    live = runs.run_view(ctx, None)  # the default view is the run in progress
    assert live.run.id == started.run_id and live.running

    done = wait_for("the run to end", lambda: (v := runs.run_view(ctx, started.run_id))
                    .run.status in runs.FINAL and v, timeout=480)
    assert done.run.status in ("succeeded", "rejected"), done.error
    assert f"Run #{started.run_id}: {done.run.status}" in done.summary and "by ops" in done.summary
    assert set(done.curves["phase"]) == {"kto", "dpo"} and done.curves["loss"].notna().all()
    assert len(done.curves) == len(done.run.history)
    assert [row[0] for row in done.gate][:2] == ["pair_accuracy", "pair_margin"]
    assert all(f"- {runs.md(r)}" in done.summary for r in done.run.reasons)
    version = done.run.candidate_version
    if done.run.decision != "promoted":  # the operator overrides the gate
        assert actions.promote(ctx, version, by="ops").ok
    wait_for("the server to serve the new version", lambda: engine.active_version == version, 60)
    rows, _, _ = runs.versions_table(ctx)
    assert rows[0][0] == version and rows[0][1] == "★ active"
    assert rows[0][5] == str(done.run.kto_rows + done.run.dpo_rows)

    assert actions.rollback(ctx).ok and store.registry.active_version() is None
    wait_for("the server to roll back", lambda: engine.active_version == "base", 60)
    assert actions.promote(ctx, version, by="ops").ok
    wait_for("the server to serve it again", lambda: engine.active_version == version, 60)


# -- access control over HTTP ------------------------------------------------------------


def login(client: httpx.Client, base: str, who: tuple[str, str]) -> httpx.Response:
    return client.post(base + "/login", data={"username": who[0], "password": who[1]})


def console_dependencies(server: LiveServer) -> list[dict[str, Any]]:
    with httpx.Client(timeout=30) as op:
        assert login(op, server.url + CONSOLE_PATH, OPERATOR).status_code == 200
        config = op.get(server.url + CONSOLE_PATH + "/config")
        assert config.status_code == 200
        return config.json()["dependencies"]


def console_routes(server: LiveServer, file_path: Path) -> list[tuple[str, str]]:
    """(method, path) of every route the mounted console answers, parameters filled in,
    leaving out the login page and static assets (which answer anyone)."""
    mount = next(r for r in server.app.router.routes  # type: ignore[attr-defined]
                 if isinstance(r, Mount) and r.path == CONSOLE_PATH)
    out = []

    def walk(routes: list[Any], prefix: str) -> None:
        for route in routes:
            path = prefix + getattr(route, "path", "")
            if isinstance(route, Mount):
                walk(route.routes, path)
                continue
            if hasattr(route, "original_router"):  # FastAPI's included router (/gradio_api)
                walk(route.original_router.routes, prefix + route.include_context.prefix)
                continue
            if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
                continue
            path = path.replace("{path_or_url:path}", str(file_path))
            path = re.sub(r"\{[^}]+\}", "x", path)
            for method in sorted(getattr(route, "methods", None) or {"GET"}):
                out.append((method, path))

    walk(mount.app.app.routes, "")  # OperatorGate -> the Gradio app
    return out


def test_every_console_route_refuses_anyone_but_the_operator(server: LiveServer):
    base = server.url + CONSOLE_PATH
    deps = console_dependencies(server)
    retrain = next(d for d in deps if [_elem(server, "retrain-now"), "click"] in d["targets"])
    ctx = context_from_services(server.services)
    export = queries.export_view(ctx, queries.LogFilter(), "kto")
    runs_before = len(server.services.store.registry.list_runs())
    join = {"data": [], "fn_index": retrain["id"], "trigger_id": _elem(server, "retrain-now"),
            "session_hash": "attacker", "event_data": None}
    routes = console_routes(server, export.path)
    assert len(routes) > 40 and ("POST", "/gradio_api/queue/join") in routes
    assert ("GET", "/gradio_api/startup-events") in routes  # Gradio leaves it open; not here

    anonymous = httpx.Client(timeout=30)
    chat_user = httpx.Client(timeout=30)
    assert login(chat_user, server.url, CHAT_USER).status_code == 200
    assert chat_user.get(server.url + "/config").status_code == 200  # a valid chat login
    assert login(chat_user, base, CHAT_USER).status_code != 200  # not an operator login
    for client in (anonymous, chat_user):
        page = client.get(base + "/")
        assert page.status_code == 200 and "Retrain now" not in page.text  # the login page
        for method, path in routes:
            body = join if path.endswith("/queue/join") else None
            r = client.request(method, base + path, json=body)
            assert r.status_code == 401, (method, path, r.status_code)
        client.close()
    assert len(server.services.store.registry.list_runs()) == runs_before  # nothing started

    with httpx.Client(timeout=30) as op:
        assert login(op, base, OPERATOR).status_code == 200
        assert op.get(base + "/gradio_api/info").json()["named_endpoints"] == {}  # all private
        got = op.get(base + f"/gradio_api/file={export.path}")
        assert got.status_code == 200 and got.content == export.path.read_bytes()
        refresh = next(d for d in deps
                       if [_elem(server, "versions-refresh"), "click"] in d["targets"])
        ok = op.post(base + "/gradio_api/queue/join", json={
            **join, "fn_index": refresh["id"], "trigger_id": _elem(server, "versions-refresh"),
            "session_hash": "operator"})
        assert ok.status_code == 200 and "event_id" in ok.json()
    with httpx.Client(timeout=30) as chat:  # the export is not in a folder the chat page serves
        assert login(chat, server.url, CHAT_USER).status_code == 200
        assert chat.get(server.url + f"/gradio_api/file={export.path}").status_code == 403


_ELEM_IDS: dict[str, int] = {}


def _elem(server: LiveServer, elem_id: str) -> int:
    """The component id of the console element ``elem_id`` (from the operator's config)."""
    if not _ELEM_IDS:
        with httpx.Client(timeout=30) as op:
            login(op, server.url + CONSOLE_PATH, OPERATOR)
            for c in op.get(server.url + CONSOLE_PATH + "/config").json()["components"]:
                if c.get("props", {}).get("elem_id"):
                    _ELEM_IDS[c["props"]["elem_id"]] = c["id"]
    return _ELEM_IDS[elem_id]


def test_the_chat_page_exposes_no_operator_function(server: LiveServer):
    console_ids = {c for c in ("retrain-now", "promote", "rollback", "export", "s-save")}
    assert all(_elem(server, c) for c in console_ids)
    with httpx.Client(timeout=30) as chat:
        assert login(chat, server.url, CHAT_USER).status_code == 200
        config = chat.get(server.url + "/config").json()
        info = chat.get(server.url + "/gradio_api/info").json()
    elem_ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert "chat" in elem_ids and not elem_ids & console_ids
    api_names = {d.get("api_name") for d in config["dependencies"]} | set(info["named_endpoints"])
    operator_words = re.compile(r"retrain|promot|rollback|roll_back|export|schedule|adapter|"
                                r"version|console|operator|log", re.IGNORECASE)
    assert api_names and not [n for n in api_names if n and operator_words.search(str(n))]
    assert "/send" in info["named_endpoints"]  # the chat page's own API is there


def test_without_operator_credentials_the_console_is_off(tiny_model: Path, tmp_path: Path):
    with console_server(tiny_model, tmp_path / "data") as srv:
        for path in ("", "/", "/config", "/gradio_api/info", "/login"):
            r = httpx.get(srv.url + CONSOLE_PATH + path, follow_redirects=True)
            assert r.status_code == 403, path
            assert "FEEDBACK_CHAT_OPERATOR_USER" in r.text
        assert httpx.get(srv.url + "/healthz").status_code == 200
