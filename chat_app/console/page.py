"""The operator console: a ``gr.Blocks`` of five tabs over ``ConsoleContext`` handlers.

Feedback (filtered, keyset-paged log; a row opens its whole conversation; export of the
view as KTO/DPO JSONL), Training (retrain now, live run status and curves refreshed
by a 2 s timer, gate metrics and reasons, errors, the schedule), Adapters (lineage,
data size, gate metrics; promote and roll back), Canary (the version on trial with a
share of live chats: its figures per version, the rule and its verdict, the time left,
refreshed by the timer; promote, stop or roll back by hand; ended canaries) and
Overview (feedback volume per day or hour by kind; thumbs-up rate per adapter version).

Every event is private to the page (``api_visibility="private"``): the console has
no documented API, and ``mount_console`` puts the whole page behind the operator
login. Stored text reaches the page only as escaped HTML, escaped Markdown or plain
table cells.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr
import pandas as pd

from feedback_store import StoreError
from feedback_store.records import EVENT_KINDS
from feedback_store.reports import feedback_facets

from . import actions, plots, queries, runs
from . import canary as canary_tab
from .context import ConsoleContext, ConsoleError, context_from_services
from .conversation import conversation_tree, render_conversation

TIMER_SECONDS = 2.0
VERSION_COLUMN_WIDTHS = ["7%", "8%", "7%", "5%", "13%", "7%", "8%", "8%", "7%", "30%"]
LOG_COLUMN_WIDTHS = ["6%", "11%", "6%", "8%", "7%", "19%", "23%", "14%", "6%"]
PRIVATE: dict[str, Any] = {"api_visibility": "private", "show_progress": "hidden"}


def _frame(rows: list[list[Any]], headers: list[str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=headers)


def _plot(kind: type[gr.LinePlot] | type[gr.BarPlot], frame: pd.DataFrame, color: str) -> Any:
    """A plot update naming its colour values: Gradio fixes a plot's colour domain when it
    first draws, so a value that appears later (a DPO phase after KTO, a new kind) is
    drawn only if the legend's values change with it."""
    return kind(frame, colors_in_legend=list(dict.fromkeys(frame[color])))


def _problem(exc: Exception) -> str:
    text = "; ".join(exc.problems) if isinstance(exc, ConsoleError) else str(exc)
    gr.Warning(text)
    return f"⚠️ {runs.md(text)}"


def _user(request: gr.Request | None) -> str | None:
    name = getattr(request, "username", None) if request is not None else None
    return name if isinstance(name, str) and name else None


def build_console(
    *,
    services: Any | None = None,
    context: ConsoleContext | None = None,
    retrain_settings: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
) -> gr.Blocks:
    """Build the console over the served app's ``services`` (or a ready ``context``).

    ``retrain_settings`` overrides what "retrain now" passes to ``retrain.start_round``
    (default: the settings of ``feedback-chat retrain``). Mount it with
    ``mount_console``, which adds the operator login and the export folder.
    """
    if context is None:
        if services is None:
            raise TypeError("build_console needs services or a context")
        context = context_from_services(services, retrain_settings=retrain_settings)
    ctx = context
    with gr.Blocks(title="feedback-chat operator console", analytics_enabled=False) as console:
        gr.Markdown("## feedback-chat · operator console")
        who = gr.Markdown(elem_id="console-who")
        with gr.Tabs():
            with gr.Tab("Feedback", id="feedback"):
                feedback = _feedback_tab(ctx)
            with gr.Tab("Training", id="training"):
                training = _training_tab(ctx)
            with gr.Tab("Adapters", id="adapters"):
                adapters = _adapters_tab(ctx)
            with gr.Tab("Canary", id="canary"):
                canary = _canary_tab(ctx)
            with gr.Tab("Overview", id="overview"):
                overview = _overview_tab(ctx)

        def on_load(request: gr.Request) -> str:
            return f"Signed in as **{runs.md(_user(request) or 'operator')}**."

        console.load(on_load, None, who, **PRIVATE)
        for loader in (feedback, training, adapters, canary, overview):
            console.load(loader[0], loader[1], loader[2], **PRIVATE)
    console.console_context = ctx  # type: ignore[attr-defined]  # read by mount_console
    return console


