"""Generation on a separate engine server: a real ``feedback-chat engine`` subprocess on
loopback, spoken to in vLLM's dialect by ``RemoteEngine``, alone and behind the app.

It must give the replies the in-process engine gives, load and unload versions at run
time, pass busy, bad input and cancellation through with the same behaviour, and, when
the engine server dies, answer 503 at once and recover when it is back."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from engine_process import EngineProcess, engine_process
from live_server import free_port, live_server, wait_for
from tiny_models import make_tiny_adapter, make_tiny_model

from chat_app.engine import (
    BASE_VERSION,
    AdapterError,
    Engine,
    EngineBusy,
    EngineConfig,
    EngineUnavailable,
    InputTooLong,
    SamplingParams,
)
from chat_app.engine.remote import RemoteEngine

GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0)
CHAT = [{"role": "user", "content": "Hello! How can I help you today?"}]




@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    path = make_tiny_model(root / "model")
    make_tiny_adapter(path, root / "adapters" / "v0001", seed=3)
    make_tiny_adapter(path, root / "adapters" / "v0002", seed=4)
    return path


@pytest.fixture(scope="module")
def engine_server(model, tmp_path_factory):
    with engine_process(model, tmp_path_factory.mktemp("engine-data"),
                        max_concurrent=2, max_queued=0, served_model_name="tiny") as proc:
        yield proc


@pytest.fixture(scope="module")
def local(model):
    with Engine.from_config(EngineConfig(model=str(model), device="cpu")) as engine:
        engine.load_adapter("v0001", model.parent / "adapters" / "v0001")
        yield engine


def test_replies_match_the_in_process_engine_and_versions_load_at_run_time(
        model, engine_server, local):
    with RemoteEngine([engine_server.url], model_name=str(model)) as remote:
        gen = remote.stream(CHAT, GREEDY)
        text = gen.result(timeout=60)
        assert gen.finish_reason in ("stop", "length") and gen.version == BASE_VERSION
        assert text == local.stream(CHAT, GREEDY).result(timeout=60)
        assert gen.prompt_tokens == local.count_tokens(CHAT) and gen.completion_tokens > 0
        assert gen.time_to_first_token is not None

        remote.load_adapter("v0001", model.parent / "adapters" / "v0001")
        listed = httpx.get(engine_server.url + "/v1/models").json()["data"]
        assert [(m["id"], m["parent"]) for m in listed] == [("tiny", None), ("v0001", "tiny")]
        remote.activate("v0001")
        gen = remote.stream(CHAT, GREEDY)
        adapted = gen.result(timeout=60)
        assert gen.version == "v0001"
        assert adapted == local.stream(CHAT, GREEDY, version="v0001").result(timeout=60)
        assert adapted != text  # the adapter really serves
        # the base is still there by name, as in process
        assert remote.stream(CHAT, GREEDY, version=BASE_VERSION).result(timeout=60) == text

        # a second front-end sharing the engine server loads the same version: no error
        with RemoteEngine([engine_server.url], model_name=str(model)) as other:
            other.load_adapter("v0001", model.parent / "adapters" / "v0001")
            other.activate("v0001")
            assert other.stream(CHAT, GREEDY).result(timeout=60) == adapted

        remote.activate(BASE_VERSION)
        remote.unload_adapter("v0001", timeout=30)
        assert remote.loaded_versions() == [BASE_VERSION]
        wait_for(lambda: [m["id"] for m in httpx.get(
            engine_server.url + "/v1/models").json()["data"]] == ["tiny"])


def test_bad_input_and_corrupt_adapters_get_typed_errors(model, engine_server, tmp_path):
    with RemoteEngine([engine_server.url], model_name=str(model)) as remote:
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "adapter_config.json").write_text("{not json")
        with pytest.raises(AdapterError, match="unreadable"):
            remote.load_adapter("v0009", bad)
        with pytest.raises(AdapterError, match="not loaded"):
            remote.stream(CHAT, GREEDY, version="v0009")
        with pytest.raises(ValueError, match="messages"):
            remote.stream([{"role": "nobody", "content": "x"}], GREEDY)
        with pytest.raises(InputTooLong):
            remote.stream([{"role": "user", "content": "word " * 5000}], GREEDY)
        # the engine server itself refuses an unknown version and a path that is no adapter
        r = httpx.post(engine_server.url + "/v1/load_lora_adapter",
                       json={"lora_name": "v0009", "lora_path": str(bad)})
        assert r.status_code == 400 and "unreadable" in r.json()["error"]["message"]
        r = httpx.post(engine_server.url + "/v1/chat/completions",
                       json={"model": "v0404", "messages": CHAT})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert remote.stream(CHAT, GREEDY).result(timeout=60)  # still serving


def test_busy_and_cancel_pass_through_and_free_the_slot(model, engine_server):
    long = SamplingParams(max_new_tokens=400, temperature=1.0, seed=1)
    with RemoteEngine([engine_server.url], model_name=str(model)) as remote:
        running = [remote.stream(CHAT, long) for _ in range(2)]  # both slots, no queue
        with pytest.raises(EngineBusy) as caught:
            remote.stream(CHAT, GREEDY)
        assert not isinstance(caught.value, EngineUnavailable)
        first = running[0]
        next(iter(first))  # mid-stream
        for gen in running:
            gen.cancel()
        wait_for(lambda: all(g.finish_reason is not None for g in running))
        assert {g.finish_reason for g in running} <= {"cancelled", "stop", "length"}
        assert running[0].finish_reason == "cancelled"
        assert remote.in_flight() == 0
        # the engine server freed both slots: two replies fit again
        def both_fit() -> bool:
            try:
                gens = [remote.stream(CHAT, GREEDY) for _ in range(2)]
            except EngineBusy:
                return False
            for g in gens:
                g.result(timeout=60)
            return True
        wait_for(both_fit, timeout=30)


def test_a_dead_server_is_skipped_and_503_then_recovery_behind_the_app(model, tmp_path):
    dead = EngineProcess(model, tmp_path / "unused")  # a port nobody listens on
    proc = EngineProcess(model, tmp_path / "engine", served_model_name="tiny").start()
    try:
        with live_server(model, tmp_path / "data", engine_url=f"{dead.url},{proc.url}",
                         engine_retry_seconds=1.0) as srv:
            def ask() -> httpx.Response:
                return httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
                    "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})

            for _ in range(3):  # the dead URL is taken out; every request is answered
                r = ask()
                assert r.status_code == 200, r.text
                assert r.json()["adapter_version"] == "base"
            # a streamed reply through the app, stored whole with its version
            with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=60, json={
                    "messages": [{"role": "user", "content": "stream"}], "max_tokens": 6,
                    "stream": True}) as r:
                lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            first = json.loads(lines[0][6:])
            text = "".join(json.loads(ln[6:])["choices"][0]["delta"].get("content") or ""
                           for ln in lines[:-1] if json.loads(ln[6:])["choices"])
            stored = srv.services.store.get_message(int(first["id"]))
            assert stored.content == text and stored.adapter_version == "base"

            # hot-swap through the registry: the watcher loads v0001 on the engine server
            srv.services.store.registry.register_version(
                version="v0001", path=str(model.parent / "adapters" / "v0001"))
            srv.services.store.registry.activate("v0001")
            wait_for(lambda: srv.services.engine.active_version == "v0001")
            assert ask().json()["adapter_version"] == "v0001"

            proc.stop()  # the engine dies: the app answers 503 at once, not after a timeout
            started = time.monotonic()
            r = ask()
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "engine_unavailable"
            assert time.monotonic() - started < 10
            assert httpx.get(srv.url + "/healthz").status_code == 200  # the app itself lives

            proc.start()  # back on the same port, without our versions: they are reloaded
            wait_for(lambda: ask().status_code == 200, timeout=60)
            assert ask().json()["adapter_version"] == "v0001"
    finally:
        proc.stop()


def test_replies_in_flight_survive_a_swap_on_the_remote_engine(model, engine_server):
    params = SamplingParams(max_new_tokens=60, temperature=1.0, seed=2)
    with RemoteEngine([engine_server.url], model_name=str(model)) as remote:
        remote.load_adapter("v0002", model.parent / "adapters" / "v0002")
        remote.activate("v0002")
        old = remote.stream(CHAT, params)
        results: dict[str, str] = {}
        reader = threading.Thread(target=lambda: results.setdefault("old", old.result(60)))
        reader.start()
        remote.activate(BASE_VERSION)
        remote.unload_adapter("v0002", wait=False)  # waits for the reply on it to end
        reader.join(timeout=60)
        assert old.finish_reason in ("stop", "length") and old.version == "v0002"
        wait_for(lambda: "v0002" not in remote.loaded_versions())



def test_a_version_being_loaded_is_never_answered_as_loaded_too_early(model):
    """Two front-ends ask one engine server for the same new version at once (both
    watchers see the swap). The second must not hear "already loaded" while the first
    load is still under way, or its first reply on that version would get a 404."""
    import uvicorn

    from chat_app.engine_service import create_engine_app

    with Engine.from_config(EngineConfig(model=str(model), device="cpu")) as engine:
        real_load = engine._adapters.load

        def slow_load(*args, **kwargs):  # a large adapter: the load takes a while
            time.sleep(1.5)
            return real_load(*args, **kwargs)

        engine._adapters.load = slow_load
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(
            create_engine_app(engine, served_model="tiny"), host="127.0.0.1", port=port,
            log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: server.started, timeout=30)
        body = {"lora_name": "v0201", "lora_path": str(model.parent / "adapters" / "v0001")}
        first: dict = {}
        loader = threading.Thread(target=lambda: first.setdefault(
            "r", httpx.post(url + "/v1/load_lora_adapter", json=body, timeout=60)))
        loader.start()
        time.sleep(0.3)  # the first load is under way
        second = httpx.post(url + "/v1/load_lora_adapter", json=body, timeout=60)
        assert second.status_code == 400 and "already" in second.json()["error"]["message"]
        # told "loaded", the second front-end asks for a reply on it at once
        reply = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "v0201", "messages": CHAT, "max_tokens": 4})
        assert reply.status_code == 200, reply.text
        loader.join(timeout=60)
        assert first["r"].status_code == 200
        server.should_exit = True
        thread.join(timeout=30)

