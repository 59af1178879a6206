"""The retraining schedule: when it starts a round, when it waits, and its shared state."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from feedback_data import seed_preferences
from tiny_models import make_tiny_model

from feedback_store import FeedbackStore, InvalidInput
from retrain import RetrainScheduler, RetrainSettings


@pytest.fixture
def setup(tmp_path, monkeypatch):
    # Rounds started by the schedule fail at their first step: this file tests the
    # schedule, not training (tests/test_retrain_round.py covers that).
    monkeypatch.setenv("FEEDBACK_CHAT_RETRAIN_FAULT", "exception")
    url = f"sqlite:///{tmp_path / 'f.db'}"
    store = FeedbackStore.open(url)
    model = make_tiny_model(tmp_path / "model")
    settings = RetrainSettings(database_url=url, adapters_dir=str(tmp_path / "adapters"),
                               model=str(model))
    sched = RetrainScheduler(settings, interval_minutes=30, min_feedback=10).start()
    yield store, settings, sched
    sched.shutdown()


def wait_final(store, run_id, timeout=180):
    deadline = time.time() + timeout
    while store.registry.get_run(run_id).status in ("queued", "running"):
        assert time.time() < deadline
        time.sleep(0.2)
    return store.registry.get_run(run_id)


def test_waits_for_enough_new_feedback_then_starts_one_round(setup):
    store, settings, sched = setup
    assert sched.tick().startswith("waiting: 0 of 10")
    seed_preferences(store, rounds=1)  # 24 events
    outcome = sched.tick()
    assert outcome.startswith("started run")
    run = store.registry.list_runs()[0]
    assert run.trigger == "schedule"
    # a second scheduler (another replica) does not start a second run meanwhile
    other = RetrainScheduler(settings, interval_minutes=30, min_feedback=10)
    assert other.tick() == "a run is already in progress" or (
        store.registry.get_run(run.id).status not in ("queued", "running"))
    final = wait_final(store, run.id)
    assert final.status == "failed" and "injected" in final.error
    assert len(store.registry.list_runs()) == 1


def test_counts_feedback_since_the_last_finished_round(setup):
    store, settings, sched = setup
    seed_preferences(store, rounds=1)
    run = store.registry.start_run(trigger="test")
    store.registry.update_run(run.id, status="failed", last_event_id=store.last_event_id())
    assert sched.pending_feedback() == 0
    assert sched.tick().startswith("waiting: 0 of 10")
    seed_preferences(store, rounds=1)
    assert sched.pending_feedback() == 24


def test_a_canary_on_trial_holds_scheduled_rounds_back(setup, tmp_path):
    from feedback_store.canary import CanaryConfig

    store, settings, sched = setup
    seed_preferences(store, rounds=1)
    (tmp_path / "v0001").mkdir()
    store.registry.register_version(version="v0001", path=str(tmp_path / "v0001"))
    store.canaries.start("v0001", CanaryConfig())
    assert sched.tick() == "waiting: canary v0001 is on trial with live chats"
    assert store.registry.list_runs() == []
    store.canaries.end_by_hand("stopped")
    assert sched.tick().startswith("started run")


def test_pause_resume_and_changes_are_shared_through_the_store(setup):
    store, settings, sched = setup
    seed_preferences(store, rounds=1)
    st = sched.pause()
    assert st["paused"] is True and st["next_run_time"] is None
    assert sched.tick() == "paused"
    # another process sees (and can change) the same schedule
    other = RetrainScheduler(settings, interval_minutes=999, min_feedback=999)
    assert other.state()["paused"] is True and other.state()["interval_minutes"] == 30
    other.update(min_feedback=50, paused=False)
    st = sched.state()
    assert st["min_feedback"] == 50 and st["paused"] is False and st["next_run_time"]
    assert sched.tick().startswith("waiting: 24 of 50")
    st = sched.update(interval_minutes=5)
    assert st["interval_minutes"] == 5
    with pytest.raises(InvalidInput):
        sched.update(interval_minutes=0)
    with pytest.raises(InvalidInput):
        sched.update(min_feedback=-1)


_NO_APSCHEDULER = textwrap.dedent("""
    import sys

    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "apscheduler" or name.startswith("apscheduler."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    for mod in [m for m in sys.modules if m == "apscheduler" or m.startswith("apscheduler.")]:
        del sys.modules[mod]
    sys.meta_path.insert(0, _Block())
    try:
        import apscheduler  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("the block did not work")

    import runpy
    import retrain.worker  # noqa: F401
    from retrain import RetrainSettings, start_round  # noqa: F401
    runpy.run_module("retrain.worker", run_name="not_main")
    assert "apscheduler" not in sys.modules
    try:
        from retrain import start_scheduler  # noqa: F401
    except ModuleNotFoundError as exc:
        assert exc.name.startswith("apscheduler"), exc
    else:
        raise SystemExit("start_scheduler imported without apscheduler")
    print("ok")
""")


def test_retrain_and_its_worker_import_without_apscheduler():
    # A trainer-only install (store + ML extras) has no APScheduler: the worker and
    # start_round must still import; only the schedule itself needs it.
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", _NO_APSCHEDULER], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_the_schedule_is_still_exported_lazily():
    import retrain
    from retrain.scheduler import RetrainScheduler as direct
    from retrain.scheduler import start_scheduler

    assert retrain.RetrainScheduler is direct and RetrainScheduler is direct
    assert retrain.start_scheduler is start_scheduler
    assert {"RetrainScheduler", "start_scheduler"} <= set(retrain.__all__)
    with pytest.raises(AttributeError):
        retrain.no_such_name  # noqa: B018