Loader = tuple[Callable[..., Any], list[Any], list[Any]]


def _feedback_tab(ctx: ConsoleContext) -> Loader:
    with gr.Row():
        kinds = gr.CheckboxGroup(list(EVENT_KINDS), label="Kinds (none: all)", elem_id="f-kinds")
        since = gr.Textbox(label="Since (UTC)", placeholder="2026-11-21 or 2026-11-21 14:00",
                           elem_id="f-since")
        until = gr.Textbox(label="Until (UTC; a bare date includes that day)", elem_id="f-until")
    with gr.Row():
        version = gr.Dropdown(label="Adapter version", choices=[("any", "")], value="",
                              allow_custom_value=True, elem_id="f-version")
        user = gr.Textbox(label="User", elem_id="f-user")
        search = gr.Textbox(label="Text search (reply, prompt, comment, reason)",
                            elem_id="f-search")
        apply_btn = gr.Button("Apply filters", variant="primary", elem_id="f-apply")
    notice = gr.Markdown(elem_id="log-notice")
    table = gr.Dataframe(_frame([], queries.TABLE_HEADERS), interactive=False, wrap=True,
                         max_height=560, elem_id="log-table", label="Feedback events",
                         column_widths=LOG_COLUMN_WIDTHS)
    with gr.Row():
        first_btn = gr.Button("« Newest", size="sm", elem_id="log-first")
        newer_btn = gr.Button("← Newer", size="sm", elem_id="log-newer")
        older_btn = gr.Button("Older →", size="sm", elem_id="log-older")
    with gr.Row(equal_height=True):
        conv_id = gr.Number(None, label="Conversation id (or click a row)", precision=0,
                            elem_id="conv-id")
        open_btn = gr.Button("Open conversation", size="sm", elem_id="open-conv")
        delete_btn = gr.Button("Delete conversation", size="sm", variant="stop",
                               elem_id="delete-conv")
    with gr.Row(equal_height=True):
        forget_user = gr.Textbox(label="Forget a user: every conversation and rating of",
                                 placeholder="user name", elem_id="forget-user", max_lines=1)
        forget_btn = gr.Button("Forget this user", size="sm", variant="stop",
                               elem_id="forget-user-btn")
    with gr.Row(visible=False, elem_id="confirm-erase") as confirm_row:
        confirm_text = gr.Markdown(elem_id="confirm-erase-text")
        confirm_yes = gr.Button("Yes, delete for good", size="sm", variant="stop",
                                elem_id="confirm-erase-yes")
        confirm_no = gr.Button("Cancel", size="sm", elem_id="confirm-erase-no")
    erase_state = gr.State(None)
    erase_note = gr.Markdown(elem_id="erase-note")
    conversation = gr.HTML(elem_id="conversation")
    with gr.Accordion("Export the filtered view (JSONL, as `feedback-chat export`)", open=True):
        with gr.Row(equal_height=True):
            kind = gr.Radio(["kto", "dpo"], value="kto", label="Format", elem_id="export-kind")
            export_btn = gr.Button("Export", elem_id="export")
        export_note = gr.Markdown(elem_id="export-note")
        export_file = gr.File(label="Download", interactive=False, visible=False,
                              elem_id="export-file")
    # Exports are written straight into the private export folder, which mount_console
    # lets only this (logged-in) page serve: Gradio copies nothing to its shared cache.
    export_file.GRADIO_CACHE = str(ctx.export_dir)
    view_state = gr.State(None)
    filters = [kinds, since, until, version, user, search]
    shown = [view_state, table, notice]

    def show(view: queries.LogView) -> tuple[Any, ...]:
        return view, _frame(view.table, queries.TABLE_HEADERS), runs.md(view.describe())

    def on_apply(k: list[str], s: str, u: str, v: str, usr: str, q: str) -> tuple[Any, ...]:
        try:
            return show(queries.open_log(ctx, queries.parse_filter(k, s, u, v, usr, q)))
        except (ConsoleError, StoreError) as exc:
            return gr.skip(), gr.skip(), _problem(exc)

    def paging(step: Callable[[ConsoleContext, queries.LogView], queries.LogView]
               ) -> Callable[[Any], tuple[Any, ...]]:
        def run(view: Any) -> tuple[Any, ...]:
            if not isinstance(view, queries.LogView):
                return on_apply([], "", "", "", "", "")
            try:
                return show(step(ctx, view))
            except StoreError as exc:
                return gr.skip(), gr.skip(), _problem(exc)
        return run

    def open_conversation(cid: Any, highlight: set[int] | None = None) -> str:
        try:
            tree = conversation_tree(ctx.store, int(cid))
        except (TypeError, ValueError):
            return "<p>Type a conversation id or click a row of the table.</p>"
        except StoreError as exc:
            return f"<p>⚠️ {runs.md(str(exc))}</p>"
        return render_conversation(tree, highlight=highlight)

    def on_select(view: Any, evt: gr.SelectData) -> tuple[Any, str]:
        row = evt.row_value or []
        if not isinstance(view, queries.LogView) or not row:
            return gr.skip(), "<p>Select a row of the table.</p>"
        event_id = int(row[0])
        found = [r for r in view.rows if r.event.id == event_id]
        if not found:
            return gr.skip(), "<p>That row is no longer on this page.</p>"
        ev = found[0].event
        marks = {ev.reply_id} | ({ev.other_reply_id} if ev.other_reply_id else set())
        return ev.conversation_id, open_conversation(ev.conversation_id, marks)

    def on_export(view: Any, fmt: str) -> tuple[str, Any]:
        flt = view.flt if isinstance(view, queries.LogView) else queries.LogFilter()
        try:
            result = queries.export_view(ctx, flt, fmt)
        except (ConsoleError, StoreError) as exc:
            return _problem(exc), gr.File(value=None, visible=False)
        return runs.md(result.describe()), gr.File(value=str(result.path), visible=True)

    def ask_erase(what: str, target: Any) -> tuple[Any, ...]:
        """First step of a deletion: say exactly what would go, and wait for a yes."""
        if what == "conversation":
            try:
                cid = int(target)
            except (TypeError, ValueError):
                return None, gr.Row(visible=False), "", "⚠️ Type or click a conversation id."
            return (("conversation", cid), gr.Row(visible=True),
                    f"Delete conversation {cid}: its messages and feedback, from training and "
                    "exports too? A record of the deletion stays.", "")
        name = target.strip() if isinstance(target, str) else ""
        if not name:
            return None, gr.Row(visible=False), "", "⚠️ Type the user's name."
        return (("user", name), gr.Row(visible=True),
                f"Delete every conversation of **{runs.md(name)}** and every rating they gave, "
                "from training and exports too? A record of each deletion stays.", "")

    def do_erase(pending: Any, request: gr.Request) -> tuple[Any, ...]:
        hidden = (None, gr.Row(visible=False), "")
        if not pending:
            return (*hidden, "⚠️ Nothing to delete.", gr.skip())
        what, target = pending
        by = _user(request) or "operator"
        try:
            if what == "conversation":
                done = ctx.store.delete_conversation(target, by=by)
                note = (f"Deleted conversation {target}: {done['messages']} messages and "
                        f"{done['events']} feedback events.")
                return (*hidden, note, open_conversation(target))
            done = ctx.store.forget_user(target, by=by)
        except StoreError as exc:
            return (*hidden, _problem(exc), gr.skip())
        return (*hidden, f"Forgot {runs.md(target)}: {done['conversations']} conversations, "
                         f"{done['messages']} messages and {done['events']} feedback events "
                         "deleted.", gr.skip())

    erase_out = [erase_state, confirm_row, confirm_text, erase_note]
    delete_btn.click(lambda cid: ask_erase("conversation", cid), [conv_id], erase_out,
                     **PRIVATE)
    forget_btn.click(lambda name: ask_erase("user", name), [forget_user], erase_out, **PRIVATE)
    confirm_no.click(lambda: (None, gr.Row(visible=False), "", "Nothing was deleted."), None,
                     erase_out, **PRIVATE)
    confirm_yes.click(do_erase, [erase_state], [*erase_out, conversation], **PRIVATE)
    apply_btn.click(on_apply, filters, shown, **PRIVATE)
    search.submit(on_apply, filters, shown, **PRIVATE)
    first_btn.click(on_apply, filters, shown, **PRIVATE)
    older_btn.click(paging(queries.older_page), [view_state], shown, **PRIVATE)
    newer_btn.click(paging(queries.newer_page), [view_state], shown, **PRIVATE)
    table.select(on_select, [view_state], [conv_id, conversation], **PRIVATE)
    open_btn.click(lambda cid: open_conversation(cid), [conv_id], [conversation], **PRIVATE)
    export_btn.click(on_export, [view_state, kind], [export_note, export_file], **PRIVATE)

    def on_load() -> tuple[Any, ...]:
        facets = feedback_facets(ctx.store)
        choices = [("any", "")] + [(v, v) for v in facets.adapter_versions]
        return (gr.Dropdown(choices=choices, value=""),
                *on_apply([], "", "", "", "", ""))

    return on_load, [], [version, *shown]


