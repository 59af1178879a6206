"""``feedback-chat trainer``: the schedule as its own process, with health and metrics,
running real rounds on the feedback a front-end stored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from feedback_data import seed_preferences
from live_server import free_port
from tiny_models import make_tiny_model

from feedback_store import FeedbackStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _start_trainer(tmp_path: Path, **env: str) -> tuple[subprocess.Popen, FeedbackStore, str]:
    """A ``feedback-chat trainer`` over a SQLite store seeded with feedback, answering."""
    model = make_tiny_model(tmp_path / "model")
    data = tmp_path / "data"
    url = f"sqlite:///{data / 'feedback.db'}"
    data.mkdir()
    store = FeedbackStore.open(url)
    seed_preferences(store, rounds=1)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chat_app.cli", "trainer", "--data-dir", str(data), "--model",
         str(model), "--port", str(port), "--retrain-interval-minutes", "0.02",
         "--retrain-min-feedback", "10", "--device", "cpu"],
        env={**os.environ, "FEEDBACK_CHAT_TRAIN_KTO_STEPS": "3",
             "FEEDBACK_CHAT_TRAIN_DPO_STEPS": "3", **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                return proc, store, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            out = proc.communicate(timeout=30)[0].decode(errors="replace")
            store.close()
            pytest.fail(f"the trainer did not start:\n{out[-3000:]}")
        time.sleep(0.2)


def test_the_trainer_runs_scheduled_rounds_and_reports_them(tmp_path: Path) -> None:
    proc, store, base = _start_trainer(tmp_path)
    try:
        health = httpx.get(base + "/healthz", timeout=2)
        body = health.json()
        assert body["status"] == "ok" and body["schedule"]["min_feedback"] == 10
        deadline = time.time() + 450  # 35 s alone; a loaded 2-core machine took over 300
        while not [r for r in store.registry.list_runs() if r.status not in ("queued",
                                                                              "running")]:
            assert time.time() < deadline, "no scheduled round finished"
            time.sleep(0.5)
        run = store.registry.list_runs()[-1]
        assert run.trigger == "schedule" and run.status in ("succeeded", "rejected"), run.error
        metrics = httpx.get(base + "/metrics").text
        assert f'feedback_chat_trainer_runs{{status="{run.status}"}} 1' in metrics
        assert "feedback_chat_trainer_pending_feedback 0" in metrics
        assert httpx.get(base + "/healthz").json()["schedule"]["last_check"]["outcome"]
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode(errors="replace")
        store.close()
    assert "Traceback" not in out, out[-3000:]


def test_killing_the_trainer_mid_round_fails_the_run_and_frees_the_slot(tmp_path: Path) -> None:
    proc, store, _ = _start_trainer(tmp_path, FEEDBACK_CHAT_RETRAIN_FAULT="hang")
    try:
        deadline = time.time() + 120
        while not [r for r in store.registry.list_runs() if r.status == "running"]:
            assert time.time() < deadline, "no round started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)  # the trainer dies; its worker is still training
        proc.wait(timeout=30)
        deadline = time.time() + 60
        while (run := store.registry.list_runs()[-1]).status == "running":
            assert time.time() < deadline, "the abandoned run is still marked running"
            time.sleep(0.2)
        assert run.status == "failed", run
        assert "stopped before it finished" in (run.error or ""), run.error
        assert store.registry.current_run() is None
        again = store.registry.start_run(trigger="manual")  # the slot is free at once
        store.registry.update_run(again.id, status="failed", error="test cleanup")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
        store.close()
