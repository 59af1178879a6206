"""Canary rollout: a version that passed the offline gate serves a share of new
conversations, and live ratings decide whether it serves everyone.

State lives in the database, so every replica behaves the same: the running canary
is the ``service_state`` row CANARY_KEY (its version, the active version it is
compared with, the share, the first conversation id it covers, when it started and
the rule), and the version's status is ``canary``. Which version a conversation gets
is a pure function of its id (:func:`in_canary`): the same on every replica, and the
same for every turn of a conversation while the canary runs. Conversations that
started before the canary stay on the active version and are not counted.

:meth:`Canaries.check` reads the figures (per version: replies, thumbs, edits,
regenerations, good share and interval; the rule's verdict; time left);
:meth:`Canaries.decide` applies the verdict in one transaction under the activation
lock (any replica may call it; the first one wins and the others see the canary
ended): promote (the canary becomes active and is pushed on the rollback stack),
roll back (the canary is rejected), or, past the time or rating limit, end it
undecided (it goes back to being a candidate, the active version stays). Operators
can promote, stop or roll back by hand. Every end is recorded with its figures in
the version's reasons and metrics and in CANARY_HISTORY_KEY.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .db import Database
from .errors import Conflict, InvalidInput
from .models import (
    AdapterVersionRow,
    ConversationRow,
    FeedbackEventRow,
    MessageRow,
    ServiceStateRow,
)
from .registry import (
    _activation_history,
    _lock_activations,
    _make_active,
    _save_activation_history,
    _version,
    put_state,
)
from .sequential import ArmCounts, Rule, Verdict, decide, finite_number

CANARY_KEY = "canary.current"
CANARY_HISTORY_KEY = "canary.history"
MAX_CANARY_HISTORY = 50
BASE_LABEL = "base"  # what replies of the bare base are stored with


@dataclass(frozen=True)
class CanaryConfig:
    """``share`` of new conversations the canary serves (0: off, a version that passes
    the gate is promoted directly); the rule (:class:`feedback_store.sequential.Rule`):
    ``min_ratings`` per version, ``margin``, ``error_rate``, ``mixing_sd``; and the
    limits after which a canary ends undecided: ``time_limit_hours`` and
    ``max_ratings`` (both versions together)."""

    share: float = 0.2
    min_ratings: int = 40
    margin: float = 0.0
    error_rate: float = 0.05
    mixing_sd: float = 0.1
    time_limit_hours: float = 24.0
    max_ratings: int = 2000

    @property
    def off(self) -> bool:
        return self.share == 0

    def rule(self) -> Rule:
        return Rule(min_ratings=self.min_ratings, margin=self.margin,
                    error_rate=self.error_rate, mixing_sd=self.mixing_sd)

    def problems(self) -> list[str]:
        out = []
        if not finite_number(self.share) or not 0 <= self.share < 1:
            out.append(f"canary share must be in [0, 1) (0 = off), got {self.share!r}")
        out += [f"canary {p}" for p in self.rule().problems()]
        if not finite_number(self.time_limit_hours) or self.time_limit_hours <= 0:
            out.append(f"canary time_limit_hours must be > 0, got {self.time_limit_hours!r}")
        if isinstance(self.max_ratings, bool) or not isinstance(self.max_ratings, int) \
                or self.max_ratings < 2:
            out.append(f"canary max_ratings must be an int >= 2, got {self.max_ratings!r}")
        return out

    def validate(self) -> CanaryConfig:
        problems = self.problems()
        if problems:
            raise InvalidInput("; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> CanaryConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (value or {}).items() if k in known})


@dataclass(frozen=True)
class CanaryState:
    version: str
    active: str  # the version it is compared with ("base": the bare base)
    share: float
    first_conversation_id: int
    started_at: datetime
    config: CanaryConfig

    @property
    def deadline(self) -> datetime:
        return self.started_at + timedelta(hours=self.config.time_limit_hours)

    def version_for(self, conversation_id: int) -> str:
        """The version serving ``conversation_id`` while this canary runs."""
        if conversation_id >= self.first_conversation_id and in_canary(
                conversation_id, self.version, self.share):
            return self.version
        return self.active

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "active": self.active, "share": self.share,
                "first_conversation_id": self.first_conversation_id,
                "started_at": self.started_at.isoformat(), "config": self.config.to_dict()}

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> CanaryState:
        return cls(version=value["version"], active=value["active"], share=float(value["share"]),
                   first_conversation_id=int(value["first_conversation_id"]),
                   started_at=datetime.fromisoformat(value["started_at"]),
                   config=CanaryConfig.from_dict(value.get("config") or {}))


@dataclass(frozen=True)
class CanaryStatus:
    """What :meth:`Canaries.check` saw: the figures an operator reads."""

    state: CanaryState
    active: ArmCounts
    canary: ArmCounts
    verdict: Verdict
    now: datetime

    @property
    def time_left(self) -> timedelta:
        return max(timedelta(0), self.state.deadline - self.now)

    @property
    def ratings(self) -> int:
        return self.active.rated + self.canary.rated

    def to_dict(self) -> dict[str, Any]:
        return {**self.state.to_dict(), "counts": {self.state.active: self.active.to_dict(),
                                                   self.state.version: self.canary.to_dict()},
                "decision": self.verdict.decision, "diff": self.verdict.diff,
                "low": self.verdict.low, "high": self.verdict.high,
                "reason": self.verdict.reason, "ratings": self.ratings,
                "time_left_s": self.time_left.total_seconds(), "checked_at": self.now.isoformat()}


def in_canary(conversation_id: int, version: str, share: float) -> bool:
    """Whether the canary ``version`` serves ``conversation_id``: a hash of both,
    mapped to [0, 1), below ``share``. Random across conversations, fixed for one."""
    digest = hashlib.sha256(f"{version}:{int(conversation_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < share


def _now() -> datetime:
    return datetime.now(UTC)


class Canaries:
    """The canary operations on one database (``FeedbackStore.canaries``)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- reading ----------------------------------------------------------------------

    def current(self) -> CanaryState | None:
        return self.db.run(_current, write=False)

    def check(self, *, now: datetime | None = None) -> CanaryStatus | None:
        """The running canary's figures and the rule's verdict (nothing changes)."""
        return self.db.run(lambda s: _status(s, now or _now()), write=False)

    def history(self) -> list[dict[str, Any]]:
        """Ended canaries, newest first, with their figures."""
        def work(s: Session) -> list[dict[str, Any]]:
            row = s.get(ServiceStateRow, CANARY_HISTORY_KEY)
            return list(reversed((row.value or {}).get("ended", []))) if row else []

        return self.db.run(work, write=False)

    # -- changing ---------------------------------------------------------------------

    def start(self, version: str, config: CanaryConfig, *, reasons: tuple[str, ...] = (),
              now: datetime | None = None) -> CanaryState:
        """Make candidate ``version`` the canary against the active version."""
        config.validate()
        if config.off:
            raise InvalidInput("the canary is off (share 0): promote the version directly")

        def work(s: Session) -> CanaryState:
            _lock_activations(s)
            if _current(s) is not None:
                raise Conflict(f"a canary is already running ({_current(s).version}); "
                               "stop it first")
            row = _version(s, version)
            if row.status != "candidate":
                raise Conflict(f"{version} is {row.status}; only a candidate can become the canary")
            active = s.scalar(select(AdapterVersionRow.version)
                              .where(AdapterVersionRow.status == "active"))
            last = s.scalar(select(func.max(ConversationRow.id))) or 0
            state = CanaryState(version=version, active=active or BASE_LABEL, share=config.share,
                                first_conversation_id=last + 1, started_at=now or _now(),
                                config=config)
            row.status = "canary"
            row.reasons = [*reasons, f"canary: serving {config.share:.0%} of new conversations "
                                     f"against {state.active}"]
            put_state(s, CANARY_KEY, state.to_dict())
            return state

        return self.db.run(work)

    def decide(self, *, now: datetime | None = None) -> dict[str, Any] | None:
        """Apply the rule to the running canary: returns the ended canary's record when
        it ended now (promoted, rolled back, or undecided at a limit), else None."""

        def work(s: Session) -> dict[str, Any] | None:
            _lock_activations(s)
            status = _status(s, now or _now())
            if status is None:
                return None
            state, verdict = status.state, status.verdict
            active_now = s.scalar(select(AdapterVersionRow.version)
                                  .where(AdapterVersionRow.status == "active")) or BASE_LABEL
            if active_now != state.active:
                return _end(s, status, "stopped", f"stopped: the active version changed from "
                            f"{state.active} to {active_now} during the canary")
            if verdict.decision == "promote":
                return _end(s, status, "promoted", verdict.reason)
            if verdict.decision == "rollback":
                return _end(s, status, "rolled back", verdict.reason)
            if status.now >= state.deadline or status.ratings >= state.config.max_ratings:
                why = (f"{state.config.time_limit_hours:g} h" if status.now >= state.deadline
                       else f"{status.ratings} ratings")
                return _end(s, status, "undecided",
                            f"not enough evidence after {why}: kept active {state.active} "
                            f"({verdict.reason})")
            return None

        return self.db.run(work)

    def end_by_hand(self, outcome: str, *, by: str | None = None,
                    now: datetime | None = None) -> dict[str, Any]:
        """``outcome`` "promoted" (serve the canary to everyone now), "stopped" (end it,
        keep the version as a candidate) or "rolled back" (end it, reject the version)."""
        if outcome not in ("promoted", "stopped", "rolled back"):
            raise InvalidInput("outcome must be promoted, stopped or rolled back")

        def work(s: Session) -> dict[str, Any]:
            _lock_activations(s)
            status = _status(s, now or _now())
            if status is None:
                raise Conflict("no canary is running")
            who = f" by {by}" if by else ""
            return _end(s, status, outcome, f"{outcome} by hand{who} ({status.verdict.reason})")

        return self.db.run(work)


