"""A whole conversation as an operator reviews it: every user turn with all its replies.

A conversation is a tree (``Message.parent_id``): a user turn's children are its
replies (the first generated one, regenerated siblings, users' edits), and a reply's
children are the user turns that continued from it. ``conversation_tree`` reads it
with the feedback on every reply; ``render_conversation`` draws it as HTML where all
stored text is escaped (a chat user's markup or script is shown, never run).

Layout: replies to a turn are listed under it, each marked with its origin, adapter
version and feedback. When one reply of a group was continued, the next turn follows
the group at the same level ("continued from reply #N"); when several were, each
branch is drawn indented under its reply.
"""

from __future__ import annotations

import html
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime

from feedback_store import Conversation, FeedbackEvent, FeedbackStore, Message
from feedback_store.reports import conversation_events

STYLE = """<style>
.fc-conv{font-size:14px;line-height:1.4}
.fc-meta{color:#555;margin-bottom:6px}
.fc-turn{margin:8px 0}
.fc-user,.fc-system{background:#eef3ff;border-radius:6px;padding:6px 8px}
.fc-system{background:#f3f3f3}
.fc-replies{margin-left:18px}
.fc-reply{border-left:3px solid #ccc;padding:4px 8px;margin:6px 0}
.fc-reply.fc-highlight{border-left-color:#e08a00;background:#fff7e6}
.fc-head{font-size:12px;color:#444}
.fc-text{white-space:pre-wrap;word-break:break-word;margin:2px 0}
.fc-feedback{margin:2px 0 2px 18px;padding:0;font-size:12px}
.fc-branch{margin-left:18px;border-left:1px dashed #bbb;padding-left:8px}
.fc-note{font-size:12px;color:#666}
</style>"""


@dataclass(frozen=True)
class ReplyNode:
    message: Message
    feedback: tuple[str, ...]  # one readable line per feedback event about this reply
    followups: tuple[TurnNode, ...]


@dataclass(frozen=True)
class TurnNode:
    message: Message  # a user (or system) message
    replies: tuple[ReplyNode, ...]


@dataclass(frozen=True)
class ConversationTree:
    conversation: Conversation
    roots: tuple[TurnNode, ...]
    n_messages: int
    n_events: int


