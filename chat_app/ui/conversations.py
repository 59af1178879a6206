"""The chat page's conversation list: list and search, reopen, rename, delete.

A user sees only their own conversations: with logins, those of their user name (from
any browser); without, those this browser started. Anything else is answered as if it
did not exist. Deleting removes the chat's text and feedback from the page, from every
later training round and from exports; the store keeps a record of who deleted it and
when (``FeedbackStore.delete_conversation``).
"""

from __future__ import annotations

import logging
from typing import Any

from feedback_store import ConversationSummary, NotFound, StoreError

from .session import ChatSession, restore_thread
from .view import PageUpdate, error, info

log = logging.getLogger("chat_app.ui")


class ConversationListHandlers:
    """Mixed into ``ChatHandlers`` (which provides ``store``, ``settings``, ``view`` and
    ``_votes``)."""

    store: Any
    settings: Any
    engine: Any
    view: Any
    _votes: Any
    _route: Any

    @staticmethod
    def _owner(session: ChatSession) -> dict[str, str]:
        if session.user_id is not None:
            return {"user_id": session.user_id}
        return {"client_key": session.client_key}

    def conversations(self, session: ChatSession, search: Any = None
                      ) -> tuple[list[ConversationSummary], str | None]:
        """The session owner's conversations, newest first (those matching ``search``),
        and a problem to show, or None."""
        text = search if isinstance(search, str) else None
        try:
            return self.store.list_conversations(**self._owner(session), search=text), None
        except StoreError as exc:
            return [], f"Your chats could not be listed: {exc}"

    def update_notice(self, session: ChatSession) -> str | None:
        """Once per version (remembered in the browser): when the version serving this tab
        was trained on some of this user's feedback, a line saying so; else None."""
        version = self._route(session.conversation_id) or self.engine.active_version
        if not version or version == "base" or session.seen_update == version:
            return None
        try:
            update = self.store.feedback_in_version(version, **self._owner(session))
        except StoreError as exc:
            log.warning("could not tell what %s learnt from this user: %s", version, exc)
            return None
        session.seen_update = version
        if update is None or update.yours == 0:
            return None
        when = (f" since {update.activated_at:%Y-%m-%d %H:%M} UTC"
                if update.activated_at is not None else "")
        mine = "one of them yours" if update.yours == 1 else f"{update.yours} of them yours"
        return (f"🎉 The model was updated with your feedback: version `{update.version}` "
                f"has answered{when}, trained on {update.ratings} ratings and pairs, {mine}.")

    def open_conversation(self, session: ChatSession, conversation_id: Any) -> PageUpdate:
        """Show one of the owner's conversations, to read and continue it."""
        if isinstance(conversation_id, bool) or not isinstance(conversation_id, int):
            return self.view(session, error("Pick a chat from the list."))
        if conversation_id == session.conversation_id:
            return self.view(session)
        if session.generating:
            return self.view(session, error("Wait for the reply to finish (or stop it) "
                                            "before opening another chat."))
        try:
            if not self.store.owns_conversation(conversation_id, **self._owner(session)):
                return self.view(session, error(f"There is no chat {conversation_id} of "
                                                "yours; it may have been deleted."))
            conv = self.store.get_conversation(conversation_id)
            messages = self.store.messages(conversation_id)
        except StoreError as exc:
            return self.view(session, error(f"The chat could not be opened: {exc}"))
        session.start_over(self.settings.default_system_prompt)
        session.conversation_id = conv.id
        session.system_prompt = conv.system_prompt or ""
        session.thread = restore_thread(messages, None)
        session.votes = self._votes(session)
        return self.view(session, reset_system_prompt=True)

    def rename_conversation(self, session: ChatSession, title: Any) -> PageUpdate:
        """Give the current chat a title."""
        if session.conversation_id is None:
            return self.view(session, error("Send a first message before naming the chat."))
        try:
            clean = self.store.rename_conversation(session.conversation_id, title,
                                                   **self._owner(session))
        except StoreError as exc:
            return self.view(session, error(f"The chat was not renamed: {exc}"))
        return self.view(session, info(f"Renamed this chat to “{clean}”."))

    def forget_me(self, session: ChatSession) -> PageUpdate:
        """Delete every chat of the owner and, with a login, every rating they gave
        (``FeedbackStore.forget_user``); recorded as deleted by them."""
        if session.generating:
            return self.view(session, error("Wait for the reply to finish (or stop it) "
                                            "before deleting your data."))
        try:
            if session.user_id is not None:
                done = self.store.forget_user(session.user_id, by=session.user_id)
                chats = done["conversations"]
            else:
                chats = 0
                while batch := self.store.list_conversations(client_key=session.client_key,
                                                             limit=500):
                    for conv in batch:
                        self.store.delete_conversation(conv.id, by=session.client_key)
                        chats += 1
        except StoreError as exc:
            return self.view(session, error(f"Your data was not (all) deleted: {exc}; "
                                            "try again."))
        session.start_over(self.settings.default_system_prompt)
        session.votes = {}
        return self.view(session, info(f"Deleted all your data: {chats} chat(s) and your "
                                       "feedback are gone from your list, from future "
                                       "training and from exports."),
                         message_box="", comment_box="", reset_system_prompt=True)

    def delete_conversation(self, session: ChatSession) -> PageUpdate:
        """Delete the current chat, everywhere, and start a new one."""
        cid = session.conversation_id
        if cid is None:
            return self.view(session, error("There is no saved chat to delete."))
        if session.generating:
            return self.view(session, error("Wait for the reply to finish (or stop it) "
                                            "before deleting the chat."))
        owner = self._owner(session)
        try:
            self.store.delete_conversation(cid, by=session.user_id or session.client_key,
                                           owner=owner.get("user_id"),
                                           client_key=owner.get("client_key"))
        except NotFound:
            return self.view(session, error(f"There is no chat {cid} of yours."))
        except StoreError as exc:
            return self.view(session, error(f"The chat was not deleted: {exc}"))
        session.start_over(self.settings.default_system_prompt)
        return self.view(session, info("Deleted the chat: it is gone from your list, from "
                                       "future training and from exports."),
                         message_box="", comment_box="", reset_system_prompt=True)