def _training_tab(ctx: ConsoleContext) -> Loader:
    with gr.Row(equal_height=True):
        retrain_btn = gr.Button("Retrain now", variant="primary", elem_id="retrain-now")
        run_pick = gr.Dropdown(label="Training run", choices=[], elem_id="run-pick", scale=3)
        refresh_btn = gr.Button("Refresh", size="sm", elem_id="run-refresh")
    notice = gr.Markdown(elem_id="train-notice")
    summary = gr.Markdown(elem_id="run-summary")
    with gr.Row():
        loss_plot = gr.LinePlot(plots.curves_frame([]), x="step", y="loss", color="phase",
                                title="Loss", elem_id="loss-plot", height=260)
        margin_plot = gr.LinePlot(plots.curves_frame([]), x="step", y="reward_margin",
                                  color="phase", title="Reward margin (chosen - rejected)",
                                  elem_id="margin-plot", height=260)
    gate = gr.Dataframe(_frame([], ["metric", "candidate", "active"]), interactive=False,
                        label="Gate metrics (sampled replies on held-out prompts, held-out feedback)",
                        elem_id="gate-table")
    error = gr.Textbox(label="Error", lines=8, interactive=False, visible=False,
                       elem_id="run-error")
    gr.Markdown("### Retraining schedule")
    schedule = gr.Markdown(elem_id="schedule")
    with gr.Row(equal_height=True):
        interval = gr.Number(label="Interval (minutes)", elem_id="s-interval")
        minimum = gr.Number(label="Minimum new feedback", precision=0, elem_id="s-min")
        paused = gr.Checkbox(label="Paused", elem_id="s-paused")
        save_btn = gr.Button("Save schedule", elem_id="s-save")
    timer = gr.Timer(TIMER_SECONDS)
    shown_fp = gr.State(None)
    run_outputs = [run_pick, summary, loss_plot, margin_plot, gate, error, shown_fp]

    def show_run(run_id: Any) -> tuple[Any, ...]:
        view = runs.run_view(ctx, run_id if run_id not in (None, "") else None)
        choices = runs.run_choices(ctx)
        fp = (view.fingerprint, tuple(choices[:1]))
        curves = _plot(gr.LinePlot, view.curves, "phase")
        return (gr.Dropdown(choices=choices, value=view.run.id if view.run else None),
                view.summary, curves, curves,
                _frame(view.gate, ["metric", "candidate", "active"]),
                gr.Textbox(value=view.error, visible=bool(view.error)), fp)

    def on_tick(run_id: Any, fp: Any) -> tuple[Any, ...]:
        try:
            out = show_run(run_id)
            if out[-1] == fp:  # nothing changed: leave the page (and its plots) alone
                return tuple(gr.skip() for _ in range(len(run_outputs) + 1))
            return (*out, actions.schedule_view(ctx).describe())
        except StoreError:  # the next tick tries again
            return tuple(gr.skip() for _ in range(len(run_outputs) + 1))

    def on_retrain(request: gr.Request) -> tuple[Any, ...]:
        result = actions.retrain_now(ctx, requested_by=_user(request))
        mark = "✓" if result.ok else "⚠️"
        if not result.ok:
            gr.Warning(result.message)
        return (f"{mark} {runs.md(result.message)}", *show_run(result.run_id))

    def show_schedule(view: actions.ScheduleView) -> tuple[Any, ...]:
        return view.describe(), view.interval_minutes, view.min_feedback, view.paused

    def on_save(i: Any, m: Any, p: bool) -> tuple[Any, ...]:
        try:
            view = actions.update_schedule(ctx, interval_minutes=i, min_feedback=m, paused=p)
        except (ConsoleError, StoreError) as exc:
            return (_problem(exc), gr.skip(), gr.skip(), gr.skip())
        return ("✓ Schedule saved.\n\n" + view.describe(), *show_schedule(view)[1:])

    retrain_btn.click(on_retrain, None, [notice, *run_outputs], **PRIVATE)
    run_pick.input(show_run, [run_pick], run_outputs, **PRIVATE)
    refresh_btn.click(show_run, [run_pick], run_outputs, **PRIVATE)
    timer.tick(on_tick, [run_pick, shown_fp], [*run_outputs, schedule], **PRIVATE)
    save_btn.click(on_save, [interval, minimum, paused], [schedule, interval, minimum, paused],
                   **PRIVATE)

    def on_load() -> tuple[Any, ...]:
        return (*show_run(None), *show_schedule(actions.schedule_view(ctx)))

    return on_load, [], [*run_outputs, schedule, interval, minimum, paused]


