"""Adapter versions, training runs and shared service state.

Version names are ``v0001``, ``v0002``...; a version is registered only after its
folder is in place. At most one version is ``active``; activating one retires the
previous. Activations form a stack (kept in ``service_state`` under
ACTIVATION_HISTORY_KEY): ``activate`` pushes, ``rollback`` pops, so rolling back
twice after activating v1 then v2 serves v1, then the bare base. One training run
at a time in the whole cluster: a run holds the unique ``active_slot`` while queued
or running, so a second ``start_run`` anywhere fails with RunInProgress instead of
racing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import convert
from .convert import json_object, json_value
from .db import Database
from .errors import Conflict, InvalidInput, NotFound, RunInProgress
from .models import AdapterVersionRow, ServiceStateRow, TrainingRunRow
from .records import RUN_STATUSES, RUN_TRIGGERS, VERSION_STATUSES, AdapterVersion, TrainingRun

VERSION_RE = re.compile(r"^v(\d{4,})$")
FINAL_RUN_STATUSES = ("succeeded", "failed", "rejected")
MAX_HISTORY = 2000
ACTIVATION_HISTORY_KEY = "registry.activations"
MAX_ACTIVATIONS = 200  # entries of the rollback stack kept
ACTIVATION_LOCK_KEY = 724_914  # PostgreSQL advisory lock serialising activations


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
        metrics = json_object(metrics, "metrics")

        def work(s: Session) -> AdapterVersion:
            if s.get(AdapterVersionRow, version) is not None:
                raise Conflict(f"version {version} already exists")
            row = AdapterVersionRow(
                version=version, path=str(path), status=status, parent_version=parent_version,
                run_id=run_id, data_hash=data_hash, metrics=metrics,
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
        if status not in VERSION_STATUSES or status in ("active", "canary"):
            raise InvalidInput(f"status must be one of candidate/rejected/retired, not {status!r}")
        if metrics is not None:
            metrics = json_object(metrics, "metrics")
        reasons = [str(r) for r in reasons]

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
        """Make ``version`` the one served (None: serve the bare base) and push it on
        the rollback stack. The previous active version is retired. Serving replicas
        pick the change up by polling."""

        def work(s: Session) -> AdapterVersion | None:
            _lock_activations(s)
            row = _version(s, version) if version is not None else None
            history = _activation_history(s)
            history.append(version)
            _save_activation_history(s, history)
            return _make_active(s, row, reasons)

        return self.db.run(work)

    def rollback(self) -> AdapterVersion | None:
        """Serve the version that was active before the current one, or the bare base
        (returns None) when there was none. Versions rejected since are skipped.

        Raises Conflict when no version is active.
        """

        def work(s: Session) -> AdapterVersion | None:
            _lock_activations(s)
            cur = s.scalar(select(AdapterVersionRow).where(AdapterVersionRow.status == "active"))
            if cur is None:
                raise Conflict("no version is active: nothing to roll back")
            history = _activation_history(s)
            if not history or history[-1] != cur.version:
                history = _history_from_times(s, cur)
            history.pop()
            target = None
            while history:
                name = history[-1]
                target = s.get(AdapterVersionRow, name) if name is not None else None
                if name is None or (target is not None and target.status != "rejected"):
                    break
                history.pop()
                target = None
            _save_activation_history(s, history)
            return _make_active(s, target, (f"rolled back from {cur.version}",))

        return self.db.run(work)

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
        if progress is not None:
            progress = json_object(progress, "progress")
        if metrics:
            metrics = json_object(metrics, "metrics")
        history = [json_object(h, "history row") for h in history]
        if "reasons" in fields:
            fields["reasons"] = json_value(list(fields["reasons"] or ()), "reasons")
        if isinstance(fields.get("error"), str):  # keep a crash's message storable as is
            fields["error"] = (fields["error"].replace("\x00", "\\x00")
                               .encode("utf-8", "backslashreplace").decode("utf-8"))

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
                setattr(row, k, v)
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
        """Store a JSON mapping under ``key`` (1 to 100 characters), replacing it."""
        if not isinstance(key, str) or not 1 <= len(key) <= 100:
            raise InvalidInput("a state key is text of 1 to 100 characters")
        value = json_object(value, f"state {key!r}")

        def work(s: Session) -> dict[str, Any]:
            put_state(s, key, value)
            return dict(value)

        return self.db.run(work)


def _version(s: Session, version: str) -> AdapterVersionRow:
    row = s.get(AdapterVersionRow, version) if isinstance(version, str) else None
    if row is None:
        raise NotFound(f"no adapter version {version!r}")
    return row


def _lock_activations(s: Session) -> None:
    """Serialise activations cluster-wide (SQLite's BEGIN IMMEDIATE already does)."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ACTIVATION_LOCK_KEY})


def _activation_history(s: Session) -> list[str | None]:
    row = s.get(ServiceStateRow, ACTIVATION_HISTORY_KEY)
    value = (row.value or {}) if row is not None else {}
    return list(value.get("versions") or [])


def put_state(s: Session, key: str, value: dict[str, Any] | None) -> None:
    """Store ``value`` under ``key`` in ``service_state`` within the session's work."""
    row = s.get(ServiceStateRow, key)
    if row is None:
        s.add(ServiceStateRow(key=key, value=value))
    else:
        row.value = value
        row.updated_at = _now()


def _save_activation_history(s: Session, history: list[str | None]) -> None:
    put_state(s, ACTIVATION_HISTORY_KEY, {"versions": history[-MAX_ACTIVATIONS:]})


def _history_from_times(s: Session, cur: AdapterVersionRow) -> list[str | None]:
    """A rollback stack rebuilt from activation times (databases activated before
    the stack was kept): every other version ever activated, oldest first, then
    the current one."""
    rows = s.scalars(
        select(AdapterVersionRow)
        .where(AdapterVersionRow.activated_at.is_not(None),
               AdapterVersionRow.version != cur.version)
        .order_by(AdapterVersionRow.activated_at)
    )
    return [r.version for r in rows] + [cur.version]


def _make_active(
    s: Session, row: AdapterVersionRow | None, reasons: Sequence[str]
) -> AdapterVersion | None:
    """Retire whatever is active and activate ``row`` (None: the bare base)."""
    for cur in s.scalars(select(AdapterVersionRow).where(AdapterVersionRow.status == "active")):
        if row is None or cur.version != row.version:
            cur.status = "retired"
    if row is None:
        s.flush()
        return None
    row.status = "active"
    row.activated_at = _now()
    if reasons:
        row.reasons = [str(r) for r in reasons]
    s.flush()
    return convert.version(row)
