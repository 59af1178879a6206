"""Training runs and adapter versions as the console shows them.

``run_view`` gives one run's status, live progress, curves, gate metrics with the
decision and its reasons, and the error of a failed run. ``versions_table`` lists the
adapter versions: lineage, data size, gate metrics and which one is active.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from feedback_store import NotFound, TrainingRun
from feedback_store.reports import VersionSummary, run_headlines, version_summaries

from .context import ConsoleContext
from .plots import curves_frame

FINAL = ("succeeded", "failed", "rejected")
# Gate metrics of the candidate, and the key of the active adapter's value where kept.
# The implicit-reward figures (pair_*, kto_separation) are for information; the gate
# decides on the scorer's verdict on sampled replies (score*), KL and degenerate share.
# Keys of older runs (canary_kl, n_pairs, n_thumbs) show when a run has them.
GATE_METRICS = [("pair_accuracy", "active/pair_accuracy"), ("pair_margin", "active/pair_margin"),
                ("score", "active/score"), ("score_diff", None), ("score_lower_bound", None),
                ("scorer_accuracy", None), ("scorer_thumb_accuracy", None),
                ("scorer_pair_accuracy", None), ("scorer_accuracy_lower_bound", None),
                ("kl", "active/kl"),
                ("degenerate_share", "active/degenerate_share"),
                ("kto_separation", "active/kto_separation"), ("canary_kl", None),
                ("heldout_thumbs", None), ("heldout_pairs", None), ("heldout_prompts", None),
                ("sampled_prompts", None), ("samples_per_prompt", None), ("n_pairs", None),
                ("n_thumbs", None), ("heldout_kto_rows", None), ("heldout_dpo_rows", None),
                ("train_seconds", None)]
VERSION_HEADERS = ["version", "status", "parent", "run", "created (UTC)", "data rows",
                   "pair accuracy", "score (active)", "KL", "reasons"]
DECISION_NOTES = {
    "promoted": "now serving",
    "held": "kept as a candidate: no evidence of improvement yet; an operator may promote it",
    "rejected": "not served",
}
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|>~])")


def md(text: str) -> str:
    """Plain text made safe inside Markdown: HTML escaped, Markdown marks backslashed."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))


def _when(dt: datetime | None) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if dt else "-"


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass(frozen=True)
class RunView:
    run: TrainingRun | None
    summary: str  # Markdown, every stored text escaped
    curves: pd.DataFrame
    gate: list[list[str]]  # metric, candidate, active
    error: str  # plain text ('' when none)

    @property
    def running(self) -> bool:
        return self.run is not None and self.run.status not in FINAL

    @property
    def fingerprint(self) -> tuple[Any, ...]:
        """Changes whenever what the page shows of the run changes."""
        r = self.run
        if r is None:
            return ()
        return (r.id, r.status, len(r.history), json.dumps(r.progress, sort_keys=True),
                r.decision, r.error)


def run_choices(ctx: ConsoleContext, limit: int = 30) -> list[tuple[str, int]]:
    """(label, run id) of the latest runs, newest first, for a dropdown."""
    return [(f"#{r.id} {r.status} ({r.trigger}, {_when(r.created_at)})", r.id)
            for r in run_headlines(ctx.store, limit=limit)]


def default_run_id(ctx: ConsoleContext) -> int | None:
    """The run in progress, else the newest run, else None."""
    cur = ctx.registry.current_run()
    if cur is not None:
        return cur.id
    latest = run_headlines(ctx.store, limit=1)
    return latest[0].id if latest else None


def _progress_line(r: TrainingRun) -> str:
    p = r.progress or {}
    phase = p.get("phase", "queued" if r.status == "queued" else "-")
    line = f"**Progress:** {md(str(phase))}"
    if isinstance(p.get("step"), int):
        total = p.get("total_steps")
        line += f", step {p['step']}" + (f" of {total}" if total else "")
        pct = f" ({100 * p['step'] / total:.0f}%)" if isinstance(total, int) and total else ""
        line += pct + f", loss {_num(p.get('loss'))}, reward margin {_num(p.get('reward_margin'))}"
    if r.status not in FINAL and r.heartbeat_at is not None:
        age = (datetime.now(UTC) - r.heartbeat_at).total_seconds()
        line += f"; last heartbeat {age:.0f} s ago"
    return line


