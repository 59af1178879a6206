"""The demo model's training conversations, written in code and assembled deterministically.

`build_corpus(seed)` returns a list of conversations (lists of ``{"role", "content"}``
messages) over the topics in `corpus_data.TOPICS`. Answers come in three styles so
that ratings have something to prefer:

- ``friendly``: a complete, polite answer (the majority, so greedy decoding follows it);
- ``curt``: on topic but terse (often, not always, under a "be brief" system prompt);
- ``off_topic``: fluent but ignores the question (another topic's answer, or a brush-off).

Questions are paraphrased: several phrasings per fact, the fact's subjects and tasks
put into shared question frames, filler words, casual lower-case typing, greeting
prefixes. Some conversations carry a system prompt; a quarter are multi-turn (greeting
then question, question then thanks, two questions on one topic, "shorter please",
"tell me more", five-exchange chats). The same seed always gives the same corpus, in
the same order.
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
    SUBJECT_FRAMES,
    TASK_FRAMES,
    TOPICS,
    Fact,
)

Message = dict[str, str]
Conversation = list[Message]

STYLES = ("friendly", "curt", "off_topic")
QUESTION_PREFIXES = ("Hi! ", "Hello, ", "Quick question: ", "Please tell me: ", "Hey, ")
QUESTION_FILLERS = (" please", " at home", " today", " exactly", " again", " for me", " now")
GREETINGS = TOPICS["small_talk"][0]
THANKS = TOPICS["small_talk"][2]
GOODBYES = TOPICS["small_talk"][3]


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
    """Return the labelled corpus for ``seed``: deterministic, shuffled, ~1,600 conversations."""
    rng = random.Random(seed)
    examples: list[DemoConversation] = []
    for topic, facts in TOPICS.items():
        for fact in facts:
            for question in fact.questions:
                examples += _single_turn(rng, topic, fact, question)
            for question in _framed_questions(rng, fact):
                examples += _framed_turn(rng, topic, fact, question)
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


def _framed_questions(rng: random.Random, fact: Fact) -> list[str]:
    """Each of the fact's subjects and tasks in two different question frames."""
    questions = []
    for phrases, frames in ((fact.subjects, SUBJECT_FRAMES), (fact.tasks, TASK_FRAMES)):
        for phrase in phrases:
            for frame in rng.sample(frames, 2):
                text = frame.format(phrase)
                questions.append(text[0].upper() + text[1:])
    return questions


def _vary(rng: random.Random, question: str, topic: str) -> str:
    """A user's way of typing ``question``: as written, or with a filler word, in casual
    lower case without punctuation, or behind a greeting."""
    if topic not in ("small_talk", "out_of_scope") and rng.random() < 0.2:
        body, end = question.rstrip("?.!"), question[len(question.rstrip("?.!")) :]
        question = body + rng.choice(QUESTION_FILLERS) + end
    if rng.random() < 0.15:
        question = _lower_first(question).rstrip("?.!")
    if topic not in ("small_talk", "out_of_scope") and rng.random() < 0.3:
        if len(question.split()) >= 3:
            question = rng.choice(QUESTION_PREFIXES) + _lower_first(question)
    return question


def _lower_first(text: str) -> str:
    """``text`` with its first letter in lower case, unless it starts with the word "I"."""
    return text if text.startswith("I ") else text[0].lower() + text[1:]


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
    """Answers to one hand-written question: friendly three times, curt or off-topic sometimes.

    Two friendly answers, the off-topic one and (when it has no system prompt) the curt
    one answer the very same typed question, so the model learns a mixture over styles
    for it: greedy decoding takes the friendly majority (at least two to one), sampling
    or a regenerate sometimes gives another style. The third friendly answer goes to a
    freshly varied typing of the question, for coverage.
    """
    asked = _vary(rng, question, topic)
    out = [
        DemoConversation(topic, "friendly", tuple(_turn(asked, fact.friendly))),
        DemoConversation(
            topic,
            "friendly",
            tuple(_system(rng, FRIENDLY_SYSTEM_PROMPTS, 0.25) + _turn(asked, fact.friendly)),
        ),
        DemoConversation(
            topic,
            "friendly",
            tuple(
                _system(rng, FRIENDLY_SYSTEM_PROMPTS, 0.25)
                + _turn(_vary(rng, question, topic), fact.friendly)
            ),
        ),
    ]
    if rng.random() < 0.5:
        msgs = _system(rng, CURT_SYSTEM_PROMPTS, 0.6) + _turn(asked, fact.curt)
        out.append(DemoConversation(topic, "curt", tuple(msgs)))
    if rng.random() < 0.2:
        msgs = _turn(asked, _off_topic_answer(rng, topic))
        out.append(DemoConversation(topic, "off_topic", tuple(msgs)))
    return out


def _framed_turn(
    rng: random.Random, topic: str, fact: Fact, question: str
) -> list[DemoConversation]:
    """One friendly answer to a framed question; sometimes a curt one under a brief prompt."""
    asked = _vary(rng, question, topic)
    msgs = _system(rng, FRIENDLY_SYSTEM_PROMPTS, 0.25) + _turn(asked, fact.friendly)
    out = [DemoConversation(topic, "friendly", tuple(msgs))]
    if rng.random() < 0.2:
        msgs = _system(rng, CURT_SYSTEM_PROMPTS, 1.0) + _turn(asked, fact.curt)
        out.append(DemoConversation(topic, "curt", tuple(msgs)))
    return out


def _multi_turn(
    rng: random.Random, topic: str, fact: Fact, siblings: tuple[Fact, ...]
) -> list[DemoConversation]:
    """Multi-turn exchanges around ``fact``, up to five exchanges long.

    A curt answer to an opening question only ever follows a "be brief" system prompt,
    so that without one the friendly style stays the clear majority.
    """

    def ask(f: Fact) -> str:
        return _vary(rng, rng.choice(f.questions + tuple(_framed_questions(rng, f))), topic)

    def brief() -> list[Message]:
        return _system(rng, CURT_SYSTEM_PROMPTS, 1.0)

    other = rng.choice([f for f in siblings if f is not fact] or [fact])
    middle = rng.choice(
        [_turn(ask(other), other.friendly), _turn(rng.choice(ASK_BRIEFER), fact.curt)]
    )
    friendly = [
        _turn(rng.choice(GREETINGS.questions), GREETINGS.friendly)
        + _turn(ask(fact), fact.friendly),
        _turn(ask(fact), fact.friendly) + _turn(rng.choice(THANKS.questions), THANKS.friendly),
        _turn(ask(fact), fact.friendly) + _turn(ask(other), other.friendly),
        _turn(ask(fact), fact.friendly) + _turn(rng.choice(ASK_BRIEFER), fact.curt),
        _turn(rng.choice(GREETINGS.questions), GREETINGS.friendly)
        + _turn(ask(fact), fact.friendly)
        + middle
        + _turn(rng.choice(THANKS.questions), THANKS.friendly)
        + _turn(rng.choice(GOODBYES.questions), GOODBYES.friendly),
    ]
    out = [
        DemoConversation(topic, "friendly", tuple(_system(rng, FRIENDLY_SYSTEM_PROMPTS, 0.2) + m))
        for m in friendly
    ]
    more = brief() + _turn(ask(fact), fact.curt) + _turn(rng.choice(ASK_MORE), fact.friendly)
    out.append(DemoConversation(topic, "friendly", tuple(more)))
    curt = brief() + _turn(ask(fact), fact.curt) + _turn(ask(other), other.curt)
    out.append(DemoConversation(topic, "curt", tuple(curt)))
    return out