def _adapters_tab(ctx: ConsoleContext) -> Loader:
    serving = gr.Markdown(elem_id="serving")
    table = gr.Dataframe(_frame([], runs.VERSION_HEADERS), interactive=False, wrap=True,
                         label="Adapter versions (newest first)", elem_id="versions-table",
                         column_widths=VERSION_COLUMN_WIDTHS)
    with gr.Row(equal_height=True):
        pick = gr.Dropdown(label="Version", choices=[], elem_id="version-pick")
        promote_btn = gr.Button("Promote", variant="primary", elem_id="promote")
        rollback_btn = gr.Button("Roll back", variant="stop", elem_id="rollback")
        refresh_btn = gr.Button("Refresh", size="sm", elem_id="versions-refresh")
    notice = gr.Markdown(elem_id="adapters-notice")
    outputs = [serving, table, pick]

    def show() -> tuple[Any, ...]:
        rows, names, line = runs.versions_table(ctx)
        return line, _frame(rows, runs.VERSION_HEADERS), gr.Dropdown(choices=names)

    def report(result: Any) -> tuple[Any, ...]:
        if not result.ok:
            gr.Warning(result.message)
        return (f"{'✓' if result.ok else '⚠️'} {runs.md(result.message)}", *show())

    # Gradio passes the request only to a handler whose own signature asks for it.
    def on_promote(version: str, request: gr.Request) -> tuple[Any, ...]:
        return report(actions.promote(ctx, version, by=_user(request)))

    def on_rollback() -> tuple[Any, ...]:
        return report(actions.rollback(ctx))

    promote_btn.click(on_promote, [pick], [notice, *outputs], **PRIVATE)
    rollback_btn.click(on_rollback, None, [notice, *outputs], **PRIVATE)
    refresh_btn.click(show, None, outputs, **PRIVATE)
    return show, [], outputs


