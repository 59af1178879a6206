"""The retraining schedule (APScheduler 3, a background interval job).

Every ``interval_minutes`` the job starts a round when the schedule is not paused,
no run is in progress anywhere, no canary is on trial (its live ratings decide first;
a round that passed the gate would replace it), and at least ``min_feedback`` feedback
events arrived since the newest event the last finished round saw. The schedule's state
(interval, minimum, paused) lives in the store, so the console can change it and
every replica's scheduler agrees; only one round runs at a time whatever fires.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from feedback_store import FeedbackStore, InvalidInput, RunInProgress, StoreError

from .config import RetrainSettings
from .runner import start_round

log = logging.getLogger(__name__)
STATE_KEY = "schedule"
JOB_ID = "retrain"


@dataclass(frozen=True)
class ScheduleState:
    interval_minutes: float
    min_feedback: int
    paused: bool = False

    def validate(self) -> None:
        problems = []
        if not self.interval_minutes > 0:
            problems.append("interval_minutes must be positive")
        if self.min_feedback < 0:
            problems.append("min_feedback must be 0 or more")
        if problems:
            raise InvalidInput("; ".join(problems))


class RetrainScheduler:
    def __init__(self, settings: RetrainSettings | dict[str, Any], *, interval_minutes: float,
                 min_feedback: int) -> None:
        self.settings = RetrainSettings.coerce(settings)
        self.store = FeedbackStore.open(self.settings.database_url)
        self.registry = self.store.registry
        saved = self.registry.get_state(STATE_KEY)
        self._state = ScheduleState(**saved) if saved else ScheduleState(interval_minutes,
                                                                          min_feedback)
        self._scheduler = BackgroundScheduler(daemon=True)
        self.last_check: dict[str, Any] = {}

    def start(self) -> RetrainScheduler:
        self._scheduler.add_job(self.tick, "interval", id=JOB_ID, max_instances=1,
                                coalesce=True, minutes=self._state.interval_minutes)
        self._scheduler.start(paused=False)
        return self

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        self.store.close()

    def state(self) -> dict[str, Any]:
        """The schedule as an operator sees it, with the next run time and pending count."""
        self._refresh()
        job = self._scheduler.get_job(JOB_ID)
        nxt = job.next_run_time if job is not None and not self._state.paused else None
        return {**asdict(self._state), "next_run_time": nxt.isoformat() if nxt else None,
                "new_feedback": self.pending_feedback(), "last_check": self.last_check}

    def update(self, *, interval_minutes: float | None = None, min_feedback: int | None = None,
               paused: bool | None = None) -> dict[str, Any]:
        cur = self._refresh()
        new = ScheduleState(
            interval_minutes=cur.interval_minutes if interval_minutes is None else interval_minutes,
            min_feedback=cur.min_feedback if min_feedback is None else min_feedback,
            paused=cur.paused if paused is None else paused,
        )
        new.validate()
        self.registry.set_state(STATE_KEY, asdict(new))
        self._apply(new)
        return self.state()

    def pause(self) -> dict[str, Any]:
        return self.update(paused=True)

    def resume(self) -> dict[str, Any]:
        return self.update(paused=False)

    def pending_feedback(self) -> int:
        last = self.registry.last_finished_run()
        after = last.last_event_id if last and last.last_event_id is not None else None
        return self.store.count_events(after_id=after)

    def tick(self) -> str:
        """One scheduled check; returns what it did (also kept in ``last_check``)."""
        try:
            state = self._refresh()
            if state.paused:
                outcome = "paused"
            elif self.registry.current_run() is not None:
                outcome = "a run is already in progress"
            elif (canary := self.store.canaries.current()) is not None:
                outcome = f"waiting: canary {canary.version} is on trial with live chats"
            else:
                pending = self.pending_feedback()
                if pending < state.min_feedback:
                    outcome = f"waiting: {pending} of {state.min_feedback} new feedback events"
                else:
                    run = start_round(settings=self.settings, trigger="schedule", wait=False)
                    outcome = f"started run {run.id} on {pending} new feedback events"
        except RunInProgress:
            outcome = "a run is already in progress"
        except StoreError as exc:
            outcome = f"store unavailable: {exc}"
        self.last_check = {"at": datetime.now().astimezone().isoformat(), "outcome": outcome}
        log.info("retrain schedule: %s", outcome)
        return outcome

    def _refresh(self) -> ScheduleState:
        saved = self.registry.get_state(STATE_KEY)
        if saved:
            new = ScheduleState(**saved)
            if new != self._state:
                self._apply(new)
        return self._state

    def _apply(self, new: ScheduleState) -> None:
        old, self._state = self._state, new
        job = self._scheduler.get_job(JOB_ID) if self._scheduler.running else None
        if job is None:
            return
        if new.interval_minutes != old.interval_minutes:
            job.reschedule("interval", minutes=new.interval_minutes)
        if new.paused:
            job.pause()
        elif old.paused or job.next_run_time is None:
            job.resume()


def start_scheduler(*, settings: RetrainSettings | dict[str, Any], interval_minutes: float = 60.0,
                    min_feedback: int = 20) -> RetrainScheduler:
    """Start the schedule in this process (the serving process by default)."""
    return RetrainScheduler(settings, interval_minutes=interval_minutes,
                            min_feedback=min_feedback).start()


__all__ = ["RetrainScheduler", "ScheduleState", "start_scheduler"]
