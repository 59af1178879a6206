"""A small cluster on loopback, every part a real process: a PostgreSQL server, one
``feedback-chat engine``, two ``feedback-chat serve`` front-ends holding no model, and one
``feedback-chat trainer``, sharing the database and an adapters folder.

Under a streamed chat load through both front-ends, feedback arrives through both, a
round runs in the trainer, and the new version serves on both with no failed request and
every reply tagged (streamed and stored) with the version that wrote it. Then one
front-end is killed and the other keeps serving; the engine is killed and the front-end
answers 503 at once, then recovers when the engine is back; the trainer is killed
mid-round and its run is marked failed with the slot freed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import fresh_postgres_url
from engine_process import EngineProcess
from feedback_data import seed_preferences
from live_server import free_port, wait_for
from tiny_models import make_tiny_model

from feedback_store import FeedbackStore

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(900)]

TRAIN_ENV = {"FEEDBACK_CHAT_TRAIN_KTO_STEPS": "3", "FEEDBACK_CHAT_TRAIN_DPO_STEPS": "3",
             "FEEDBACK_CHAT_TRAIN_BATCH_SIZE": "4", "FEEDBACK_CHAT_TRAIN_MAX_LENGTH": "128",
             "FEEDBACK_CHAT_TRAIN_KL_BUDGET": "none",
             # a random-weight model earns no promotion; the operator promotes below
             "FEEDBACK_CHAT_GATE_MAX_DEGENERATE_SHARE": "1",
             "FEEDBACK_CHAT_GATE_MAX_DEGENERATE_INCREASE": "1",
             "FEEDBACK_CHAT_GATE_MAX_KL": "50", "FEEDBACK_CHAT_GATE_MAX_NEW_TOKENS": "16",
             "FEEDBACK_CHAT_CANARY_SHARE": "0", "OMP_NUM_THREADS": "1"}


class Proc:
    """A ``feedback-chat`` subprocess answering ``/healthz`` on its own port."""

    def __init__(self, name: str, args: list[str], log_dir: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"{name}.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chat_app", *args, "--port", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **TRAIN_ENV, **env})
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"{name} did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)


class Load:
    """Streamed chats through several front-ends from several threads; every outcome kept,
    and a thumbs rating for every other reply sent back through the same front-end."""

    def __init__(self, urls: list[str], threads: int = 4) -> None:
        self.urls, self.results, self.stop = urls, [], threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.worker, args=(i,)) for i in range(threads)]

    def worker(self, i: int) -> None:
        with httpx.Client(timeout=120) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                url = self.urls[(i + n) % len(self.urls)]
                rec = {"url": url, "started": time.time(), "ok": False}
                try:
                    with client.stream("POST", url + "/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": f"worker {i} request {n}"}],
                        "max_tokens": 8, "stream": True}) as r:
                        rec["status"] = r.status_code
                        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
                    rec["last"] = lines[-1][:300] if lines else None
                    first = json.loads(lines[0][6:])
                    rec.update(ok=r.status_code == 200 and lines[-1] == "data: [DONE]",
                               id=int(first["id"]), version=first["adapter_version"])
                    if n % 2:
                        rated = client.post(url + "/v1/feedback", json={
                            "reply_id": rec["id"], "rating": "up" if n % 4 == 1 else "down"})
                        rec["rated"] = rated.status_code
                        if rated.status_code != 200:
                            rec["ok"], rec["rated_body"] = False, rated.text[:300]
                except Exception as exc:  # a failed request is what this test counts
                    rec["error"] = repr(exc)
                rec["ended"] = time.time()
                with self.lock:
                    self.results.append(rec)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)




def log_tails(procs: list[Proc], engine: EngineProcess) -> str:
    """What the parts wrote last, for a failure's message."""
    logs = [(p.log.name, p.log) for p in procs] + [("engine", engine.log)]
    return "\n".join(f"--- {name}:\n{path.read_text(errors='replace')[-2500:]}"
                     for name, path in logs if path.exists())


def health(url: str) -> dict:
    try:
        return httpx.get(url + "/healthz", timeout=5).json()
    except httpx.HTTPError:
        return {}


@pytest.fixture
def pg_url():
    yield from fresh_postgres_url()


