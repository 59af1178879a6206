"""One browser's chat: which stored conversation it is, and the stored message at each position.

The page shows one *thread* of a conversation tree: the messages from the first user
message down to the newest reply, along the branch the user is on (a regenerate or an
edit adds a sibling reply and moves the thread onto it). ``ChatSession.thread[i]`` is the
stored message shown at chat position ``i``, so every like, edit or regenerate event,
which names a position, maps to a stored message id.

What the browser keeps (``BrowserMemory``) is small: its client key, the conversation id
and the id of the message the thread ends at. From these and the store the thread is
rebuilt after a reload (``restore_thread``).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from feedback_store import Message

CLIENT_KEY_BYTES = 16
STARTING = "starting"  # ChatSession.generation while a reply is being set up


def new_client_key() -> str:
    """A random key naming one browser (stored on the conversations it starts)."""
    return "b-" + secrets.token_urlsafe(CLIENT_KEY_BYTES)


@dataclass
class ChatSession:
    """The server-side state of one browser tab (kept by Gradio between events).

    ``pending_choice`` is ``(previous_reply_id, new_reply_id)`` after a regenerate, until
    the user says which one is better or moves on. ``generation`` is the reply being
    streamed now (the Stop button cancels it); ``epoch`` counts "New chat" presses, so a
    reply still streaming into a chat the user has left does not write into the new one.
    ``votes`` holds the thumbs shown per reply (the user's latest stored vote).
    """

    client_key: str = field(default_factory=new_client_key)
    user_id: str | None = None
    conversation_id: int | None = None
    system_prompt: str = ""
    thread: list[Message] = field(default_factory=list)
    votes: dict[int, str] = field(default_factory=dict)
    vote_tags: dict[int, tuple[str, ...]] = field(default_factory=dict)  # the latest reason
    pending_choice: tuple[int, int] | None = None
    selected: int | None = None
    generation: Any | None = None
    epoch: int = 0
    seen_update: str | None = None  # the version whose "updated with your feedback" was shown
    side_by_side: tuple[int, int] | None = None  # reply ids shown as A and B, awaiting a pick
    side_by_side_texts: tuple[str, str] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # votes of one tab are stored one at a time (the Chatbot can send one pick twice at once)
    vote_lock: threading.Lock = field(default_factory=threading.Lock, repr=False,
                                      compare=False)

    @property
    def started(self) -> bool:
        """True once the chat has a stored message (its system prompt is then fixed)."""
        return bool(self.thread)

    @property
    def generating(self) -> bool:
        """True from the moment a reply is asked for until it is stored."""
        return self.generation is not None

    def live(self) -> Any | None:
        """The reply (engine ``Generation``) streaming now, or None."""
        gen = self.generation
        return None if gen is None or isinstance(gen, str) else gen

    @property
    def head_id(self) -> int | None:
        return self.thread[-1].id if self.thread else None

    def reply_at(self, position: int) -> Message | None:
        """The stored reply shown at chat ``position``, or None if there is none."""
        if isinstance(position, bool) or not isinstance(position, int):
            return None
        if 0 <= position < len(self.thread) and self.thread[position].is_reply:
            return self.thread[position]
        return None

    def last_reply_position(self) -> int | None:
        for i in range(len(self.thread) - 1, -1, -1):
            if self.thread[i].is_reply:
                return i
        return None

    def model_messages(self, upto: int | None = None) -> list[dict[str, str]]:
        """The chat as the model reads it: the system prompt, then ``thread[:upto]``."""
        out = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        out += [{"role": m.role, "content": m.content} for m in self.thread[:upto]]
        return out

    def start_over(self, system_prompt: str) -> None:
        """Forget the current chat (it stays stored); the next message starts a new one."""
        self.epoch += 1
        self.generation = None
        self.conversation_id = None
        self.system_prompt = system_prompt
        self.thread = []
        self.votes = {}
        self.vote_tags = {}
        self.pending_choice = None
        self.selected = None
        self.side_by_side = self.side_by_side_texts = None

    def memory(self) -> dict[str, Any]:
        """What the browser keeps, to find this chat again after a reload."""
        return {
            "client_key": self.client_key,
            "conversation_id": self.conversation_id,
            "head_id": self.head_id,
            "seen_update": self.seen_update,
        }


def restore_thread(messages: Sequence[Message], head_id: int | None) -> list[Message]:
    """The thread to show for a conversation's ``messages`` (all branches, any order).

    It runs from the root down to ``head_id`` (the message the browser last showed), then
    on through the newest child at each step, so a reply stored after the browser last
    heard from the server (a reply cut short when the page closed) is shown too. With no
    usable ``head_id`` the thread ends at the conversation's newest message. System
    messages are not part of the thread.
    """
    by_id = {m.id: m for m in messages if m.role != "system"}
    if not by_id:
        return []
    children: dict[int | None, list[Message]] = {}
    for m in sorted(by_id.values(), key=lambda m: m.id):
        parent = m.parent_id if m.parent_id in by_id else None
        children.setdefault(parent, []).append(m)
    head = by_id.get(head_id) if head_id is not None else None
    if head is None:
        head = by_id[max(by_id)]
    chain: list[Message] = []
    cur: Message | None = head
    seen: set[int] = set()
    while cur is not None and cur.id not in seen:
        seen.add(cur.id)
        chain.append(cur)
        cur = by_id.get(cur.parent_id) if cur.parent_id is not None else None
    chain.reverse()
    while children.get(chain[-1].id):
        chain.append(children[chain[-1].id][-1])
    return chain
