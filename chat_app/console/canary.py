"""The console's Canary tab: the running canary's figures, the rule, the time left, the
operator's promote / stop / roll back, and the ended canaries with their figures."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from feedback_store import StoreError
from feedback_store.canary import CanaryStatus

from .context import ActionResult, ConsoleContext
from .runs import md

COUNT_HEADERS = ["version", "role", "replies", "rated", "good share", "95% interval",
                 "thumbs up", "thumbs down", "edited", "regenerated"]
HISTORY_HEADERS = ["version", "outcome", "against", "ratings", "difference", "ended",
                   "reason"]
OUTCOMES = {"promote": "promoted", "stop": "stopped", "rollback": "rolled back"}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _when(iso: str | None) -> str:
    if not iso:
        return "-"
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M")


def _left(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min"


def canary_view(ctx: ConsoleContext) -> tuple[str, list[list[Any]], list[list[Any]]]:
    """(summary Markdown, per-version rows, ended-canary rows)."""
    try:
        status = ctx.store.canaries.check()
        ended = ctx.store.canaries.history()
    except StoreError as exc:
        return f"⚠️ The database is unavailable: {md(str(exc))}", [], []
    history = [[e["version"], e["outcome"], e["active"], e.get("ratings", 0),
                "-" if e.get("diff") is None else f"{e['diff']:+.3f}", _when(e.get("ended_at")),
                e.get("reason", "")] for e in ended]
    if status is None:
        return ("No canary is running. A version that passes the gate becomes the canary "
                "and serves a share of new conversations until live ratings decide."
                ), [], history
    return summary(status), rows(status), history


def summary(status: CanaryStatus) -> str:
    s, c = status.state, status.state.config
    margin = f"not worse by more than {c.margin:.0%}" if c.margin else "better"
    return (
        f"**Canary {md(s.version)}** serves {s.share:.0%} of new conversations (from "
        f"#{s.first_conversation_id}) against **{md(s.active)}**, since "
        f"{s.started_at:%Y-%m-%d %H:%M} UTC; **{_left(status.time_left.total_seconds())} "
        f"left**, {status.ratings} of at most {c.max_ratings} ratings.\n\n"
        f"Rule: a reply is good when its latest thumb is up and it was neither edited nor "
        f"regenerated. With at least {c.min_ratings} rated replies on each version, "
        f"promote when the {1 - c.error_rate:.0%} always-valid interval of the difference in "
        f"good share says the canary is {margin}; roll back when it says the canary is worse; "
        f"otherwise keep collecting until the limits, then keep {md(s.active)}.\n\n"
        f"Now: {md(status.verdict.reason)}")


def rows(status: CanaryStatus) -> list[list[Any]]:
    out = []
    for version, role, arm in ((status.state.active, "active", status.active),
                               (status.state.version, "canary", status.canary)):
        d = arm.to_dict()
        interval = ("-" if d["good_share_low"] is None
                    else f"{d['good_share_low']:.0%}–{d['good_share_high']:.0%}")
        out.append([version, role, arm.replies, arm.rated, _pct(arm.good_share), interval,
                    arm.up, arm.down, arm.edited, arm.regenerated])
    return out


def end_canary(ctx: ConsoleContext, action: str, *, by: str | None = None) -> ActionResult:
    """``action`` promote, stop or rollback the running canary."""
    outcome = OUTCOMES.get(action)
    if outcome is None:
        return ActionResult(False, f"Unknown canary action {action!r}.")
    try:
        ended = ctx.store.canaries.end_by_hand(outcome, by=by)
    except StoreError as exc:
        return ActionResult(False, f"Nothing done: {exc}")
    return ActionResult(True, f"Canary {ended['version']} {outcome}; servers follow within "
                              f"seconds.", version=ended["version"])
