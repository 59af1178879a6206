"""Continue stored conversations from a whole chat history, as API clients send it.

An OpenAI-style client sends every earlier turn with each request. ``append_turns``
finds the stored thread those turns continue and stores only what is new, so a
conversation held by a client is one conversation in the store, not one per request:

* with ``conversation_id``: the turns are matched from that conversation's first
  message down; if the client sent only the new message, it follows the
  conversation's latest message;
* without it: a stored API thread ending in the client's last assistant turn whose
  whole history equals the client's is continued (the newest one if several);
* anything else starts a new conversation. Earlier turns the store has never seen
  are stored too (assistant turns with origin ``client``), so prompts rebuilt for
  training are exactly what the model saw.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import convert
from .convert import check_id, check_label, check_text, check_user, clean_model_text
from .errors import Conflict, InvalidInput, NotFound
from .models import ConversationRow, MessageRow
from .records import Conversation, Message
from .store import FeedbackStore

CANDIDATES = 20  # stored threads examined when matching without a conversation id


def append_turns(
    store: FeedbackStore,
    *,
    turns: Sequence[tuple[str, str]],
    system_prompt: str | None = None,
    conversation_id: int | None = None,
    user_id: str | None = None,
    source: str = "api",
    request_id: str | None = None,
) -> tuple[Conversation, Message]:
    """Store the new part of ``turns`` ((role, text) pairs, user/assistant, the last one
    a user message); returns the conversation and the stored final user message.
    ``request_id`` names the final user message: sent again, it is found, not stored
    twice (``FeedbackStore._once``)."""
    if not turns or turns[-1][0] != "user":
        raise InvalidInput("the last message must be a user message")
    limit = store.limits.max_message_chars
    for i, (role, text) in enumerate(turns):
        if role not in ("user", "assistant"):
            raise InvalidInput(f"message {i}: role must be user or assistant, not {role!r}")
        check_text(text, f"message {i}", max_chars=limit, allow_empty=role == "assistant")
    user_id = check_user(user_id)
    if conversation_id is not None:
        conversation_id = check_id(conversation_id, "conversation id")
    if system_prompt:
        check_text(system_prompt, "system prompt", max_chars=limit)

    def work(s: Session) -> tuple[Conversation, Message]:
        if request_id is not None:
            done = s.scalar(select(MessageRow).where(MessageRow.request_id == request_id))
            if done is not None:
                if done.role != "user" or done.content != turns[-1][1]:
                    raise Conflict(f"request id {request_id!r} was already used for a "
                                   "different write")
                return (convert.conversation(s.get(ConversationRow, done.conversation_id)),
                        convert.message(done))
        prefix = list(turns[:-1])
        conv, parent, matched = None, None, 0
        if conversation_id is not None:
            conv = s.get(ConversationRow, conversation_id)
            if conv is None:
                raise NotFound(f"no conversation with id {conversation_id}")
            if conv.deleted_at is not None:
                raise NotFound(f"conversation {conversation_id} was deleted")
            if prefix:
                parent, matched = _walk(s, conv.id, prefix)
            else:
                parent = s.scalar(select(func.max(MessageRow.id))
                                  .where(MessageRow.conversation_id == conv.id))
        elif prefix and prefix[-1][0] == "assistant":
            conv, parent, matched = _find_thread(s, prefix, source)
        if conv is None:
            conv = ConversationRow(user_id=user_id, source=source,
                                   system_prompt=system_prompt or None)
            s.add(conv)
            s.flush()
        for role, text in prefix[matched:]:
            parent = _add(s, conv.id, parent, role, text, user_id)
        last = _add(s, conv.id, parent, "user", turns[-1][1], user_id)
        s.get(MessageRow, last).request_id = request_id
        s.flush()
        return convert.conversation(conv), convert.message(s.get(MessageRow, last))

    if request_id is not None:
        check_label(request_id, "request id", max_chars=100)
    try:
        return store.db.run(work)
    except IntegrityError:  # the same request at once elsewhere: its row is the answer
        if request_id is None:
            raise
        return store.db.run(work)


def _add(s: Session, conv_id: int, parent: int | None, role: str, text: str,
         user_id: str | None) -> int:
    row = MessageRow(conversation_id=conv_id, parent_id=parent, role=role, content=text,
                     user_id=user_id if role == "user" else None,
                     origin="client" if role == "assistant" else None)
    s.add(row)
    s.flush()
    return row.id


def _walk(s: Session, conv_id: int, prefix: list[tuple[str, str]]) -> tuple[int | None, int]:
    """Follow ``prefix`` from the conversation's root; returns (last matched id, count)."""
    rows = list(s.scalars(select(MessageRow).where(MessageRow.conversation_id == conv_id)
                          .order_by(MessageRow.id.desc())))
    parent: int | None = None
    for matched, (role, text) in enumerate(prefix):
        child = next((m for m in rows if m.parent_id == parent and m.role == role
                      and m.content == text), None)
        if child is None:
            return parent, matched
        parent = child.id
    return parent, len(prefix)


def _find_thread(s: Session, prefix: list[tuple[str, str]], source: str
                 ) -> tuple[ConversationRow | None, int | None, int]:
    candidates = s.scalars(
        select(MessageRow)
        .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
        .where(MessageRow.role == "assistant", MessageRow.content == prefix[-1][1],
               ConversationRow.source == source)
        .order_by(MessageRow.id.desc())
        .limit(CANDIDATES)
    )
    for cand in candidates:
        chain = _chain(s, cand)
        if [(m.role, m.content) for m in chain if m.role != "system"] == prefix:
            return s.get(ConversationRow, cand.conversation_id), cand.id, len(prefix)
    return None, None, 0


def _chain(s: Session, msg: MessageRow) -> list[MessageRow]:
    out = [msg]
    while out[-1].parent_id is not None:
        out.append(s.get(MessageRow, out[-1].parent_id))
    return out[::-1]


def complete_reply(
    store: FeedbackStore,
    *,
    reply_id: int,
    content: str,
    finish_reason: str,
    completion_tokens: int | None = None,
    prompt_tokens: int | None = None,
) -> Message:
    """Fill in a reply stored when its stream began (``finish_reason`` still unset).

    A streamed reply is stored at its first token so its id can be sent with it;
    this records how it ended. A reply that already ended is never changed
    (Conflict), and the text of a finished reply is final.
    """
    from .errors import Conflict

    reply_id = check_id(reply_id, "reply id")
    content = check_text(clean_model_text(content), "reply",
                         max_chars=store.limits.max_message_chars, allow_empty=True)
    if not finish_reason or len(finish_reason) > 16:
        raise InvalidInput("finish_reason must be a short non-empty string")

    def work(s: Session) -> Message:
        row = s.get(MessageRow, reply_id)
        if row is None or row.role != "assistant":
            raise NotFound(f"no reply with id {reply_id}")
        if row.finish_reason is not None:
            raise Conflict(f"reply {reply_id} already ended ({row.finish_reason})")
        row.content = content
        row.finish_reason = finish_reason
        row.completion_tokens = completion_tokens
        if prompt_tokens is not None:
            row.prompt_tokens = prompt_tokens
        s.flush()
        return convert.message(row)

    return store.db.run(work)
