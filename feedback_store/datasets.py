"""Turn stored feedback into training rows in TRL's conversational formats.

KTO (unpaired):   {"prompt": [messages...], "completion": [{"role": "assistant", ...}], "label": bool}
DPO (preference): {"prompt": [messages...], "chosen": [{...}], "rejected": [{...}]}

The prompt is the list of messages before the reply (the conversation's system
prompt first, then the thread down to the user message the reply answers).

Conflict rules, applied when rows are built (events are never deleted):

* Votes: for each reply, each voter's latest up/down counts (a voter is the
  user id; anonymous votes on a reply count as one voter). The reply is desirable
  when up-votes outnumber down-votes, undesirable when down-votes do, and left out
  on a tie.
* Choices: for each unordered pair of sibling replies, each voter's latest choice
  counts; the pair goes the majority's way and is left out on a tie.
* Edits: every edit is a pair (the edit chosen, the original rejected).

Held-out split: by prompt, not by conversation. A row's prompt key is the last
user message of its prompt, normalised (:func:`normalise_prompt`: lower-cased,
punctuation and whitespace runs collapsed to one space). A key is in ``eval`` when a
salted hash of it falls below ``eval_fraction``, so every row whose prompt normalises
the same lands on the same side, however many conversations asked it: evaluation
never sees a prompt that training saw. The ``eval`` split is deduplicated: rows that
are identical after normalisation (same prompt key and same normalised reply or
replies, same label) are counted once, the first one kept.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .convert import utc
from .errors import InvalidInput
from .models import ConversationRow, FeedbackEventRow, MessageRow
from .store import FeedbackStore

SPLITS = ("train", "eval", "all")
SPLIT_SALT = "feedback-chat/heldout/v2"
DEFAULT_EVAL_FRACTION = 0.1


@dataclass(frozen=True)
class RowFilter:
    """Which events feed a dataset. Every field is optional."""

    since: datetime | None = None  # events created at or after (naive = UTC)
    after_event_id: int | None = None  # events with a larger id
    up_to_event_id: int | None = None  # events with this id or smaller (a round's snapshot)
    adapter_version: str | None = None  # replies written by this adapter version
    split: str = "all"
    eval_fraction: float = DEFAULT_EVAL_FRACTION

    def validate(self) -> None:
        problems = []
        if self.split not in SPLITS:
            problems.append(f"split must be one of {SPLITS}, not {self.split!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            problems.append("eval_fraction must be in [0, 1)")
        if self.since is not None and not isinstance(self.since, datetime):
            problems.append("since must be a datetime")
        for name in ("after_event_id", "up_to_event_id"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                problems.append(f"{name} must be a non-negative integer")
        if problems:
            raise InvalidInput("; ".join(problems))


_NON_WORD = re.compile(r"[\W_]+")


def normalise_prompt(text: str) -> str:
    """``text`` lower-cased with every run of punctuation and whitespace made one space,
    trimmed: ``"What's  the capital of France?!"`` -> ``"what s the capital of france"``."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def prompt_key(prompt: list[dict[str, str]]) -> str:
    """The split key of a conversational prompt: its last user message, normalised
    (all messages' text when it has no user message)."""
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return normalise_prompt(users[-1] if users else " ".join(m["content"] for m in prompt))


