"""The demo model's training conversations, written in code and assembled deterministically.

`build_corpus(seed)` returns a list of conversations (lists of ``{"role", "content"}``
messages) over the topics in `corpus_data.TOPICS`. Answers come in three styles so
that ratings have something to prefer:

- ``friendly``: a complete, polite answer (the majority, so greedy decoding follows it);
- ``curt``: on topic but terse (often, not always, under a "be brief" system prompt);
- ``off_topic``: fluent but ignores the question (another topic's answer, or a brush-off).

Questions are paraphrased (several phrasings per fact, casual lower-case typing,
greeting prefixes); some conversations carry a system prompt; a third are multi-turn
(greeting then question, question then thanks, two questions on one topic, "shorter
please", "tell me more"). The same seed always gives the same corpus, in the same order.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

from chat_app.demo_model.corpus_data import (
    ASK_BRIEFER,
    ASK_MORE,
    CURT_SYSTEM_PROMPTS,
    DISMISSIVE_REPLIES,
    FRIENDLY_SYSTEM_PROMPTS,
    TOPICS,
    Fact,
)

Message = dict[str, str]
Conversation = list[Message]

STYLES = ("friendly", "curt", "off_topic")
QUESTION_PREFIXES = ("Hi! ", "Hello, ", "Quick question: ", "Please tell me: ", "Hey, ")
GREETINGS = TOPICS["small_talk"][0]
THANKS = TOPICS["small_talk"][2]


@dataclass(frozen=True)
class DemoConversation:
    """One training conversation with the labels the corpus was built from.

    ``style`` names the style of the assistant's answers; a "shorter, please" exchange
    whose last reply is terse on request counts as ``friendly`` (it is the wanted
    behaviour).
    """

    topic: str
    style: str
    messages: tuple[Message, ...]


def build_examples(seed: int = 0) -> list[DemoConversation]:
    """Return the labelled corpus for ``seed``: deterministic, shuffled, about 900 conversations."""
    rng = random.Random(seed)
    examples: list[DemoConversation] = []
    for topic, facts in TOPICS.items():
        for fact in facts:
            for question in fact.questions:
                examples.extend(_single_turn(rng, topic, fact, question))
            if topic != "out_of_scope":
                examples.extend(_multi_turn(rng, topic, fact, facts))
    rng.shuffle(examples)
    return examples


def build_corpus(seed: int = 0) -> list[Conversation]:
    """Return the corpus for ``seed`` as plain conversations (fresh lists of message dicts)."""
    return [[dict(m) for m in ex.messages] for ex in build_examples(seed)]


def corpus_sha256(conversations: list[Conversation]) -> str:
    """Hex SHA-256 of the conversations' canonical JSON (keys sorted, UTF-8)."""
    blob = json.dumps(conversations, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _vary(rng: random.Random, question: str, topic: str) -> str:
    """A user's way of typing ``question``: as written, casual lower case, or with a greeting."""
    roll = rng.random()
    if roll < 0.15:
        question = question[0].lower() + question[1:].rstrip("?.!")
    if topic not in ("small_talk", "out_of_scope") and rng.random() < 0.3:
        prefix = rng.choice(QUESTION_PREFIXES)
        question = prefix + question[0].lower() + question[1:]
    return question


def _system(rng: random.Random, prompts: tuple[str, ...], chance: float) -> list[Message]:
    return [{"role": "system", "content": rng.choice(prompts)}] if rng.random() < chance else []


def _turn(question: str, answer: str) -> list[Message]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _off_topic_answer(rng: random.Random, topic: str) -> str:
    """A fluent reply that ignores the question: a brush-off or another topic's answer."""
    if rng.random() < 0.4:
        return rng.choice(DISMISSIVE_REPLIES)
    others = [t for t in TOPICS if t not in (topic, "small_talk", "out_of_scope")]
    return rng.choice(TOPICS[rng.choice(others)]).friendly


def _single_turn(
    rng: random.Random, topic: str, fact: Fact, question: str
) -> list[DemoConversation]:
    """Two friendly answers to ``question``, often a curt one, sometimes an off-topic one."""
    out = []
    for _ in range(2):
        msgs = _system(rng, FRIENDLY_SYSTEM_PROMPTS, 0.25)
        msgs += _turn(_vary(rng, question, topic), fact.friendly)
        out.append(DemoConversation(topic, "friendly", tuple(msgs)))
    if rng.random() < 0.5:
        msgs = _system(rng, CURT_SYSTEM_PROMPTS, 0.5) + _turn(_vary(rng, question, topic), fact.curt)
        out.append(DemoConversation(topic, "curt", tuple(msgs)))
    if rng.random() < 0.25:
        msgs = _turn(_vary(rng, question, topic), _off_topic_answer(rng, topic))
        out.append(DemoConversation(topic, "off_topic", tuple(msgs)))
    return out


def _multi_turn(
    rng: random.Random, topic: str, fact: Fact, siblings: tuple[Fact, ...]
) -> list[DemoConversation]:
    """Multi-turn exchanges around ``fact``: mostly friendly, one curt throughout."""
    def ask(f: Fact) -> str:
        return _vary(rng, rng.choice(f.questions), topic)

    other = rng.choice([f for f in siblings if f is not fact] or [fact])
    friendly = [
        _turn(rng.choice(GREETINGS.questions), GREETINGS.friendly) + _turn(ask(fact), fact.friendly),
        _turn(ask(fact), fact.friendly) + _turn(rng.choice(THANKS.questions), THANKS.friendly),
        _turn(ask(fact), fact.friendly) + _turn(ask(other), other.friendly),
        _turn(ask(fact), fact.friendly) + _turn(rng.choice(ASK_BRIEFER), fact.curt),
        _turn(ask(fact), fact.curt) + _turn(rng.choice(ASK_MORE), fact.friendly),
    ]
    out = [
        DemoConversation(topic, "friendly", tuple(_system(rng, FRIENDLY_SYSTEM_PROMPTS, 0.2) + m))
        for m in friendly
    ]
    curt = _system(rng, CURT_SYSTEM_PROMPTS, 0.5)
    curt += _turn(ask(fact), fact.curt) + _turn(ask(other), other.curt)
    out.append(DemoConversation(topic, "curt", tuple(curt)))
    return out