def _canary_tab(ctx: ConsoleContext) -> Loader:
    summary = gr.Markdown(elem_id="canary-summary")
    counts = gr.Dataframe(_frame([], canary_tab.COUNT_HEADERS), interactive=False,
                          label="Per version, over the canary's conversations",
                          elem_id="canary-counts")
    with gr.Row(equal_height=True):
        promote_btn = gr.Button("Promote now", variant="primary", elem_id="canary-promote")
        stop_btn = gr.Button("Stop (keep as candidate)", elem_id="canary-stop")
        rollback_btn = gr.Button("Roll back (reject)", variant="stop", elem_id="canary-rollback")
        refresh_btn = gr.Button("Refresh", size="sm", elem_id="canary-refresh")
    notice = gr.Markdown(elem_id="canary-notice")
    history = gr.Dataframe(_frame([], canary_tab.HISTORY_HEADERS), interactive=False,
                           wrap=True, label="Ended canaries (newest first)",
                           elem_id="canary-history")
    timer = gr.Timer(TIMER_SECONDS * 5)
    outputs = [summary, counts, history]

    def show() -> tuple[Any, ...]:
        text, rows, ended = canary_tab.canary_view(ctx)
        return (text, _frame(rows, canary_tab.COUNT_HEADERS),
                _frame(ended, canary_tab.HISTORY_HEADERS))

    def act(action: str) -> Callable[..., tuple[Any, ...]]:
        # Gradio passes the request only to a handler whose own signature asks for it.
        def handler(request: gr.Request) -> tuple[Any, ...]:
            result = canary_tab.end_canary(ctx, action, by=_user(request))
            if not result.ok:
                gr.Warning(result.message)
            return (f"{'✓' if result.ok else '⚠️'} {runs.md(result.message)}", *show())

        return handler

    for button, action in ((promote_btn, "promote"), (stop_btn, "stop"),
                           (rollback_btn, "rollback")):
        button.click(act(action), None, [notice, *outputs], **PRIVATE)
    refresh_btn.click(show, None, outputs, **PRIVATE)
    timer.tick(show, None, outputs, **PRIVATE)
    return show, [], outputs


