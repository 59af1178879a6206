"""ORM rows -> frozen records, and input validation shared by the store's writers."""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from .errors import InvalidInput
from .models import AdapterVersionRow, ConversationRow, FeedbackEventRow, MessageRow, TrainingRunRow
from .records import AdapterVersion, Conversation, FeedbackEvent, Message, TrainingRun

MAX_TAGS = 20
MAX_TAG_CHARS = 64
MAX_USER_ID_CHARS = 200
MAX_ID = 2**31 - 1  # ids are INTEGER columns (32-bit on PostgreSQL)


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
        deleted_at=aware(r.deleted_at),
        deleted_by=r.deleted_by,
        title=r.title,
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


def _check_chars(value: str, what: str) -> None:
    """Refuse what no backend can store: NUL characters and lone surrogates."""
    if "\x00" in value:
        raise InvalidInput(f"{what} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"{what} is not valid Unicode (a lone surrogate)") from exc


def check_text(value: object, what: str, *, max_chars: int, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be text, not {type(value).__name__}")
    _check_chars(value, what)
    if not allow_empty and not value.strip():
        raise InvalidInput(f"{what} is empty")
    if len(value) > max_chars:
        raise InvalidInput(f"{what} is too long: {len(value)} characters, the limit is {max_chars}")
    return value


def check_label(value: object, what: str, *, max_chars: int) -> str | None:
    """A short optional name (client key, source, adapter version, model name...).

    None stays None; otherwise non-empty text of at most ``max_chars`` characters.
    """
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{what} must be non-empty text, not {value!r}")
    _check_chars(value, what)
    if len(value) > max_chars:
        raise InvalidInput(f"{what} is longer than {max_chars} characters")
    return value


def check_id(value: object, what: str) -> int:
    """A positive integer id (digits in a string are accepted) of at most MAX_ID."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what} must be an integer id, not {value!r}")
    if value <= 0:
        raise InvalidInput(f"{what} must be a positive id, not {value}")
    if value > MAX_ID:
        raise InvalidInput(f"{what} {value} is out of range (ids are at most {MAX_ID})")
    return value


def check_count(value: object, what: str) -> int | None:
    """An optional non-negative integer (token counts)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise InvalidInput(f"{what} must be a non-negative integer, not {value!r}")
    return value


def check_user(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_USER_ID_CHARS:
        raise InvalidInput(f"user id must be text of at most {MAX_USER_ID_CHARS} characters")
    _check_chars(value, "user id")
    return value.strip() or None


def check_tags(tags: Iterable[str] | None) -> list[str]:
    if tags is None:
        return []
    if isinstance(tags, str | bytes | dict) or not isinstance(tags, Iterable):
        raise InvalidInput("tags must be a list of strings")
    out: list[str] = []
    for t in tags:
        if not isinstance(t, str) or not t.strip():
            raise InvalidInput(f"each tag must be non-empty text, got {t!r}")
        _check_chars(t, "a tag")
        if len(t) > MAX_TAG_CHARS:
            raise InvalidInput(f"tag {t[:20]!r}... is longer than {MAX_TAG_CHARS} characters")
        if t.strip() not in out:
            out.append(t.strip())
        if len(out) > MAX_TAGS:
            raise InvalidInput(f"at most {MAX_TAGS} tags")
    return out


def json_value(value: object, what: str, *, max_depth: int = 32) -> Any:
    """A deep copy of ``value`` that every backend's JSON column accepts.

    Allowed: dict (string keys), list/tuple, str, int, float, bool, None. Non-finite
    floats (NaN, +-inf: a diverged loss) become None, since PostgreSQL's JSON refuses
    them; anything else raises InvalidInput.
    """

    def walk(v: object, depth: int) -> Any:
        if depth > max_depth:
            raise InvalidInput(f"{what} is nested deeper than {max_depth} levels")
        if v is None or isinstance(v, bool | int):
            return v
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, str):
            _check_chars(v, what)
            return v
        if isinstance(v, dict):
            if not all(isinstance(k, str) for k in v):
                raise InvalidInput(f"{what} must have text keys")
            for k in v:
                _check_chars(k, what)
            return {k: walk(x, depth + 1) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [walk(x, depth + 1) for x in v]
        raise InvalidInput(f"{what} holds a {type(v).__name__}, which JSON cannot store")

    return walk(value, 0)


def json_object(value: object, what: str) -> dict[str, Any]:
    """``json_value`` of a mapping (None gives an empty one)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a mapping, not {type(value).__name__}")
    return json_value(value, what)


def utc(dt: object, what: str) -> datetime | None:
    """A datetime as aware UTC (a naive one is taken to be UTC already).

    SQLite stores datetimes as text without their offset, so comparing with a value
    in another zone must convert it first.
    """
    if dt is None:
        return None
    if not isinstance(dt, datetime):
        raise InvalidInput(f"{what} must be a datetime, not {type(dt).__name__}")
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def clean_model_text(text: str) -> str:
    """What a model wrote, made storable: NUL and lone surrogates (which no SQL text
    column holds) become U+FFFD. Users' own text is refused instead, never altered."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    return text.encode("utf-8", "replace").decode("utf-8") if not text.isascii() else text
