"""Frozen records that cross the store's boundary (ORM objects never leave it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

ROLES = ("system", "user", "assistant")
RATINGS = ("up", "down")
EVENT_KINDS = ("up", "down", "comment", "edit", "choice")
REPLY_ORIGINS = ("generated", "regenerated", "edit", "client")  # client: history sent by an API client
VERSION_STATUSES = ("candidate", "canary", "active", "rejected", "retired")
RUN_STATUSES = ("queued", "running", "succeeded", "failed", "rejected")
RUN_TRIGGERS = ("schedule", "manual", "cli", "api", "test")


@dataclass(frozen=True)
class Conversation:
    id: int
    created_at: datetime
    user_id: str | None
    client_key: str | None
    source: str
    system_prompt: str | None
    deleted_at: datetime | None = None  # deleted: this record is all that is left
    deleted_by: str | None = None
    title: str | None = None  # the name the user gave it, if any


@dataclass(frozen=True)
class Message:
    """A user, system or assistant message. Assistant messages are "replies".

    ``parent_id`` is the message this one answers or follows, so a conversation
    is a tree: regenerations and edits are siblings under the same user message.
    """

    id: int
    conversation_id: int
    parent_id: int | None
    role: str
    content: str
    created_at: datetime
    user_id: str | None = None
    origin: str | None = None  # replies only: generated / regenerated / edit
    source_reply_id: int | None = None  # the reply this one regenerates or edits
    adapter_version: str | None = None
    model_name: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @property
    def is_reply(self) -> bool:
        return self.role == "assistant"


@dataclass(frozen=True)
class FeedbackEvent:
    """One act of feedback. ``reply_id`` is the reply it is about.

    kind ``edit``: ``other_reply_id`` is the corrected reply (the user's version).
    kind ``choice``: ``reply_id`` was chosen over ``other_reply_id``.
    """

    id: int
    kind: str
    reply_id: int
    conversation_id: int
    created_at: datetime
    user_id: str | None = None
    other_reply_id: int | None = None
    comment: str | None = None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdapterVersion:
    version: str
    path: str
    status: str
    created_at: datetime
    parent_version: str | None = None
    run_id: int | None = None
    data_hash: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    reasons: tuple[str, ...] = ()
    activated_at: datetime | None = None


@dataclass(frozen=True)
class TrainingRun:
    id: int
    trigger: str
    status: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None
    kto_rows: int = 0
    dpo_rows: int = 0
    last_event_id: int | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: tuple[dict[str, Any], ...] = ()
    candidate_version: str | None = None
    decision: str | None = None
    reasons: tuple[str, ...] = ()
    error: str | None = None
    requested_by: str | None = None


@dataclass(frozen=True)
class FeedbackLogRow:
    """A feedback event joined with what an operator needs to review it."""

    event: FeedbackEvent
    reply_content: str
    reply_adapter_version: str | None
    prompt: str | None  # the user message the reply answers
    other_content: str | None = None
