"""Operator actions: retrain now, promote, roll back, and the retraining schedule.

Promote and roll back change the registry only; every serving replica's adapter
watcher then hot-swaps to the new active version. "Retrain now" starts one round in a
child process through ``retrain.start_round`` and returns at once. The schedule is
changed through the in-process scheduler when there is one, else in the store (key
"schedule"), where every scheduler reads it on its next tick.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from feedback_store import Conflict, NotFound, RunInProgress, StoreError

from .context import ActionResult, ConsoleContext, ConsoleError

SCHEDULE_KEY = "schedule"


def retrain_now(ctx: ConsoleContext, *, requested_by: str | None = None) -> ActionResult:
    """Start a training round (trigger "manual"); RunInProgress becomes a clear refusal."""
    try:
        from retrain import start_round
    except ImportError:
        return ActionResult(False, "Retraining is not installed on this server.")
    try:
        run = start_round(settings=ctx.retrain_settings(), trigger="manual", wait=False,
                          requested_by=requested_by)
    except RunInProgress as exc:
        return ActionResult(False, f"Not started: {exc}. Wait for it to finish.")
    except StoreError as exc:
        return ActionResult(False, f"Not started: {exc}")
    if run.status == "failed":
        return ActionResult(False, f"Run {run.id} failed to start: {run.error}", run_id=run.id)
    return ActionResult(True, f"Started training run {run.id}.", run_id=run.id)


def promote(ctx: ConsoleContext, version: str | None, *, by: str | None = None) -> ActionResult:
    """Make ``version`` the served adapter (``registry.activate``)."""
    version = (version or "").strip()
    if not version:
        return ActionResult(False, "Pick a version to promote.")
    reg = ctx.registry
    try:
        current = reg.active_version()
        if current is not None and current.version == version:
            return ActionResult(False, f"{version} is already active.", version=version)
        v = reg.activate(version, reasons=(f"promoted by operator {by or ''}".strip(),))
    except NotFound:
        return ActionResult(False, f"There is no adapter version {version!r}.")
    except StoreError as exc:
        return ActionResult(False, f"Not promoted: {exc}")
    return ActionResult(True, f"{v.version} is now active; servers switch to it within seconds.",
                        version=v.version)


def rollback(ctx: ConsoleContext) -> ActionResult:
    """Serve the version active before the current one (or the bare base)."""
    try:
        v = ctx.registry.rollback()
    except Conflict as exc:
        return ActionResult(False, f"Nothing to roll back: {exc}")
    except StoreError as exc:
        return ActionResult(False, f"Not rolled back: {exc}")
    if v is None:
        return ActionResult(True, "Rolled back: now serving the base model (no adapter).")
    return ActionResult(True, f"Rolled back: now serving {v.version}.", version=v.version)


@dataclass(frozen=True)
class ScheduleView:
    """The retraining schedule as an operator sees it.

    ``next_run_time`` is known only where the scheduler runs in this process
    (``runs_here``); ``new_feedback`` counts events since the last finished round.
    """

    interval_minutes: float
    min_feedback: int
    paused: bool
    next_run_time: str | None
    new_feedback: int
    runs_here: bool
    last_check: str | None = None

    def describe(self) -> str:
        state = "paused" if self.paused else "running"
        if self.paused:
            nxt = "none while paused"
        elif self.next_run_time:
            nxt = self.next_run_time
        else:
            nxt = ("unknown here (the scheduler runs in another process)" if not self.runs_here
                   else "not scheduled")
        lines = [f"**Schedule:** {state}; every {self.interval_minutes:g} min, when at least "
                 f"{self.min_feedback} new feedback events arrived.",
                 f"**Next check:** {nxt}. **New feedback since the last round:** "
                 f"{self.new_feedback}."]
        if self.last_check:
            lines.append(f"**Last check:** {self.last_check}")
        return "\n\n".join(lines)


def _new_feedback(ctx: ConsoleContext) -> int:
    last = ctx.registry.last_finished_run()
    after = last.last_event_id if last and last.last_event_id is not None else None
    return ctx.store.count_events(after_id=after)


def schedule_view(ctx: ConsoleContext) -> ScheduleView:
    if ctx.scheduler is not None:
        st: dict[str, Any] = ctx.scheduler.state()
        check = st.get("last_check") or {}
        return ScheduleView(
            interval_minutes=float(st["interval_minutes"]), min_feedback=int(st["min_feedback"]),
            paused=bool(st["paused"]), next_run_time=_show_time(st.get("next_run_time")),
            new_feedback=int(st.get("new_feedback", 0)), runs_here=True,
            last_check=f"{_show_time(check['at'])}: {check['outcome']}" if check else None)
    saved = ctx.registry.get_state(SCHEDULE_KEY) or {}
    interval, minimum = ctx.default_schedule
    return ScheduleView(
        interval_minutes=float(saved.get("interval_minutes", interval)),
        min_feedback=int(saved.get("min_feedback", minimum)),
        paused=bool(saved.get("paused", False)), next_run_time=None,
        new_feedback=_new_feedback(ctx), runs_here=False)


def _show_time(iso: str | None) -> str | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    except ValueError:
        return iso


def parse_schedule(interval_minutes: Any, min_feedback: Any) -> tuple[float, int]:
    """Validate the form's numbers; raise ConsoleError listing every problem."""
    problems = []
    try:
        interval = float(interval_minutes)
        if not math.isfinite(interval) or interval <= 0:
            raise ValueError
    except (TypeError, ValueError):
        problems.append(f"the interval must be a positive number of minutes, not "
                        f"{interval_minutes!r}")
        interval = 0.0
    try:
        minimum = float(min_feedback)
        if not minimum.is_integer() or minimum < 0:
            raise ValueError
    except (TypeError, ValueError):
        problems.append(f"the minimum new feedback must be a whole number >= 0, not "
                        f"{min_feedback!r}")
        minimum = 0.0
    if problems:
        raise ConsoleError(problems)
    return interval, int(minimum)


def update_schedule(
    ctx: ConsoleContext, *, interval_minutes: Any, min_feedback: Any, paused: bool
) -> ScheduleView:
    """Change the schedule (all three fields); raise ConsoleError on bad numbers."""
    interval, minimum = parse_schedule(interval_minutes, min_feedback)
    if ctx.scheduler is not None:
        ctx.scheduler.update(interval_minutes=interval, min_feedback=minimum, paused=bool(paused))
    else:
        ctx.registry.set_state(SCHEDULE_KEY, {"interval_minutes": interval,
                                              "min_feedback": minimum, "paused": bool(paused)})
    return schedule_view(ctx)
