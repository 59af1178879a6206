"""Hot-swap in a live server under a concurrent streamed load: a training round in its
own process promotes v0001, the server swaps to it without failing a request, rolls
back the same way, and refuses a corrupt adapter while it keeps serving."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from feedback_data import seed_preferences
from live_server import live_server, wait_for
from tiny_models import make_tiny_model

from retrain import RetrainSettings, start_round

SMALL_TRAIN = {"kto_steps": 4, "dpo_steps": 4, "batch_size": 4, "learning_rate": 5e-3,
               "max_length": 128, "lora_r": 8, "log_every": 1,
               # a random-weight model's replies never end: the KL probe and the own-reply
               # pairs sample 24 tokens, as the gate does, not 256
               "kl_probe_tokens": 24}
TINY_GATE = {"max_degenerate_share": 1.0, "max_degenerate_increase": 1.0, "max_canary_kl": 5.0,
             "max_new_tokens": 24}


class Load:
    """Streamed chat requests from several threads until stopped; every outcome kept."""

    def __init__(self, url: str, threads: int = 6) -> None:
        self.url, self.results, self.stop = url, [], threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.worker, args=(i,)) for i in range(threads)]

    def worker(self, i: int) -> None:
        with httpx.Client(timeout=120) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                started = time.time()
                rec = {"started": started, "ok": False}
                try:
                    with client.stream("POST", self.url + "/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": f"worker {i} request {n}"}],
                        "max_tokens": 12, "stream": True}) as r:
                        rec["status"] = r.status_code
                        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
                    chunks = [json.loads(ln[6:]) for ln in lines if ln != "data: [DONE]"]
                    rec.update(ok=r.status_code == 200 and lines[-1] == "data: [DONE]",
                               id=int(chunks[0]["id"]), version=chunks[0]["adapter_version"],
                               model=chunks[0]["model"])
                except Exception as exc:  # a failed request is what this test counts
                    rec["error"] = repr(exc)
                rec["ended"] = time.time()
                with self.lock:
                    self.results.append(rec)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)




@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("hotswap") / "model")


def test_round_promotes_and_server_swaps_under_load_without_a_failed_request(model, tmp_path):
    with live_server(model, tmp_path / "data", max_concurrent=4, max_queued=32) as srv:
        store, engine = srv.services.store, srv.services.engine
        seed_preferences(store, rounds=2)
        settings = RetrainSettings(
            database_url=srv.settings.resolved_database_url,
            adapters_dir=str(srv.settings.resolved_adapters_dir), model=str(model),
            device="cpu", eval_fraction=0.3, train=SMALL_TRAIN, gate=TINY_GATE)
        with Load(srv.url) as load:
            run = start_round(settings=settings, trigger="test")
            assert run.status == "succeeded", run.error or run.reasons
            if run.decision != "promoted":  # a random-weight model earns no promotion:
                store.registry.activate(run.candidate_version)  # the operator promotes it
            wait_for(lambda: engine.active_version == "v0001")
            swap = srv.services.watcher.events[-1]
            time.sleep(1.5)  # keep the load going on the new version
        results = load.results
        failures = [r for r in results if not r["ok"]]
        assert not failures, failures[:3]
        assert swap.ok and swap.version == "v0001"
        versions = {r["version"] for r in results}
        assert versions == {"base", "v0001"}
        after = [r for r in results if r["started"] > swap.at]
        assert after and all(r["version"] == "v0001" for r in after)
        for r in results:  # the store agrees with what each client was told
            assert store.get_message(r["id"]).adapter_version == r["version"]
        assert all(r["model"].endswith(":" + r["version"]) for r in results)
        health = httpx.get(srv.url + "/healthz").json()
        assert health["adapter_version"] == "v0001"

        # rollback is the same swap backwards, and the old version is unloaded after
        store.registry.rollback()
        wait_for(lambda: engine.active_version == "base")
        wait_for(lambda: "v0001" not in engine.loaded_versions())
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "after rollback"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["adapter_version"] == "base"


def test_corrupt_or_missing_adapter_is_refused_and_chat_keeps_serving(model, tmp_path):
    with live_server(model, tmp_path / "data") as srv:
        reg, engine = srv.services.store.registry, srv.services.engine
        bad = srv.settings.resolved_adapters_dir / "v0001"
        bad.mkdir(parents=True)
        (bad / "adapter_config.json").write_text("{not json")
        reg.register_version(version="v0001", path=str(bad))
        reg.activate("v0001")
        wait_for(lambda: any(not e.ok for e in srv.services.watcher.events))
        assert engine.active_version == "base"
        reg.register_version(version="v0002", path=str(tmp_path / "nowhere"))
        reg.activate("v0002")
        wait_for(lambda: sum(not e.ok for e in srv.services.watcher.events) >= 2)
        assert engine.active_version == "base"
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["adapter_version"] == "base"
        assert 'feedback_chat_adapter_swaps_total{result="refused"} 2.0' in httpx.get(
            srv.url + "/metrics").text