def split_of(prompt: str | list[dict[str, str]],
             eval_fraction: float = DEFAULT_EVAL_FRACTION) -> str:
    """``"eval"`` or ``"train"`` for a prompt: a user message's text or a whole
    conversational prompt (keyed by :func:`prompt_key`). Deterministic; texts that
    normalise the same share a side; a larger fraction only moves keys into eval."""
    key = prompt_key(prompt) if isinstance(prompt, list) else normalise_prompt(prompt)
    digest = hashlib.sha256(f"{SPLIT_SALT}:{key}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else "train"


def _select_split(rows: list[dict[str, Any]], flt: RowFilter,
                  replies: tuple[str, ...]) -> list[dict[str, Any]]:
    """The rows of ``flt.split``; eval rows deduplicated on (prompt key, the normalised
    ``replies`` fields, label)."""
    if flt.split == "all":
        return rows
    kept = [r for r in rows if split_of(r["prompt"], flt.eval_fraction) == flt.split]
    if flt.split == "train":
        return kept
    seen: set[tuple[Any, ...]] = set()
    unique = []
    for row in kept:
        key = (prompt_key(row["prompt"]), row.get("label"),
               *(normalise_prompt(row[f][-1]["content"]) for f in replies))
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def build_kto_rows(store: FeedbackStore, flt: RowFilter | None = None, *,
                   with_ids: bool = False, with_tags: bool = False,
                   edits_as_votes: bool = False) -> list[dict[str, Any]]:
    """Unpaired rows from thumbs. ``with_ids`` adds ``reply_id`` and ``conversation_id``;
    ``with_tags`` adds ``tags``: the reasons picked with the votes that count (sorted,
    each once; ``[]`` when none was picked).

    ``edits_as_votes``: an edit also counts as its author's down-vote on the reply they
    corrected, unless they voted on it: a vote of theirs, earlier or later, counts instead. Someone
    who rewrote a reply did not like it as it was; the training uses this so that a
    round with edits and no thumbs still learns what to avoid, not only what to copy.
    Exports keep thumbs only."""
    flt = flt or RowFilter()
    flt.validate()

    def work(s: Session) -> list[dict[str, Any]]:
        events = _events(s, flt, ("up", "down", "edit") if edits_as_votes else ("up", "down"))
        latest: dict[tuple[int, str], FeedbackEventRow] = {}
        for ev in events:  # ascending id: later votes replace earlier ones
            key = (ev.reply_id, ev.user_id or "")
            if ev.kind != "edit" or key not in latest:  # an edit never replaces a vote
                latest[key] = ev
        tally: dict[int, int] = defaultdict(int)
        reasons: dict[int, set[str]] = defaultdict(set)
        for (reply_id, _), ev in latest.items():
            tally[reply_id] += 1 if ev.kind == "up" else -1
            reasons[reply_id].update(ev.tags or ())
        threads = _Threads(s, {ev.conversation_id for ev in events})
        rows = []
        for reply_id in sorted(tally):
            if tally[reply_id] == 0:
                continue
            reply = threads.message(reply_id)
            row: dict[str, Any] = {
                "prompt": threads.prompt(reply),
                "completion": [{"role": "assistant", "content": reply.content}],
                "label": tally[reply_id] > 0,
            }
            if with_ids:
                row.update(reply_id=reply_id, conversation_id=reply.conversation_id)
            if with_tags:
                row["tags"] = sorted(reasons[reply_id])
            rows.append(row)
        return _select_split(rows, flt, ("completion",))

    return store.db.run(work, write=False)


def build_dpo_rows(store: FeedbackStore, flt: RowFilter | None = None, *,
                   with_ids: bool = False) -> list[dict[str, Any]]:
    """Preference rows from edits and sibling choices. ``with_ids`` adds
    ``chosen_id``, ``rejected_id`` and ``conversation_id``."""
    flt = flt or RowFilter()
    flt.validate()

    def work(s: Session) -> list[dict[str, Any]]:
        events = _events(s, flt, ("edit", "choice"))
        pairs: list[tuple[int, int, int]] = []  # (order key, chosen, rejected)
        latest_choice: dict[tuple[frozenset[int], str], FeedbackEventRow] = {}
        for ev in events:
            if ev.kind == "edit":
                pairs.append((ev.id, ev.other_reply_id, ev.reply_id))
            else:
                latest_choice[(frozenset((ev.reply_id, ev.other_reply_id)), ev.user_id or "")] = ev
        votes: dict[frozenset[int], dict[int, int]] = defaultdict(lambda: defaultdict(int))
        first_seen: dict[frozenset[int], int] = {}
        for (pair, _), ev in latest_choice.items():
            votes[pair][ev.reply_id] += 1
            first_seen[pair] = min(first_seen.get(pair, ev.id), ev.id)
        for pair, v in votes.items():
            a, b = sorted(pair)
            if v[a] != v[b]:
                chosen, rejected = (a, b) if v[a] > v[b] else (b, a)
                pairs.append((first_seen[pair], chosen, rejected))
        threads = _Threads(s, {ev.conversation_id for ev in events})
        rows = []
        for _, chosen_id, rejected_id in sorted(pairs):
            chosen, rejected = threads.message(chosen_id), threads.message(rejected_id)
            row: dict[str, Any] = {
                "prompt": threads.prompt(chosen),
                "chosen": [{"role": "assistant", "content": chosen.content}],
                "rejected": [{"role": "assistant", "content": rejected.content}],
            }
            if with_ids:
                row.update(chosen_id=chosen_id, rejected_id=rejected_id,
                           conversation_id=chosen.conversation_id)
            rows.append(row)
        return _select_split(rows, flt, ("chosen", "rejected"))

    return store.db.run(work, write=False)


def build_asked_prompts(store: FeedbackStore, *, split: str = "eval",
                        eval_fraction: float = DEFAULT_EVAL_FRACTION,
                        last_conversations: int = 5000,
                        up_to_event_id: int | None = None) -> list[list[dict[str, str]]]:
    """The distinct prompts (by :func:`prompt_key`) that the model answered, rated or not,
    in ``split``: each one the thread before an assistant reply, as in the training rows.

    A prompt of the ``eval`` split is never in a training row, so these are prompts a
    candidate never saw, also where nobody rated the reply. The newest
    ``last_conversations`` conversations are read. With ``up_to_event_id``, only the
    replies made by the time of that event (the newest event up to that id), as the
    rows of :class:`RowFilter` with the same bound: the prompts of a round, read again
    later, are the ones it had."""
    RowFilter(split=split, eval_fraction=eval_fraction, up_to_event_id=up_to_event_id).validate()

    def work(s: Session) -> list[list[dict[str, str]]]:
        conversations = select(ConversationRow.id)
        until = None
        if up_to_event_id is not None:
            until = s.scalar(select(func.max(FeedbackEventRow.created_at))
                             .where(FeedbackEventRow.id <= up_to_event_id))
            if until is None:
                return []
            conversations = conversations.where(ConversationRow.created_at <= until)
        ids = set(s.scalars(conversations.order_by(ConversationRow.id.desc())
                            .limit(last_conversations)))
        threads = _Threads(s, ids)
        found: dict[str, list[dict[str, str]]] = {}
        for _, reply in sorted(threads.messages.items()):
            if reply.role != "assistant" or (until is not None and reply.created_at > until):
                continue
            prompt = threads.prompt(reply)
            if not any(m["role"] == "user" for m in prompt):
                continue
            if split != "all" and split_of(prompt, eval_fraction) != split:
                continue
            found.setdefault(prompt_key(prompt), prompt)
        return list(found.values())

    return store.db.run(work, write=False)


def _events(s: Session, flt: RowFilter, kinds: tuple[str, ...]) -> list[FeedbackEventRow]:
    q = select(FeedbackEventRow).where(FeedbackEventRow.kind.in_(kinds))
    if flt.since is not None:
        q = q.where(FeedbackEventRow.created_at >= utc(flt.since, "since"))
    if flt.after_event_id is not None:
        q = q.where(FeedbackEventRow.id > flt.after_event_id)
    if flt.up_to_event_id is not None:
        q = q.where(FeedbackEventRow.id <= flt.up_to_event_id)
    if flt.adapter_version is not None:
        q = q.where(FeedbackEventRow.adapter_version == flt.adapter_version)
    return list(s.scalars(q.order_by(FeedbackEventRow.id)))


class _Threads:
    """The messages of a set of conversations, loaded once, to rebuild prompts."""

    def __init__(self, s: Session, conversation_ids: set[int]) -> None:
        self.messages: dict[int, MessageRow] = {}
        self.system: dict[int, str | None] = {}
        ids = sorted(conversation_ids)
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            for m in s.scalars(select(MessageRow).where(MessageRow.conversation_id.in_(chunk))):
                self.messages[m.id] = m
            for c in s.scalars(select(ConversationRow).where(ConversationRow.id.in_(chunk))):
                self.system[c.id] = c.system_prompt

    def message(self, message_id: int) -> MessageRow:
        return self.messages[message_id]

    def prompt(self, reply: MessageRow) -> list[dict[str, str]]:
        chain = []
        cur = self.messages.get(reply.parent_id) if reply.parent_id else None
        while cur is not None:
            chain.append({"role": cur.role, "content": cur.content})
            cur = self.messages.get(cur.parent_id) if cur.parent_id else None
        system = self.system.get(reply.conversation_id)
        if system and not (chain and chain[-1]["role"] == "system"):
            chain.append({"role": "system", "content": system})
        return chain[::-1]