def run_view(ctx: ConsoleContext, run_id: int | None) -> RunView:
    """The run ``run_id`` (None: the default run) for the Training tab."""
    run_id = run_id if run_id is not None else default_run_id(ctx)
    if run_id is None:
        return RunView(None, "No training run yet. Press **Retrain now** to start one.",
                       curves_frame([]), [], "")
    try:
        r = ctx.registry.get_run(int(run_id))
    except (NotFound, ValueError, TypeError):
        return RunView(None, f"There is no training run {md(str(run_id))}.", curves_frame([]),
                       [], "")
    lines = [f"### Run #{r.id}: {r.status}",
             f"**Trigger:** {md(r.trigger)}" + (f" by {md(r.requested_by)}" if r.requested_by
                                                else "")
             + f" · **created** {_when(r.created_at)} · **started** {_when(r.started_at)}"
             + f" · **finished** {_when(r.finished_at)}",
             _progress_line(r),
             f"**Training rows:** {r.kto_rows} KTO, {r.dpo_rows} DPO"
             + (f" (feedback up to event #{r.last_event_id})" if r.last_event_id else "")]
    if r.decision or r.candidate_version:
        note = DECISION_NOTES.get(r.decision or "")
        lines.append(f"**Gate decision:** {md(r.decision or 'pending')}"
                     + (f" ({md(note)})" if note else "")
                     + (f" · candidate **{md(r.candidate_version)}**" if r.candidate_version
                        else ""))
    if r.reasons:
        lines.append("**Reasons:**\n" + "\n".join(f"- {md(x)}" for x in r.reasons))
    if r.status == "failed":
        lines.append("**The run failed**; its error is below.")
    gate = [[name, _num(r.metrics.get(name)), _num(r.metrics.get(active)) if active else "-"]
            for name, active in GATE_METRICS if name in r.metrics]
    return RunView(r, "\n\n".join(lines), curves_frame(r.history), gate, r.error or "")


def _manifest_rows(path: str) -> int | None:
    try:
        rows = json.loads((Path(path) / "manifest.json").read_text()).get("rows") or {}
        return int(rows.get("kto", 0)) + int(rows.get("dpo", 0))
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def _version_row(s: VersionSummary) -> list[str]:
    v = s.version
    rows = s.data_rows if s.data_rows is not None else _manifest_rows(v.path)
    status = "★ active" if v.status == "active" else v.status
    return [v.version, status, v.parent_version or "base", str(v.run_id or "-"),
            _when(v.created_at), "-" if rows is None else str(rows),
            _num(v.metrics.get("pair_accuracy")), _score(v.metrics),
            _num(v.metrics.get("kl", v.metrics.get("canary_kl"))), "; ".join(v.reasons)]


def _score(metrics: dict[str, Any]) -> str:
    score = metrics.get("score")
    if score is None:
        return "-"
    return f"{_num(score)} ({_num(metrics.get('active/score'))})"


def versions_table(ctx: ConsoleContext) -> tuple[list[list[str]], list[str], str]:
    """(table rows newest first, version names for the promote picker, serving line)."""
    summaries = version_summaries(ctx.store)
    active = next((s.version.version for s in summaries if s.version.status == "active"), None)
    line = f"**Active in the registry:** {active or 'the base model (no adapter)'}"
    if ctx.engine is not None:
        try:
            line += f" · **this server serves:** {ctx.engine.active_version}"
        except Exception:  # an engine that is shutting down; the registry line still holds
            pass
    rows = [_version_row(s) for s in reversed(summaries)]
    return rows, [s.version.version for s in reversed(summaries)], line