def _current(s: Session) -> CanaryState | None:
    row = s.get(ServiceStateRow, CANARY_KEY)
    if row is None or not row.value:
        return None
    return CanaryState.from_dict(row.value)


def _status(s: Session, now: datetime) -> CanaryStatus | None:
    state = _current(s)
    if state is None:
        return None
    active, canary = arm_counts(s, state)
    return CanaryStatus(state, active, canary, decide(active, canary, state.config.rule()), now)


def arm_counts(s: Session, state: CanaryState) -> tuple[ArmCounts, ArmCounts]:
    """Signals per version over the replies of the canary's conversations: the latest
    thumb of each reply, whether it was edited, whether it was regenerated."""
    versions = (state.active, state.version)
    replies = dict(s.execute(
        select(MessageRow.id, MessageRow.adapter_version)
        .where(MessageRow.role == "assistant",
               MessageRow.conversation_id >= state.first_conversation_id,
               MessageRow.adapter_version.in_(versions),
               MessageRow.origin.in_(("generated", "regenerated")))).all())
    latest: dict[int, tuple[int, str]] = {}
    edited: set[int] = set()
    for event_id, reply_id, kind in s.execute(
            select(FeedbackEventRow.id, FeedbackEventRow.reply_id, FeedbackEventRow.kind)
            .where(FeedbackEventRow.conversation_id >= state.first_conversation_id,
                   FeedbackEventRow.kind.in_(("up", "down", "edit")))):
        if reply_id not in replies:
            continue
        if kind == "edit":
            edited.add(reply_id)
        elif reply_id not in latest or latest[reply_id][0] < event_id:
            latest[reply_id] = (event_id, kind)
    regenerated = {src for (src,) in s.execute(
        select(MessageRow.source_reply_id)
        .where(MessageRow.origin == "regenerated",
               MessageRow.conversation_id >= state.first_conversation_id))
        if src in replies}
    out = []
    for version in versions:
        mine = [r for r, v in replies.items() if v == version]
        up = sum(1 for r in mine if r in latest and latest[r][1] == "up")
        down = sum(1 for r in mine if r in latest and latest[r][1] == "down")
        fixed = {r for r in mine if r in edited or r in regenerated}
        bad = sum(1 for r in mine if r in fixed or (r in latest and latest[r][1] == "down"))
        good = sum(1 for r in mine if r not in fixed and r in latest and latest[r][1] == "up")
        out.append(ArmCounts(replies=len(mine), up=up, down=down,
                             edited=sum(r in edited for r in mine),
                             regenerated=sum(r in regenerated for r in mine), good=good, bad=bad))
    return out[0], out[1]


def _end(s: Session, status: CanaryStatus, outcome: str, reason: str) -> dict[str, Any]:
    """End the canary with ``outcome``; record it on the version and in the history."""
    state = status.state
    row = _version(s, state.version)
    if outcome == "promoted":
        history = _activation_history(s)
        history.append(state.version)
        _save_activation_history(s, history)
        _make_active(s, row, ())
    elif row.status == "canary":
        row.status = "rejected" if outcome == "rolled back" else "candidate"
    record = {**status.to_dict(), "outcome": outcome, "reason": reason,
              "ended_at": status.now.isoformat()}
    row.reasons = [*(row.reasons or []), f"canary {outcome}: {reason}"]
    row.metrics = {**(row.metrics or {}), "canary": record}
    put_state(s, CANARY_KEY, None)
    hist = s.get(ServiceStateRow, CANARY_HISTORY_KEY)
    ended = list(((hist.value or {}) if hist else {}).get("ended", []))
    put_state(s, CANARY_HISTORY_KEY, {"ended": (ended + [record])[-MAX_CANARY_HISTORY:]})
    s.flush()
    return record
