"""Side by side: the last reply next to another version's reply to the same message.

On request ("Compare with another version"), the message the last reply answers is sent
to a second version: the other side of a running canary, else the base when the reply
came from an adapter, else the active adapter. The second reply is stored as a sibling
of the first (with the version that wrote it) and both are shown unlabelled, in a random
order. The user picks the better one, stored as a choice, so the pair becomes a DPO row
across versions, or says both are bad (a thumbs down on each). While a canary runs, a
share of finished replies (``ChatPageSettings.canary_compare_share``) is compared this
way without being asked. The ordinary chat is not slowed: the second reply is generated
only after the first has ended, and only when asked or drawn during a canary.
"""

from __future__ import annotations

import secrets
from typing import Any

from chat_app.engine import AdapterError, EngineBusy, InputTooLong
from feedback_store import StoreError

from .session import ChatSession
from .streaming import ended_reply
from .view import PageUpdate, error, info

BASE = "base"
PICKS = ("a", "b", "both_bad")


class SideBySideHandlers:
    """Mixed into ``ChatHandlers`` (which provides ``store``, ``engine``, ``settings``,
    ``router``, ``view`` and ``_route``)."""

    store: Any
    engine: Any
    settings: Any
    router: Any
    view: Any
    _route: Any

    def _other_version(self, version: str) -> str | None:
        """The version to compare ``version``'s reply with, or None when only one serves."""
        active = self.engine.active_version
        canary = self.router.canary_version() if self.router is not None else None
        if canary is not None:
            return canary if version != canary else active
        if version != BASE:
            return BASE
        return active if active != BASE else None

    def compare(self, session: ChatSession) -> PageUpdate:
        """Ask another version for a reply to the message the last reply answers."""
        if session.generating:
            return self.view(session, error("Wait for the reply to finish (or stop it) first."))
        position = session.last_reply_position()
        if position is None or position != len(session.thread) - 1:
            return self.view(session, error("There is no finished last reply to compare."))
        old = session.thread[position]
        other = self._other_version(old.adapter_version or self.engine.active_version)
        if other is None:
            return self.view(session, error("Only one version is serving now; there is "
                                            "nothing to compare it with yet."))
        params = self.settings.sampling
        try:
            gen = self.engine.stream(session.model_messages(position), params, version=other)
        except EngineBusy:
            return self.view(session, error("The model is busy right now; try again in a "
                                            "moment."))
        except (AdapterError, InputTooLong, ValueError) as exc:
            return self.view(session, error(f"The other version could not answer: {exc}"))
        try:
            for _ in gen:
                pass
        finally:
            gen.cancel()
        if gen.finish_reason in (None, "error", "cancelled"):
            return self.view(session, error("The other version failed while answering; "
                                            "nothing was saved."))
        text, meta = ended_reply(gen, params, self.engine.model_name, gen.finish_reason,
                                 self.store.limits.max_message_chars)
        try:
            new = self.store.add_reply(content=text, source_reply_id=old.id, **meta)
        except StoreError as exc:
            return self.view(session, error(f"The second reply could not be saved: {exc}"))
        pair = (old, new) if secrets.randbelow(2) else (new, old)
        session.side_by_side = (pair[0].id, pair[1].id)
        session.side_by_side_texts = (pair[0].content, pair[1].content)
        session.pending_choice = None
        return self.view(session, info("Two replies to your last message are shown side by "
                                       "side: pick the better one."))

    def canary_compare(self, session: ChatSession) -> PageUpdate | None:
        """While a canary runs, for ``canary_compare_share`` of finished replies, the
        side-by-side comparison with the other side of the canary (None: nothing to do,
        the page is left as it is)."""
        share = self.settings.canary_compare_share
        canary = self.router.canary_version() if self.router is not None else None
        if canary is None or share <= 0 or session.generating \
                or session.side_by_side is not None:
            return None
        position = session.last_reply_position()
        if position is None or position != len(session.thread) - 1 \
                or session.thread[position].finish_reason in (None, "cancelled", "error"):
            return None
        if secrets.randbelow(1_000_000) >= share * 1_000_000:
            return None
        return self.compare(session)

    def pick_side(self, session: ChatSession, pick: Any) -> PageUpdate:
        """``pick`` "a" or "b" (the better reply, stored as a choice) or "both_bad"."""
        if session.side_by_side is None:
            return self.view(session, error("There is nothing to pick from: ask for a "
                                            "comparison first."))
        if pick not in PICKS:
            return self.view(session, error(f"Pick one of {', '.join(PICKS)}, not {pick!r}."))
        a, b = session.side_by_side
        try:
            if pick == "both_bad":
                for reply_id in (a, b):
                    self.store.rate(reply_id=reply_id, rating="down", user_id=session.user_id)
                    session.votes[reply_id] = "down"
                note = "Saved: both replies are bad."
            else:
                chosen, rejected = (a, b) if pick == "a" else (b, a)
                self.store.choose(chosen_id=chosen, rejected_id=rejected,
                                  user_id=session.user_id)
                if session.thread and session.thread[-1].id != chosen:
                    session.thread = [*session.thread[:-1], self.store.get_message(chosen)]
                note = f"Saved: reply {pick.upper()} is better; the chat goes on from it."
        except StoreError as exc:
            return self.view(session, error(f"Your pick was not saved: {exc}"))
        session.side_by_side = None
        session.side_by_side_texts = None
        return self.view(session, info(note))