def _when(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def feedback_line(ev: FeedbackEvent, reply_id: int) -> str:
    """What ``ev`` says about reply ``reply_id``, in words (plain text)."""
    who = ev.user_id or "anonymous"
    if ev.kind in ("up", "down"):
        line = f"{'thumbs up' if ev.kind == 'up' else 'thumbs down'} by {who}"
    elif ev.kind == "comment":
        line = f"comment by {who}"
    elif ev.kind == "edit":
        line = (f"edited by {who} into reply #{ev.other_reply_id}" if ev.reply_id == reply_id
                else f"{who}'s edit of reply #{ev.reply_id}")
    elif ev.kind == "choice":
        line = (f"chosen by {who} over reply #{ev.other_reply_id}" if ev.reply_id == reply_id
                else f"not chosen: {who} chose reply #{ev.reply_id} over this one")
    else:
        line = f"{ev.kind} by {who}"
    line += f" (event #{ev.id}, {_when(ev.created_at)})"
    if ev.comment:
        line += f": “{ev.comment}”"
    if ev.tags:
        line += f" [tags: {', '.join(ev.tags)}]"
    return line


def conversation_tree(store: FeedbackStore, conversation_id: int) -> ConversationTree:
    """Read a conversation and its feedback (three queries) into a tree."""
    conv = store.get_conversation(conversation_id)
    messages = store.messages(conversation_id)
    events = conversation_events(store, conversation_id)
    children: dict[int | None, list[Message]] = defaultdict(list)
    for m in messages:
        children[m.parent_id].append(m)
    about: dict[int, list[FeedbackEvent]] = defaultdict(list)
    for ev in events:
        about[ev.reply_id].append(ev)
        if ev.other_reply_id is not None:
            about[ev.other_reply_id].append(ev)

    # Children always have larger ids than their parents: build the nodes newest first,
    # so every child exists before its parent (no recursion, however long the chat).
    replies: dict[int, ReplyNode] = {}
    turns: dict[int, TurnNode] = {}
    for m in sorted(messages, key=lambda m: m.id, reverse=True):
        kids = children[m.id]
        if m.is_reply:
            replies[m.id] = ReplyNode(m, tuple(feedback_line(ev, m.id) for ev in about[m.id]),
                                      tuple(turns[k.id] for k in kids if k.id in turns))
        else:
            turns[m.id] = TurnNode(m, tuple(replies[k.id] for k in kids if k.id in replies))
    roots = tuple(turns[m.id] for m in children[None] if m.id in turns)
    return ConversationTree(conv, roots, len(messages), len(events))


def origin_label(m: Message) -> str:
    origin = m.origin or "generated"
    if origin == "regenerated" and m.source_reply_id:
        return f"regenerated (in place of #{m.source_reply_id})"
    if origin == "edit" and m.source_reply_id:
        return f"edit (of #{m.source_reply_id}{' by ' + m.user_id if m.user_id else ''})"
    return origin


def _text(s: str) -> str:
    return f'<div class="fc-text">{html.escape(s) if s else "<i>(empty)</i>"}</div>'


def _render_reply(node: ReplyNode, highlight: set[int], out: list[str], nest: bool) -> None:
    m = node.message
    cls = "fc-reply fc-highlight" if m.id in highlight else "fc-reply"
    head = [f"<b>Reply #{m.id}</b>", html.escape(origin_label(m)),
            f"version {html.escape(m.adapter_version or '-')}", _when(m.created_at)]
    if m.finish_reason:
        head.append(f"finish: {html.escape(m.finish_reason)}")
    out.append(f'<div class="{cls}" id="fc-reply-{m.id}"><div class="fc-head">'
               + " · ".join(head) + "</div>" + _text(m.content))
    if node.feedback:
        out.append('<ul class="fc-feedback">' + "".join(
            f"<li>{html.escape(line)}</li>" for line in node.feedback) + "</ul>")
    else:
        out.append('<div class="fc-note">no feedback</div>')
    if nest and node.followups:
        out.append('<div class="fc-branch">')
        for t in node.followups:
            _render_turn(t, highlight, out)
        out.append("</div>")
    out.append("</div>")


def _render_turn(node: TurnNode, highlight: set[int], out: list[str]) -> None:
    """Draw ``node`` and, in a loop, the turns that continue it along a single branch."""
    current: TurnNode | None = node
    while current is not None:
        m = current.message
        who = html.escape(m.user_id) if m.user_id else "user"
        kind = "system" if m.role == "system" else "user"
        label = "System" if kind == "system" else f"User ({who})"
        out.append(f'<div class="fc-turn"><div class="fc-{kind}"><div class="fc-head">'
                   f"<b>{label}</b> #{m.id} · {_when(m.created_at)}</div>"
                   + _text(m.content) + "</div>")
        continued = [r for r in current.replies if r.followups]
        nest = len(continued) > 1
        out.append('<div class="fc-replies">')
        if not current.replies:
            out.append('<div class="fc-note">no reply</div>')
        for r in current.replies:
            _render_reply(r, highlight, out, nest)
        out.append("</div></div>")
        current = None
        if not nest and continued:
            out.append('<div class="fc-note">↳ continued from reply '
                       f"#{continued[0].message.id}</div>")
            *others, current = continued[0].followups  # several: the user went back and on
            for t in others:
                _render_turn(t, highlight, out)


def render_conversation(tree: ConversationTree, *, highlight: set[int] | None = None) -> str:
    """The tree as escaped HTML; replies whose ids are in ``highlight`` are marked."""
    c = tree.conversation
    out = [STYLE, '<div class="fc-conv">',
           f'<div class="fc-meta"><b>Conversation #{c.id}</b> · user '
           f'{html.escape(c.user_id or "anonymous")} · source {html.escape(c.source)} · started '
           f'{_when(c.created_at)} · {tree.n_messages} messages · {tree.n_events} feedback '
           "events</div>"]
    if c.deleted_at is not None:
        out.append(f'<div class="fc-system"><b>Deleted</b> {_when(c.deleted_at)} by '
                   f'{html.escape(c.deleted_by or "unknown")}: its messages and feedback are '
                   "gone from views, training and exports.</div>")
    if c.system_prompt:
        out.append('<div class="fc-system"><div class="fc-head"><b>System prompt</b></div>'
                   + _text(c.system_prompt) + "</div>")
    for root in tree.roots:
        _render_turn(root, highlight or set(), out)
    out.append("</div>")
    return "".join(out)
