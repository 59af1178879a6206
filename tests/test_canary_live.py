"""Canary rollout through real servers on the demo model.

Two LoRA adapters: v0001 active, v0002 the canary. Simulated users chat through
``/v1/chat/completions`` (two turns per conversation), and rate each reply by the
version that wrote it (one version better by construction). The canary must then be
promoted (or rolled back) automatically, with zero failed requests, every conversation
on one version while the canary runs, and two replicas on one PostgreSQL database
must agree on every conversation's version.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import torch
from conftest import fresh_postgres_url
from live_server import live_server, wait_for
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from feedback_store import FeedbackStore
from feedback_store.canary import CanaryConfig
from retrain.modeling import fresh_lora_config

pytestmark = [pytest.mark.canary, pytest.mark.slow, pytest.mark.timeout(900)]

FAST = CanaryConfig(share=0.5, min_ratings=12, time_limit_hours=1.0, max_ratings=600)
SERVER = dict(max_new_tokens=12, canary_check_seconds=0.5, adapter_poll_seconds=0.2,
              max_concurrent=4)


@pytest.fixture(scope="module")
def adapters(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for i, name in enumerate(("v0001", "v0002")):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(demo_model_dir),
                               fresh_lora_config(r=4, alpha=8, dropout=0.0,
                                                 target_modules="all-linear"))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.002)
        out[name] = tmp_path_factory.mktemp("adapters") / name
        model.save_pretrained(str(out[name]))
    return out


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from fresh_postgres_url()




def start_canary(store: FeedbackStore, adapters: dict[str, Path], urls: list[str]) -> None:
    reg = store.registry
    for name, path in adapters.items():
        reg.register_version(version=name, path=str(path))
    reg.activate("v0001")
    for url in urls:
        wait_for(lambda u=url: httpx.get(u + "/healthz").json()["adapter_version"] == "v0001")
    store.canaries.start("v0002", FAST)
    for url in urls:
        wait_for(lambda u=url: len(httpx.get(u + "/v1/models").json()["data"]) == 2)


def ask(client: httpx.Client, url: str, text: str, conversation_id: int | None = None
        ) -> dict:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 12}
    if conversation_id is not None:
        body["conversation_id"] = conversation_id
    r = client.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


class Users:
    """Threads that chat two turns per conversation and rate by version."""

    def __init__(self, urls: list[str], good: dict[str, float], *, threads: int = 4) -> None:
        self.urls, self.good = urls, good
        self.stop = threading.Event()
        self.failures: list[str] = []
        # (conversation id, versions of its two replies, the second reply's id)
        self.conversations: list[tuple[int, list[str], float]] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True)
                        for i in range(threads)]

    def run(self, i: int) -> None:
        rng = random.Random(i)
        with httpx.Client() as client:
            while not self.stop.is_set():
                try:
                    self.one(client, rng)
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    with self.lock:
                        self.failures.append(repr(exc))

    def one(self, client: httpx.Client, rng: random.Random) -> None:
        first_url, second_url = rng.sample(self.urls * 2, 2)
        first = ask(client, first_url, rng.choice(["Hello!", "How do I cook rice?",
                                                   "What makes the sky blue?"]))
        cid = first["conversation_id"]
        second = ask(client, second_url, "Tell me more.", cid)
        versions = [first["adapter_version"], second["adapter_version"]]
        for body in (first, second):
            up = rng.random() < self.good[body["adapter_version"]]
            r = client.post(first_url + "/v1/feedback",
                            json={"reply_id": body["id"], "rating": "up" if up else "down"})
            assert r.status_code == 200, r.text
        with self.lock:
            self.conversations.append((cid, versions, int(second["id"])))

    def __enter__(self) -> Users:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=180)


def _run(store: FeedbackStore, urls: list[str], good: dict[str, float]) -> tuple[dict, Users]:
    with Users(urls, good) as users:
        wait_for(lambda: store.canaries.current() is None or users.failures, timeout=600)
    assert not users.failures, users.failures[:3]
    return store.canaries.history()[0], users


def _check_sticky(users: Users, store: FeedbackStore, state, record: dict
                  ) -> None:  # type: ignore[no-untyped-def]
    """Every conversation whose second reply was written before the decision got the
    version the canary assigns its id on both turns. (A turn sent before the decision
    but routed after it may go to the version that then serves everyone.)"""
    ended = datetime.fromisoformat(record["ended_at"])
    during = [(cid, v, rid) for cid, v, rid in users.conversations
              if store.get_message(rid).created_at < ended]
    # the canary may decide once each arm has min_ratings ratings: two per conversation,
    # so at least min_ratings conversations in all (20 was more than it waits for)
    assert len(during) >= FAST.min_ratings
    for cid, (v1, v2), _rid in during:
        assert v1 == state.version_for(cid), (cid, v1)
        assert v2 == v1, (cid, v1, v2)
    assert {v for _, (v, _), _ in during} == {"v0001", "v0002"}


@pytest.mark.parametrize("better", ["canary", "active"])
def test_live_ratings_promote_a_better_canary_and_roll_back_a_worse(
        demo_model_dir: Path, adapters: dict[str, Path], tmp_path: Path, better: str) -> None:
    good = {"v0001": 0.2, "v0002": 0.9} if better == "canary" else {"v0001": 0.9, "v0002": 0.2}
    with live_server(demo_model_dir, tmp_path / "data", **SERVER) as srv:
        store = srv.services.store
        start_canary(store, adapters, [srv.url])
        state = store.canaries.current()
        record, users = _run(store, [srv.url], good)
        _check_sticky(users, store, state, record)
        if better == "canary":
            assert record["outcome"] == "promoted", record["reason"]
            wait_for(lambda: httpx.get(srv.url + "/healthz").json()["adapter_version"]
                     == "v0002")
        else:
            assert record["outcome"] == "rolled back", record["reason"]
            assert store.registry.get_version("v0002").status == "rejected"
            wait_for(lambda: "v0002" not in srv.services.engine.loaded_versions())
        assert httpx.get(srv.url + "/healthz").json()["adapter_version"] == (
            "v0002" if better == "canary" else "v0001")
        models = httpx.get(srv.url + "/v1/models").json()["data"]
        assert [m["role"] for m in models] == ["active"]


@pytest.mark.postgres
def test_two_replicas_on_one_database_agree_on_every_assignment(
        demo_model_dir: Path, adapters: dict[str, Path], tmp_path: Path,
        pg_url: str) -> None:
    with live_server(demo_model_dir, tmp_path / "a", database_url=pg_url, **SERVER) as a, \
            live_server(demo_model_dir, tmp_path / "b", database_url=pg_url, **SERVER) as b:
        store = a.services.store
        start_canary(store, adapters, [a.url, b.url])
        seen = {}
        with httpx.Client() as client:
            for i in range(24):
                first, second = (a.url, b.url) if i % 2 else (b.url, a.url)
                one = ask(client, first, "Hello!")
                two = ask(client, second, "And then?", one["conversation_id"])
                assert one["adapter_version"] == two["adapter_version"]
                seen[one["conversation_id"]] = one["adapter_version"]
        state = store.canaries.current()
        assert state is not None  # unrated: nothing decided
        assert seen == {cid: state.version_for(cid) for cid in seen}
        assert set(seen.values()) == {"v0001", "v0002"}
        for srv in (a, b):
            got = httpx.get(f"{srv.url}/v1/replies/{two['id']}").json()["reply"]
            assert got["adapter_version"] == two["adapter_version"]
