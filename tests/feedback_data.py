"""Feedback with a clear preference, written through the real store API.

Polite, complete replies get thumbs up, are chosen over curt siblings, and are what
users edit curt replies into; curt replies get thumbs down. A trained adapter
should come to prefer the polite style on conversations it never saw.
"""

from __future__ import annotations

from feedback_store import FeedbackStore

TOPICS = [
    ("What is the capital of France?", "Paris"),
    ("How do I boil an egg?", "boil it for eight minutes"),
    ("What colour is the sky?", "blue on a clear day"),
    ("Can you recommend a book?", "try a classic novel"),
    ("How far is the moon?", "about 384,000 kilometres"),
    ("What do cats eat?", "mostly meat"),
    ("Is it going to rain?", "check the local forecast"),
    ("How do I learn Python?", "start with small programs"),
]


def polite(fact: str) -> str:
    return f"Thank you for asking! The answer is {fact}. I hope this helps."


def curt(fact: str) -> str:
    return f"{fact}. whatever."


def seed_preferences(store: FeedbackStore, *, rounds: int = 3, version: str = "base") -> int:
    """Write ``rounds * len(TOPICS)`` conversations of feedback; returns events written."""
    events = 0
    for r in range(rounds):
        for i, (question, fact) in enumerate(TOPICS):
            conv = store.create_conversation(user_id=f"user{r}")
            q = store.add_user_message(conversation_id=conv.id, content=question)
            good = store.add_reply(parent_id=q.id, content=polite(fact), adapter_version=version)
            bad = store.add_reply(source_reply_id=good.id, content=curt(fact),
                                  adapter_version=version)
            store.rate(reply_id=good.id, rating="up", user_id=f"user{r}")
            store.rate(reply_id=bad.id, rating="down", user_id=f"user{r}")
            events += 2
            if (i + r) % 2 == 0:
                store.choose(chosen_id=good.id, rejected_id=bad.id, user_id=f"user{r}")
            else:
                store.edit_reply(reply_id=bad.id, content=polite(fact) + " Have a nice day!",
                                 user_id=f"user{r}")
            events += 1
    return events