def test_a_loopback_cluster_trains_swaps_everywhere_and_survives_its_parts_dying(
        tmp_path: Path, pg_url: str) -> None:
    model = make_tiny_model(tmp_path / "model")
    adapters = tmp_path / "adapters"
    logs = tmp_path / "logs"
    logs.mkdir()
    store = FeedbackStore.open(pg_url)
    common = ["--database-url", pg_url, "--model", str(model), "--adapters-dir", str(adapters)]
    engine = EngineProcess(model, tmp_path / "engine", max_concurrent=8, max_queued=64).start()
    procs: list[Proc] = []
    try:
        fronts = [Proc(f"front-{k}", ["serve", *common, "--data-dir", str(tmp_path / f"f{k}"),
                                      "--engine-url", engine.url, "--no-scheduler",
                                      "--adapter-poll-seconds", "0.2",
                                      "--engine-retry-seconds", "1", "--canary-share", "0"],
                       logs) for k in (1, 2)]
        procs += fronts
        trainer = Proc("trainer", ["trainer", *common, "--data-dir", str(tmp_path / "t"),
                                   "--device", "cpu", "--retrain-interval-minutes", "0.02",
                                   "--retrain-min-feedback", "10"], logs)
        procs.append(trainer)
        assert all(health(f.url)["adapter_version"] == "base" for f in fronts)

        with Load([f.url for f in fronts]) as load:
            wait_for(lambda: len(load.results) >= 8, what="the first replies")
            seed_preferences(store, rounds=1)  # more feedback, enough for a round
            wait_for(lambda: any(r.status not in ("queued", "running")
                                 for r in store.registry.list_runs()), what="a round")
            run = store.registry.list_runs()[-1]
            assert run.trigger == "schedule" and run.status == "succeeded", (run, run.error)
            if run.decision != "promoted":
                store.registry.activate(run.candidate_version)  # the operator promotes it
            new = run.candidate_version
            wait_for(lambda: all(health(f.url).get("adapter_version") == new for f in fronts),
                     what=f"{new} on both front-ends")
            swapped = time.time()
            time.sleep(2.0)  # the load goes on, on the new version
        results = load.results
        failures = [r for r in results if not r["ok"]]
        assert not failures, (failures[:3], log_tails([*fronts, trainer], engine))
        assert {r["url"] for r in results} == {f.url for f in fronts}
        assert {r["version"] for r in results} == {"base", new}
        assert all(r["version"] == new for r in results if r["started"] > swapped)
        for r in results:  # the store agrees with what each client was told
            assert store.get_message(r["id"]).adapter_version == r["version"]
        loaded = [m["id"] for m in httpx.get(engine.url + "/v1/models").json()["data"]]
        assert new in loaded  # the engine server holds the version the front-ends serve

        def ask(url: str) -> httpx.Response:
            return httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4})

        fronts[0].kill()  # one front-end dies: the other keeps serving
        for _ in range(3):
            r = ask(fronts[1].url)
            assert r.status_code == 200 and r.json()["adapter_version"] == new, r.text

        engine.stop()  # the engine dies: 503 at once, then recovery when it is back
        started = time.monotonic()
        r = ask(fronts[1].url)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        assert time.monotonic() - started < 10
        engine.start()
        wait_for(lambda: ask(fronts[1].url).status_code == 200, timeout=60,
                 what="recovery after the engine came back")
        assert ask(fronts[1].url).json()["adapter_version"] == new

        # a trainer killed mid-round: the run fails and the slot is freed
        wait_for(lambda: store.registry.current_run() is None, what="the rounds to end")
        trainer.kill()
        before = max(r.id for r in store.registry.list_runs())
        hanging = Proc("trainer-hang", ["trainer", *common, "--data-dir", str(tmp_path / "t2"),
                                        "--device", "cpu", "--retrain-interval-minutes", "0.02",
                                        "--retrain-min-feedback", "10"], logs,
                       FEEDBACK_CHAT_RETRAIN_FAULT="hang")
        procs.append(hanging)
        seed_preferences(store, rounds=1)
        def hung() -> list:
            return [r for r in store.registry.list_runs() if r.id > before]

        wait_for(lambda: any(r.status == "running" for r in hung()), what="a round to start")
        hanging.kill()
        wait_for(lambda: hung()[-1].status != "running", timeout=60,
                 what="the abandoned run to be marked")
        last = hung()[-1]
        assert last.status == "failed" and "stopped before it finished" in (last.error or ""), (
            last, last.error)
        assert store.registry.current_run() is None
        assert ask(fronts[1].url).status_code == 200  # chat never noticed
    finally:
        for p in procs:
            p.kill()
        engine.stop()
        store.close()
    for p in procs:
        assert "Traceback" not in p.log.read_text(), p.log.read_text()[-3000:]
