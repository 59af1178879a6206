"""Adapter versions, training runs and shared service state.

Version names are ``v0001``, ``v0002``...; a version is registered only after its
folder is in place. At most one version is ``active``; activating one retires the
previous. One training run at a time in the whole cluster: a run holds the unique
``active_slot`` while queued or running, so a second ``start_run`` anywhere fails
with RunInProgress instead of racing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import convert
from .db import Database
from .errors import Conflict, InvalidInput, NotFound, RunInProgress
from .models import AdapterVersionRow, ServiceStateRow, TrainingRunRow
from .records import RUN_STATUSES, RUN_TRIGGERS, VERSION_STATUSES, AdapterVersion, TrainingRun

VERSION_RE = re.compile(r"^v(\d{4,})$")
FINAL_RUN_STATUSES = ("succeeded", "failed", "rejected")
MAX_HISTORY = 2000


def version_name(n: int) -> str:
    return f"v{n:04d}"


def _now() -> datetime:
    return datetime.now(UTC)


class Registry:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- adapter versions -------------------------------------------------------------

    def next_version_name(self) -> str:
        def work(s: Session) -> str:
            nums = [int(m.group(1)) for v in s.scalars(select(AdapterVersionRow.version))
                    if (m := VERSION_RE.match(v))]
            return version_name(max(nums, default=0) + 1)

        return self.db.run(work, write=False)

    def register_version(
        self,
        *,
        version: str,
        path: str,
        parent_version: str | None = None,
        run_id: int | None = None,
        data_hash: str | None = None,
        metrics: dict[str, Any] | None = None,
        status: str = "candidate",
    ) -> AdapterVersion:
        if not VERSION_RE.match(version or ""):
            raise InvalidInput(f"version names look like v0001, not {version!r}")
        if status not in ("candidate", "rejected"):
            raise InvalidInput("a new version is registered as candidate or rejected")

        def work(s: Session) -> AdapterVersion:
            if s.get(AdapterVersionRow, version) is not None:
                raise Conflict(f"version {version} already exists")
            row = AdapterVersionRow(
                version=version, path=str(path), status=status, parent_version=parent_version,
                run_id=run_id, data_hash=data_hash, metrics=metrics or {},
            )
            s.add(row)
            s.flush()
            return convert.version(row)

        return self.db.run(work)

    def get_version(self, version: str) -> AdapterVersion:
        return self.db.run(lambda s: convert.version(_version(s, version)), write=False)

    def list_versions(self) -> list[AdapterVersion]:
        def work(s: Session) -> list[AdapterVersion]:
            rows = s.scalars(select(AdapterVersionRow).order_by(AdapterVersionRow.created_at,
                                                                AdapterVersionRow.version))
            return [convert.version(r) for r in rows]

        return self.db.run(work, write=False)

    def active_version(self) -> AdapterVersion | None:
        def work(s: Session) -> AdapterVersion | None:
            row = s.scalar(select(AdapterVersionRow).where(AdapterVersionRow.status == "active"))
            return convert.version(row) if row else None

        return self.db.run(work, write=False)

    def set_status(
        self, version: str, status: str, *, reasons: Sequence[str] = (),
        metrics: dict[str, Any] | None = None,
    ) -> AdapterVersion:
        """Mark a version candidate, rejected or retired (use ``activate`` for active)."""
        if status not in VERSION_STATUSES or status == "active":
            raise InvalidInput(f"status must be one of candidate/rejected/retired, not {status!r}")

        def work(s: Session) -> AdapterVersion:
            row = _version(s, version)
            if row.status == "active":
                raise Conflict(f"{version} is active; activate another version or roll back first")
            row.status = status
            if reasons:
                row.reasons = list(reasons)
            if metrics is not None:
                row.metrics = {**(row.metrics or {}), **metrics}
            return convert.version(row)

        return self.db.run(work)

    def activate(self, version: str | None, *, reasons: Sequence[str] = ()) -> AdapterVersion | None:
        """Make ``version`` the one served (None: serve the bare base). The previous
        active version is retired. Serving replicas pick the change up by polling."""

        def work(s: Session) -> AdapterVersion | None:
            row = _version(s, version) if version is not None else None
            for cur in s.scalars(select(AdapterVersionRow).where(AdapterVersionRow.status == "active")):
                if row is None or cur.version != row.version:
                    cur.status = "retired"
            if row is None:
                return None
            row.status = "active"
            row.activated_at = _now()
            if reasons:
                row.reasons = list(reasons)
            s.flush()
            return convert.version(row)

        return self.db.run(work)

    def rollback(self) -> AdapterVersion | None:
        """Activate the version that was active before the current one (or the base)."""

        def work(s: Session) -> str | None:
            cur = s.scalar(select(AdapterVersionRow).where(AdapterVersionRow.status == "active"))
            if cur is None:
                raise Conflict("no version is active: nothing to roll back")
            prev = s.scalar(
                select(AdapterVersionRow)
                .where(AdapterVersionRow.activated_at.is_not(None),
                       AdapterVersionRow.version != cur.version,
                       AdapterVersionRow.status == "retired",
                       AdapterVersionRow.activated_at < cur.activated_at)
                .order_by(AdapterVersionRow.activated_at.desc())
                .limit(1)
            )
            return prev.version if prev else None

        previous = self.db.run(work, write=False)
        return self.activate(previous, reasons=() if previous is None else ("rolled back to",))

    # -- training runs ----------------------------------------------------------------

    def start_run(self, *, trigger: str, requested_by: str | None = None) -> TrainingRun:
        """Queue a run, or raise RunInProgress if one is queued or running anywhere."""
        if trigger not in RUN_TRIGGERS:
            raise InvalidInput(f"trigger must be one of {RUN_TRIGGERS}, not {trigger!r}")

        def work(s: Session) -> TrainingRun:
            row = TrainingRunRow(trigger=trigger, status="queued", active_slot=1,
                                 requested_by=requested_by, heartbeat_at=_now())
            s.add(row)
            s.flush()
            return convert.run(row)

        try:
            return self.db.run(work)
        except IntegrityError as exc:
            current = self.current_run()
            what = f"run {current.id} is {current.status}" if current else "another run holds the slot"
            raise RunInProgress(f"a training run is already in progress: {what}") from exc

    def update_run(
        self,
        run_id: int,
        *,
        status: str | None = None,
        progress: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        history: Sequence[dict[str, Any]] = (),
        **fields: Any,
    ) -> TrainingRun:
        """Update a run (also its heartbeat). Final statuses release the run slot.

        ``history`` rows are appended (kept to the last MAX_HISTORY); ``metrics`` are
        merged; other keyword fields (kto_rows, dpo_rows, last_event_id, error,
        candidate_version, decision, reasons) are set as given.
        """
        allowed = {"kto_rows", "dpo_rows", "last_event_id", "error", "candidate_version",
                   "decision", "reasons"}
        unknown = set(fields) - allowed
        if unknown:
            raise InvalidInput(f"unknown run fields {sorted(unknown)}")
        if status is not None and status not in RUN_STATUSES:
            raise InvalidInput(f"status must be one of {RUN_STATUSES}, not {status!r}")

        def work(s: Session) -> TrainingRun:
            row = s.get(TrainingRunRow, run_id)
            if row is None:
                raise NotFound(f"no training run with id {run_id}")
            now = _now()
            if status is not None and status != row.status:
                if row.status in FINAL_RUN_STATUSES:
                    raise Conflict(f"run {run_id} already ended as {row.status}")
                row.status = status
                if status == "running" and row.started_at is None:
                    row.started_at = now
                if status in FINAL_RUN_STATUSES:
                    row.finished_at = now
                    row.active_slot = None
            if progress is not None:
                row.progress = progress
            if metrics:
                row.metrics = {**(row.metrics or {}), **metrics}
            if history:
                row.history = (list(row.history or []) + list(history))[-MAX_HISTORY:]
            for k, v in fields.items():
                setattr(row, k, list(v) if k == "reasons" else v)
            row.heartbeat_at = now
            s.flush()
            return convert.run(row)

        return self.db.run(work)

    def get_run(self, run_id: int) -> TrainingRun:
        def work(s: Session) -> TrainingRun:
            row = s.get(TrainingRunRow, run_id)
            if row is None:
                raise NotFound(f"no training run with id {run_id}")
            return convert.run(row)

        return self.db.run(work, write=False)

    def list_runs(self, *, limit: int = 50) -> list[TrainingRun]:
        def work(s: Session) -> list[TrainingRun]:
            rows = s.scalars(select(TrainingRunRow).order_by(TrainingRunRow.id.desc()).limit(limit))
            return [convert.run(r) for r in rows]

        return self.db.run(work, write=False)

    def current_run(self) -> TrainingRun | None:
        def work(s: Session) -> TrainingRun | None:
            row = s.scalar(select(TrainingRunRow).where(TrainingRunRow.active_slot.is_not(None)))
            return convert.run(row) if row else None

        return self.db.run(work, write=False)

    def last_finished_run(self) -> TrainingRun | None:
        def work(s: Session) -> TrainingRun | None:
            row = s.scalar(select(TrainingRunRow)
                           .where(TrainingRunRow.status.in_(FINAL_RUN_STATUSES))
                           .order_by(TrainingRunRow.id.desc()).limit(1))
            return convert.run(row) if row else None

        return self.db.run(work, write=False)

    def reap_stale_runs(self, *, older_than: timedelta) -> list[int]:
        """Fail queued/running runs whose heartbeat is older than ``older_than``
        (their worker died); returns their ids and frees the run slot."""
        cutoff = _now() - older_than

        def work(s: Session) -> list[int]:
            rows = list(s.scalars(select(TrainingRunRow).where(
                TrainingRunRow.active_slot.is_not(None))))
            ids = []
            for row in rows:
                hb = convert.aware(row.heartbeat_at or row.created_at)
                if hb < cutoff:
                    s.execute(update(TrainingRunRow).where(TrainingRunRow.id == row.id).values(
                        status="failed", active_slot=None, finished_at=_now(),
                        error=row.error or f"the training worker stopped answering (no heartbeat since {hb:%Y-%m-%d %H:%M:%S} UTC)"))
                    ids.append(row.id)
            return ids

        return self.db.run(work)

    # -- shared state -----------------------------------------------------------------

    def get_state(self, key: str, default: dict[str, Any] | None = None) -> dict[str, Any] | None:
        def work(s: Session) -> dict[str, Any] | None:
            row = s.get(ServiceStateRow, key)
            return dict(row.value) if row and row.value is not None else default

        return self.db.run(work, write=False)

    def set_state(self, key: str, value: dict[str, Any]) -> dict[str, Any]:
        def work(s: Session) -> dict[str, Any]:
            row = s.get(ServiceStateRow, key)
            if row is None:
                s.add(ServiceStateRow(key=key, value=value))
            else:
                row.value = value
                row.updated_at = _now()
            return dict(value)

        return self.db.run(work)


def _version(s: Session, version: str) -> AdapterVersionRow:
    row = s.get(AdapterVersionRow, version) if isinstance(version, str) else None
    if row is None:
        raise NotFound(f"no adapter version {version!r}")
    return row
