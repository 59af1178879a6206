"""Side by side, through the chat page's handlers with a real engine, adapter and store:
the last reply beside another version's, unlabelled in a random order; the pick is a
preference pair across versions in the DPO export; "both bad" is two thumbs down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_adapter, make_tiny_model

from chat_app.engine import Engine, EngineConfig, SamplingParams
from chat_app.hotswap import AdapterWatcher
from chat_app.ui.handlers import ChatHandlers
from chat_app.ui.options import ChatPageSettings
from feedback_store import FeedbackStore
from feedback_store.export import rows_for

torch.set_num_threads(1)
SAMPLING = SamplingParams(max_new_tokens=12, temperature=0.8, seed=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("compare-model") / "tiny")


@pytest.fixture
def served(model_dir: Path, tmp_path: Path) -> Iterator[tuple[ChatHandlers, FeedbackStore]]:
    engine = Engine.from_config(EngineConfig(model=str(model_dir), torch_threads=1))
    store = FeedbackStore.open(f"sqlite:///{tmp_path / 'feedback.db'}")
    ui = ChatHandlers(store=store, engine=engine,
                      settings=ChatPageSettings(sampling=SAMPLING, stream_interval_s=0.0))
    yield ui, store
    engine.close()
    store.close()


def serve_an_adapter(ui: ChatHandlers, store: FeedbackStore, model_dir: Path,
                     folder: Path) -> None:
    make_tiny_adapter(model_dir, folder)
    store.registry.register_version(version="v0001", path=str(folder))
    store.registry.activate("v0001")
    AdapterWatcher(store.registry, ui.engine).sync()
    assert ui.engine.active_version == "v0001"


def test_with_only_the_base_serving_there_is_nothing_to_compare(served) -> None:  # type: ignore[no-untyped-def]
    ui, store = served
    session, _ = ui.load(None)
    assert ui.compare(session).notice.is_error  # no reply yet
    list(ui.send(session, "Hello"))
    before = store.counts()
    refused = ui.compare(session)
    assert refused.notice.is_error and "Only one version" in refused.notice.text
    assert store.counts() == before and session.side_by_side is None
    assert ui.pick_side(session, "a").notice.is_error


def test_a_pick_is_a_preference_pair_across_versions(served, model_dir: Path,  # type: ignore[no-untyped-def]
                                                     tmp_path: Path) -> None:
    ui, store = served
    serve_an_adapter(ui, store, model_dir, tmp_path / "v0001")
    session, _ = ui.load(None)
    list(ui.send(session, "Which is better?"))
    first = session.thread[-1]
    assert first.adapter_version == "v0001"
    shown = ui.compare(session)
    assert not shown.notice.is_error and session.side_by_side is not None
    a, b = session.side_by_side
    replies = {m.id: m for m in store.siblings(first.id)} | {first.id: first}
    assert {replies[a].adapter_version, replies[b].adapter_version} == {"v0001", "base"}
    assert session.side_by_side_texts == (replies[a].content, replies[b].content)
    assert shown.history[-1]["content"]  # the chat still shows one reply until the pick
    assert ui.pick_side(session, "c").notice.is_error  # not a pick: nothing stored
    done = ui.pick_side(session, "b")
    assert not done.notice.is_error and session.side_by_side is None
    assert session.thread[-1].id == b  # the chat goes on from the chosen reply
    (row,) = rows_for(store, "dpo")
    assert row["chosen"][0]["content"] == replies[b].content
    assert row["rejected"][0]["content"] == replies[a].content


def test_both_bad_is_a_thumbs_down_on_each(served, model_dir: Path,  # type: ignore[no-untyped-def]
                                           tmp_path: Path) -> None:
    ui, store = served
    serve_an_adapter(ui, store, model_dir, tmp_path / "v0001")
    session, _ = ui.load(None)
    list(ui.send(session, "Say something"))
    ui.compare(session)
    a, b = session.side_by_side
    assert not ui.pick_side(session, "both_bad").notice.is_error
    assert [e.kind for e in store.events_for(a)] == ["down"]
    assert [e.kind for e in store.events_for(b)] == ["down"]
    assert rows_for(store, "dpo") == [] and len(rows_for(store, "kto")) == 2


class WatcherRouter:
    """What the served app's ``Services`` passes to the chat page: the watcher's view of
    which version serves which conversation, and of the canary."""

    def __init__(self, watcher: AdapterWatcher) -> None:
        self.watcher = watcher

    def version_for(self, conversation_id: int | None) -> str | None:
        return self.watcher.version_for(conversation_id)

    def canary_running(self) -> bool:
        return self.watcher.canary_running()

    def canary_version(self) -> str | None:
        return self.watcher.canary_version()


@pytest.mark.parametrize("share", [1.0, 0.0])
def test_while_a_canary_runs_a_share_of_replies_come_side_by_side_unasked(
        served, model_dir: Path, tmp_path: Path, share: float) -> None:  # type: ignore[no-untyped-def]
    from feedback_store.canary import CanaryConfig

    ui, store = served
    serve_an_adapter(ui, store, model_dir, tmp_path / "v0001")
    make_tiny_adapter(model_dir, tmp_path / "v0002", seed=9)
    store.registry.register_version(version="v0002", path=str(tmp_path / "v0002"))
    watcher = AdapterWatcher(store.registry, ui.engine, canaries=store.canaries)
    ui.router = WatcherRouter(watcher)
    ui.settings = ChatPageSettings(sampling=SAMPLING, stream_interval_s=0.0,
                                   canary_compare_share=share)
    session, _ = ui.load(None)
    list(ui.send(session, "Before any canary"))
    assert ui.canary_compare(session) is None  # no canary: nothing unasked

    store.canaries.start("v0002", CanaryConfig(share=0.5, min_ratings=10))
    watcher.sync()
    assert ui.router.canary_version() == "v0002"
    session, _ = ui.load(None)
    list(ui.send(session, "During the canary"))
    before = store.counts()
    shown = ui.canary_compare(session)
    if share == 0.0:
        assert shown is None and session.side_by_side is None
        assert store.counts() == before
        return
    assert shown is not None and not shown.notice.is_error
    a, b = session.side_by_side
    versions = {store.get_message(a).adapter_version, store.get_message(b).adapter_version}
    assert versions == {"v0001", "v0002"}  # the canary against the active version
    assert ui.canary_compare(session) is None  # one comparison at a time
    assert not ui.pick_side(session, "a").notice.is_error
    assert any(r["chosen"] for r in rows_for(store, "dpo"))
