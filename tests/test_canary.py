"""Canary rollout in the store: assignment, the signals counted per version, the
decision rule, and the decisions applied (on SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

import pytest

from feedback_store import Conflict, FeedbackStore, InvalidInput
from feedback_store.canary import CanaryConfig, in_canary
from feedback_store.sequential import ArmCounts, Rule, decide, wilson

FAST = CanaryConfig(share=0.5, min_ratings=10, time_limit_hours=1.0, max_ratings=400)


def test_assignment_is_a_fixed_split_of_conversation_ids() -> None:
    ids = range(1, 20001)
    hits = [i for i in ids if in_canary(i, "v0002", 0.2)]
    assert 0.18 < len(hits) / len(ids) < 0.22
    assert hits == [i for i in ids if in_canary(i, "v0002", 0.2)]  # the same every time
    other = {i for i in ids if in_canary(i, "v0003", 0.2)}
    assert len(other & set(hits)) < 0.3 * len(hits)  # each canary draws its own split
    assert not any(in_canary(i, "v0002", 0.0) for i in ids)


def test_rule_promotes_better_rolls_back_worse_and_waits_for_evidence() -> None:
    rule = Rule(min_ratings=20)
    assert decide(ArmCounts(good=30, bad=70), ArmCounts(good=90, bad=10), rule).decision \
        == "promote"
    assert decide(ArmCounts(good=90, bad=10), ArmCounts(good=30, bad=70), rule).decision \
        == "rollback"
    same = decide(ArmCounts(good=60, bad=40), ArmCounts(good=61, bad=39), rule)
    assert same.decision == "continue" and same.low < 0 < same.high
    few = decide(ArmCounts(good=5, bad=5), ArmCounts(good=10, bad=0), rule)
    assert few.decision == "continue" and "waiting for 20 ratings" in few.reason
    assert decide(ArmCounts(), ArmCounts(), rule).decision == "continue"
    # a margin lets a slightly worse canary through once the interval clears it
    assert decide(ArmCounts(good=600, bad=400), ArmCounts(good=590, bad=410),
                  Rule(min_ratings=20, margin=0.1)).decision == "promote"
    assert Rule(error_rate=0.7, min_ratings=0).problems()
    lo, hi = wilson(8, 10)
    assert 0.4 < lo < 0.8 < hi < 1.0


def test_rule_rarely_promotes_an_equal_canary_checked_after_every_rating() -> None:
    rng = random.Random(1)
    rule = CanaryConfig().rule()
    wrong = 0
    for _ in range(200):
        g = {"a": 0, "c": 0}
        n = {"a": 0, "c": 0}
        for _ in range(600):
            arm = "c" if rng.random() < 0.5 else "a"
            n[arm] += 1
            g[arm] += rng.random() < 0.6
            v = decide(ArmCounts(good=g["a"], bad=n["a"] - g["a"]),
                       ArmCounts(good=g["c"], bad=n["c"] - g["c"]), rule)
            if v.decision != "continue":
                wrong += v.decision == "promote"
                break
    assert wrong / 200 <= 0.05


def _versions(store: FeedbackStore, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = store.registry
    for v in ("v0001", "v0002"):
        (tmp_path / v).mkdir()
        reg.register_version(version=v, path=str(tmp_path / v))
    reg.activate("v0001")


def _chat(store: FeedbackStore, version: str, rating: str | None = None, *,
          edit: bool = False, regenerate: bool = False) -> int:
    conv = store.create_conversation(source="api")
    user = store.add_user_message(conversation_id=conv.id, content="Hello?")
    reply = store.add_reply(content="Hi.", parent_id=user.id, adapter_version=version)
    if rating:
        store.rate(reply_id=reply.id, rating=rating)
    if edit:
        store.edit_reply(reply_id=reply.id, content="Hello there.")
    if regenerate:
        store.add_reply(content="Hey.", source_reply_id=reply.id, adapter_version=version)
    return conv.id


def test_start_counts_only_conversations_after_it(store: FeedbackStore, tmp_path) -> None:
    _versions(store, tmp_path)
    before = _chat(store, "v0001", "up")
    canaries = store.canaries
    with pytest.raises(Conflict, match="only a candidate"):
        canaries.start("v0001", FAST)
    with pytest.raises(InvalidInput, match="off"):
        canaries.start("v0002", CanaryConfig(share=0))
    state = canaries.start("v0002", FAST, reasons=("promote: gate figures",))
    assert state.active == "v0001" and state.first_conversation_id == before + 1
    assert store.registry.get_version("v0002").status == "canary"
    with pytest.raises(Conflict, match="already running"):
        canaries.start("v0002", FAST)
    assert state.version_for(before) == "v0001"  # an older conversation stays where it was
    _chat(store, "v0002", "up")
    _chat(store, "v0002", "up", edit=True)  # edited: bad whatever the thumb
    _chat(store, "v0002", None, regenerate=True)
    _chat(store, "v0001", "down")
    c = store.get_message(1)  # the first conversation's user message: not counted
    assert c.conversation_id == before
    status = canaries.check()
    assert status is not None
    a, k = status.active, status.canary
    assert (a.replies, a.up, a.down, a.good, a.bad) == (1, 0, 1, 0, 1)
    # canary: 3 first replies + 1 regeneration (a reply too, unrated)
    assert (k.replies, k.up, k.edited, k.regenerated, k.good, k.bad) == (4, 2, 1, 1, 1, 2)
    assert status.verdict.decision == "continue"
    assert canaries.decide() is None


def _rate_many(store: FeedbackStore, state, good_share: dict[str, float], n: int,
               seed: int = 0) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    for _ in range(n):
        conv = store.create_conversation(source="api")
        version = state.version_for(conv.id)
        user = store.add_user_message(conversation_id=conv.id, content="Hi")
        reply = store.add_reply(content="Hello.", parent_id=user.id, adapter_version=version)
        store.rate(reply_id=reply.id, rating="up" if rng.random() < good_share[version] else "down")


def test_a_better_canary_is_promoted_and_recorded(store: FeedbackStore, tmp_path) -> None:
    _versions(store, tmp_path)
    state = store.canaries.start("v0002", FAST)
    _rate_many(store, state, {"v0001": 0.3, "v0002": 0.9}, 120)
    ended = store.canaries.decide()
    assert ended is not None and ended["outcome"] == "promoted"
    assert store.registry.active_version().version == "v0002"
    assert store.registry.get_version("v0001").status == "retired"
    v2 = store.registry.get_version("v0002")
    assert v2.metrics["canary"]["outcome"] == "promoted"
    assert any(r.startswith("canary promoted: promote: good replies") for r in v2.reasons)
    assert store.canaries.current() is None and store.canaries.decide() is None
    assert store.canaries.history()[0]["version"] == "v0002"
    assert store.registry.rollback().version == "v0001"  # the promotion is on the stack


def test_a_worse_canary_is_rolled_back(store: FeedbackStore, tmp_path) -> None:
    _versions(store, tmp_path)
    state = store.canaries.start("v0002", FAST)
    _rate_many(store, state, {"v0001": 0.9, "v0002": 0.2}, 120)
    ended = store.canaries.decide()
    assert ended is not None and ended["outcome"] == "rolled back"
    assert store.registry.active_version().version == "v0001"
    assert store.registry.get_version("v0002").status == "rejected"


def test_limits_end_an_undecided_canary_and_keep_the_active(store: FeedbackStore,
                                                            tmp_path) -> None:
    _versions(store, tmp_path)
    state = store.canaries.start("v0002", FAST)
    _rate_many(store, state, {"v0001": 0.6, "v0002": 0.6}, 12)
    assert store.canaries.decide() is None
    later = datetime.now(UTC) + timedelta(hours=2)
    ended = store.canaries.decide(now=later)
    assert ended is not None and ended["outcome"] == "undecided"
    assert ended["reason"].startswith("not enough evidence after 1 h: kept active v0001")
    assert store.registry.get_version("v0002").status == "candidate"
    assert store.registry.active_version().version == "v0001"


def test_operators_end_a_canary_by_hand(store: FeedbackStore, tmp_path) -> None:
    _versions(store, tmp_path)
    with pytest.raises(Conflict, match="no canary"):
        store.canaries.end_by_hand("stopped")
    store.canaries.start("v0002", FAST)
    ended = store.canaries.end_by_hand("rolled back", by="ops")
    assert ended["reason"].startswith("rolled back by hand by ops")
    assert store.registry.get_version("v0002").status == "rejected"
    with pytest.raises(InvalidInput):
        store.canaries.end_by_hand("maybe")


def test_a_change_of_active_version_stops_the_canary(store: FeedbackStore, tmp_path) -> None:
    _versions(store, tmp_path)
    store.canaries.start("v0002", FAST)
    store.registry.rollback()  # an operator rolls back the active version meanwhile
    ended = store.canaries.decide()
    assert ended is not None and ended["outcome"] == "stopped"
    assert "active version changed from v0001 to base" in ended["reason"]
    assert store.registry.get_version("v0002").status == "candidate"


def test_console_and_cli_show_the_canary_and_end_it(store: FeedbackStore, tmp_path,
                                                    db_url: str, capsys) -> None:
    from chat_app.cli import main as cli_main
    from chat_app.console import canary as tab
    from chat_app.console.context import ConsoleContext

    ctx = ConsoleContext(store=store, retrain_settings=lambda: {}, export_dir=tmp_path / "x")
    text, rows, ended = tab.canary_view(ctx)
    assert text.startswith("No canary is running") and rows == [] and ended == []
    assert not tab.end_canary(ctx, "stop").ok
    _versions(store, tmp_path)
    state = store.canaries.start("v0002", FAST)
    _rate_many(store, state, {"v0001": 0.5, "v0002": 0.5}, 8)
    text, rows, _ = tab.canary_view(ctx)
    assert "Canary v0002" in text and "against **v0001**" in text and "left" in text
    assert "waiting for 10 ratings on each version" in text
    assert [r[:2] for r in rows] == [["v0001", "active"], ["v0002", "canary"]]
    assert sum(r[3] for r in rows) == 8  # every rated reply counted once
    flags = ["--database-url", db_url]
    assert cli_main(["canary", "status", *flags]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["version"] == "v0002" and status["decision"] == "continue"
    assert cli_main(["canary", "stop", *flags]) == 0
    assert "canary v0002 stopped: stopped by hand" in capsys.readouterr().out
    assert store.registry.get_version("v0002").status == "candidate"
    assert cli_main(["canary", "rollback", *flags]) == 1  # nothing runs now: a clear error
    assert "no canary is running" in capsys.readouterr().err
    store.canaries.start("v0002", FAST)
    result = tab.end_canary(ctx, "promote", by="ops")
    assert result.ok and "promoted" in result.message
    assert store.registry.active_version().version == "v0002"
    _, _, ended = tab.canary_view(ctx)
    assert [e[:2] for e in ended] == [["v0002", "promoted"], ["v0002", "stopped"]]
    assert cli_main(["canary", "history", *flags]) == 0
    assert json.loads(capsys.readouterr().out)[0]["outcome"] == "promoted"
