"""The registry's contract (``store.registry``): adapter version names and statuses,
activation and rollback through the serving history, one training run at a time (also
under concurrent starts), reaping runs whose heartbeat went stale, and the shared
service state.

Registry input that is refused with a typed error is covered with the other bad-input
cases in ``test_store.py``. Tests taking ``store`` run on a SQLite file and on PostgreSQL.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from feedback_store import Conflict, FeedbackStore, RunInProgress
from feedback_store.models import TrainingRunRow

# -- the registry: adapter versions, training runs, shared state --------------------------


def test_version_names_count_up_from_the_largest(store: FeedbackStore) -> None:
    reg = store.registry
    assert reg.next_version_name() == "v0001"
    reg.register_version(version="v0001", path="/adapters/v0001", data_hash="abc",
                         metrics={"loss": 0.5, "diverged": float("nan")})
    assert reg.next_version_name() == "v0002"
    reg.register_version(version="v0010", path="/adapters/v0010", status="rejected")
    assert reg.next_version_name() == "v0011"
    v1 = reg.get_version("v0001")
    assert (v1.status, v1.path, v1.data_hash) == ("candidate", "/adapters/v0001", "abc")
    assert v1.metrics == {"loss": 0.5, "diverged": None}  # NaN is stored as null
    assert reg.get_version("v0010").status == "rejected"
    with pytest.raises(Conflict):
        reg.register_version(version="v0001", path="/elsewhere")
    assert [v.version for v in reg.list_versions()] == ["v0001", "v0010"]


def test_activate_retires_the_previous_and_rollback_walks_back_to_base(
    store: FeedbackStore,
) -> None:
    reg = store.registry
    for v in ("v0001", "v0002", "v0003"):
        reg.register_version(version=v, path=f"/adapters/{v}")

    def statuses() -> dict[str, str]:
        return {v.version: v.status for v in reg.list_versions()}

    with pytest.raises(Conflict):
        reg.rollback()  # nothing active
    assert reg.activate("v0001").status == "active"
    reg.activate("v0002", reasons=["better on held-out feedback"])
    assert statuses() == {"v0001": "retired", "v0002": "active", "v0003": "candidate"}
    assert reg.active_version().reasons == ("better on held-out feedback",)
    with pytest.raises(Conflict):
        reg.set_status("v0002", "retired")  # the active one

    back = reg.rollback()
    assert back is not None and back.version == "v0001"
    assert back.reasons == ("rolled back from v0002",)
    assert statuses() == {"v0001": "active", "v0002": "retired", "v0003": "candidate"}
    assert reg.rollback() is None  # then the bare base
    assert reg.active_version() is None
    assert set(statuses().values()) == {"retired", "candidate"}
    with pytest.raises(Conflict):
        reg.rollback()

    # a rollback after a fresh activation goes to what was served before it
    reg.activate("v0001")
    reg.activate("v0002")
    assert reg.rollback().version == "v0001"
    reg.activate("v0003")
    assert reg.rollback().version == "v0001"  # not v0002, which was rolled back
    # versions rejected since they were served are skipped
    reg.activate("v0002")
    reg.activate("v0003")
    reg.set_status("v0002", "rejected", reasons=["canary failed"])
    assert reg.rollback().version == "v0001"
    # the bare base is a step of the history too
    reg.activate(None)
    assert reg.active_version() is None
    reg.activate("v0003")
    assert reg.rollback() is None
    assert sum(s == "active" for s in statuses().values()) == 0


def test_concurrent_activations_leave_exactly_one_active_version(store: FeedbackStore) -> None:
    reg = store.registry
    names = [f"v{i:04d}" for i in range(1, 7)]
    for name in names:
        reg.register_version(version=name, path=f"/adapters/{name}")
    def activate(name: str, barrier: threading.Barrier) -> None:
        barrier.wait()
        reg.activate(name)

    for _ in range(3):
        barrier = threading.Barrier(len(names))
        threads = [threading.Thread(target=activate, args=(n, barrier)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        active = [v.version for v in reg.list_versions() if v.status == "active"]
        assert len(active) == 1 and reg.active_version().version == active[0]
    # the history is consistent too: rolling back steps through it down to the base
    seen = [reg.active_version().version]
    while (back := reg.rollback()) is not None:
        seen.append(back.version)
        assert len(seen) <= 3 * len(names)


def test_one_training_run_at_a_time_and_final_statuses_release_the_slot(
    store: FeedbackStore,
) -> None:
    reg = store.registry
    assert reg.current_run() is None and reg.last_finished_run() is None
    for final in ("succeeded", "failed", "rejected"):
        run = reg.start_run(trigger="manual", requested_by="ops")
        assert run.status == "queued" and run.heartbeat_at is not None
        with pytest.raises(RunInProgress, match=f"run {run.id} is queued"):
            reg.start_run(trigger="schedule")
        running = reg.update_run(run.id, status="running", progress={"step": 1},
                                 metrics={"loss": 1.0}, history=[{"step": 1, "loss": 1.0}])
        assert running.started_at is not None
        with pytest.raises(RunInProgress, match="running"):
            reg.start_run(trigger="api")
        reg.update_run(run.id, metrics={"kl": float("inf")}, history=[{"step": 2}],
                       kto_rows=4, dpo_rows=2, last_event_id=17)
        done = reg.update_run(run.id, status=final, decision="promote", reasons=["ok"],
                              error="trace\x00back")
        assert done.status == final and done.finished_at is not None
        assert done.metrics == {"loss": 1.0, "kl": None}
        assert done.history == ({"step": 1, "loss": 1.0}, {"step": 2})
        assert (done.kto_rows, done.dpo_rows, done.last_event_id) == (4, 2, 17)
        assert done.reasons == ("ok",) and "\x00" not in done.error
        assert reg.current_run() is None
        assert reg.last_finished_run().id == run.id
        with pytest.raises(Conflict):
            reg.update_run(run.id, status="running")
    assert len(reg.list_runs()) == 3


def test_many_threads_starting_runs_at_once_get_exactly_one(store: FeedbackStore) -> None:
    reg = store.registry
    barrier = threading.Barrier(8)
    results: list[object] = []

    def start() -> None:
        barrier.wait()
        try:
            results.append(reg.start_run(trigger="schedule"))
        except RunInProgress as exc:
            results.append(exc)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    started = [r for r in results if not isinstance(r, RunInProgress)]
    assert len(started) == 1 and len(results) == 8
    assert reg.current_run().id == started[0].id


def test_reap_stale_runs_fails_only_runs_without_a_recent_heartbeat(store: FeedbackStore) -> None:
    reg = store.registry
    stale = reg.start_run(trigger="test")
    with store.db.session(write=True) as s:  # its worker died two hours ago
        s.execute(update(TrainingRunRow).where(TrainingRunRow.id == stale.id)
                  .values(heartbeat_at=datetime.now(UTC) - timedelta(hours=2)))
    assert reg.reap_stale_runs(older_than=timedelta(hours=3)) == []
    assert reg.reap_stale_runs(older_than=timedelta(hours=1)) == [stale.id]
    reaped = reg.get_run(stale.id)
    assert reaped.status == "failed" and "heartbeat" in reaped.error
    assert reg.current_run() is None
    fresh = reg.start_run(trigger="test")
    assert reg.reap_stale_runs(older_than=timedelta(hours=1)) == []
    assert reg.current_run().id == fresh.id


def test_state_round_trips_and_is_replaced(store: FeedbackStore) -> None:
    reg = store.registry
    assert reg.get_state("schedule") is None
    assert reg.get_state("schedule", {"enabled": False}) == {"enabled": False}
    value = {"enabled": True, "every_minutes": 30, "last": {"event_id": 7, "tags": ["a"]}}
    assert reg.set_state("schedule", value) == value
    assert reg.get_state("schedule") == value
    reg.set_state("schedule", {"enabled": False})
    assert reg.get_state("schedule") == {"enabled": False}
