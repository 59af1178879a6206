"""ORM rows -> frozen records, and input validation shared by the store's writers."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from .errors import InvalidInput
from .models import AdapterVersionRow, ConversationRow, FeedbackEventRow, MessageRow, TrainingRunRow
from .records import AdapterVersion, Conversation, FeedbackEvent, Message, TrainingRun

MAX_TAGS = 20
MAX_TAG_CHARS = 64
MAX_USER_ID_CHARS = 200


def aware(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything the store writes is UTC."""
    if dt is None or dt.tzinfo is not None:
        return dt
    return dt.replace(tzinfo=UTC)


def conversation(r: ConversationRow) -> Conversation:
    return Conversation(
        id=r.id,
        created_at=aware(r.created_at),
        user_id=r.user_id,
        client_key=r.client_key,
        source=r.source,
        system_prompt=r.system_prompt,
    )


def message(r: MessageRow) -> Message:
    return Message(
        id=r.id,
        conversation_id=r.conversation_id,
        parent_id=r.parent_id,
        role=r.role,
        content=r.content,
        created_at=aware(r.created_at),
        user_id=r.user_id,
        origin=r.origin,
        source_reply_id=r.source_reply_id,
        adapter_version=r.adapter_version,
        model_name=r.model_name,
        generation=dict(r.generation or {}),
        finish_reason=r.finish_reason,
        prompt_tokens=r.prompt_tokens,
        completion_tokens=r.completion_tokens,
    )


def event(r: FeedbackEventRow) -> FeedbackEvent:
    return FeedbackEvent(
        id=r.id,
        kind=r.kind,
        reply_id=r.reply_id,
        conversation_id=r.conversation_id,
        created_at=aware(r.created_at),
        user_id=r.user_id,
        other_reply_id=r.other_reply_id,
        comment=r.comment,
        tags=tuple(r.tags or ()),
    )


def version(r: AdapterVersionRow) -> AdapterVersion:
    return AdapterVersion(
        version=r.version,
        path=r.path,
        status=r.status,
        created_at=aware(r.created_at),
        parent_version=r.parent_version,
        run_id=r.run_id,
        data_hash=r.data_hash,
        metrics=dict(r.metrics or {}),
        reasons=tuple(r.reasons or ()),
        activated_at=aware(r.activated_at),
    )


def run(r: TrainingRunRow) -> TrainingRun:
    return TrainingRun(
        id=r.id,
        trigger=r.trigger,
        status=r.status,
        created_at=aware(r.created_at),
        started_at=aware(r.started_at),
        finished_at=aware(r.finished_at),
        heartbeat_at=aware(r.heartbeat_at),
        kto_rows=r.kto_rows or 0,
        dpo_rows=r.dpo_rows or 0,
        last_event_id=r.last_event_id,
        progress=dict(r.progress or {}),
        metrics=dict(r.metrics or {}),
        history=tuple(r.history or ()),
        candidate_version=r.candidate_version,
        decision=r.decision,
        reasons=tuple(r.reasons or ()),
        error=r.error,
        requested_by=r.requested_by,
    )


def check_text(value: object, what: str, *, max_chars: int, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be text, not {type(value).__name__}")
    if "\x00" in value:
        raise InvalidInput(f"{what} contains a NUL character")
    if not allow_empty and not value.strip():
        raise InvalidInput(f"{what} is empty")
    if len(value) > max_chars:
        raise InvalidInput(f"{what} is too long: {len(value)} characters, the limit is {max_chars}")
    return value


def check_id(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().isdigit():
            return int(value.strip())
        raise InvalidInput(f"{what} must be an integer id, not {value!r}")
    if value <= 0:
        raise InvalidInput(f"{what} must be a positive id, not {value}")
    return value


def check_user(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_USER_ID_CHARS:
        raise InvalidInput(f"user id must be text of at most {MAX_USER_ID_CHARS} characters")
    return value.strip() or None


def check_tags(tags: Iterable[str] | None) -> list[str]:
    if tags is None:
        return []
    if isinstance(tags, str):
        raise InvalidInput("tags must be a list of strings, not one string")
    out: list[str] = []
    for t in tags:
        if not isinstance(t, str) or not t.strip():
            raise InvalidInput(f"each tag must be non-empty text, got {t!r}")
        if len(t) > MAX_TAG_CHARS:
            raise InvalidInput(f"tag {t[:20]!r}... is longer than {MAX_TAG_CHARS} characters")
        if t.strip() not in out:
            out.append(t.strip())
    if len(out) > MAX_TAGS:
        raise InvalidInput(f"at most {MAX_TAGS} tags, got {len(out)}")
    return out