def _overview_tab(ctx: ConsoleContext) -> Loader:
    with gr.Row(equal_height=True):
        bucket = gr.Radio(["day", "hour"], value="day", label="Per", elem_id="o-bucket")
        days = gr.Number(value=30, label="Last days", elem_id="o-days")
        refresh_btn = gr.Button("Refresh", size="sm", elem_id="o-refresh")
    notice = gr.Markdown(elem_id="overview-notice")
    volume_plot = gr.BarPlot(plots.volume_frame([], "day"), x="bucket", y="events", color="kind",
                             title="Feedback volume by kind", elem_id="volume-plot", height=280)
    volume = gr.Dataframe(_frame([], plots.VOLUME_COLUMNS), interactive=False,
                          label="Feedback volume", elem_id="volume-table", max_height=260)
    thumbs_plot = gr.BarPlot(plots.thumbs_frame([]), x="label", y="up_rate", y_lim=[0, 1],
                             title="Thumbs-up rate per adapter version (n = ratings)",
                             elem_id="thumbs-plot", height=280)
    thumbs = gr.Dataframe(_frame([], plots.THUMBS_COLUMNS), interactive=False,
                          label="Thumbs per adapter version (each voter's latest vote per reply)",
                          elem_id="thumbs-table")
    outputs = [notice, volume_plot, volume, thumbs_plot, thumbs]

    def show(b: str, d: Any) -> tuple[Any, ...]:
        try:
            vol, th = plots.overview(ctx, bucket=b, days=d)
        except (ConsoleError, StoreError) as exc:
            return (_problem(exc), *(gr.skip() for _ in outputs[1:]))
        return "", _plot(gr.BarPlot, vol, "kind"), vol, th, th

    refresh_btn.click(show, [bucket, days], outputs, **PRIVATE)
    bucket.change(show, [bucket, days], outputs, **PRIVATE)
    return show, [bucket, days], outputs
