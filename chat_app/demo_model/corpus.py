"""The demo model's training conversations, written in code and assembled deterministically.

`build_corpus(seed)` returns a list of conversations (lists of ``{"role", "content"}``
messages) over the topics in `corpus_data.TOPICS`.

The product learns from users' ratings (KTO, DPO), and preference learning mostly
reweights replies the base model already samples. A base that answers every prompt
with one memorised reply gives it nothing to reweight, so every question here is
answered in several variants at balanced frequencies (`answer_variants`), derived from
each fact's friendly and curt answers:

- ``full``: the friendly answer as written;
- ``plain``: the same with its exclamation marks made full stops;
- ``warm``: behind a warm opener ("Good question! ", "Sure! ", ...);
- ``closing``: followed by a closer ("I hope that helps!", ...);
- ``long``: followed by an extra "In short: ..." sentence (not for small talk);
- ``list``: its sentences as a bullet list (when it has two or more; not for small talk);
- ``first``: its first sentence only;
- ``curt``: the curt answer (on topic, but terse).

So sampled replies differ in length, tone, punctuation, layout and in whether they
name the subject, which is what raters tend to judge. Each ``style`` label groups the
variants: ``curt`` is terse, ``off_topic`` ignores the question (another topic's
answer or a brush-off, a few percent of the replies to a question), and every other
variant is ``friendly``. No variant is a majority for a question; the full friendly
answer shares its opening with several variants, so greedy decoding mostly gives it
(or its first sentence).

Under a "be brief" system prompt the answer is curt; under a friendly system prompt it
is one of the `HELPFUL_VARIANTS` (never curt or a single sentence).

Questions are paraphrased: several phrasings per fact, the fact's subjects and tasks
put into shared question frames, filler words, casual lower-case typing, greeting
prefixes. A quarter of the conversations are multi-turn (greeting then question,
question then thanks, two questions on one topic, "shorter please", "tell me more",
five-exchange chats). The same seed always gives the same corpus, in the same order.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass

from chat_app.demo_model.corpus_data import (
    ASK_BRIEFER,
    ASK_MORE,
    CHAT_CLOSERS,
    CHAT_OPENERS,
    CURT_SYSTEM_PROMPTS,
    DISMISSIVE_REPLIES,
    FRIENDLY_SYSTEM_PROMPTS,
    IN_SHORT,
    SUBJECT_FRAMES,
    TASK_FRAMES,
    TOPICS,
    WARM_CLOSERS,
    WARM_OPENERS,
    Fact,
)

Message = dict[str, str]
Conversation = list[Message]

STYLES = ("friendly", "curt", "off_topic")
HELPFUL_VARIANTS = ("full", "plain", "warm", "closing", "long", "list")
VARIANTS = HELPFUL_VARIANTS + ("first", "curt")
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
    behaviour). ``variant`` names the answer variant of a single answer (one of
    `VARIANTS`, or ``off_topic``); it is ``multi`` for a multi-turn conversation.
    """

    topic: str
    style: str
    messages: tuple[Message, ...]
    variant: str = "multi"


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


def answer_variants(rng: random.Random, topic: str, fact: Fact) -> dict[str, str]:
    """The fact's answer in each applicable variant of `VARIANTS`, in that order.

    Openers and closers are drawn with ``rng``. A variant whose text would repeat an
    earlier one is left out (a one-sentence answer has no ``first`` or ``list``; one
    without exclamation marks has no ``plain``), so each distinct reply counts once.
    Small talk gets milder openers and closers, and no ``long`` or ``list``.
    """
    chat = topic == "small_talk"
    text, sentences = fact.friendly, _sentences(fact.friendly)
    candidates = {
        "full": text,
        "plain": re.sub(r"!(?=\s+[A-Z]|$)", ".", text),
        "warm": _with_opener(rng, topic, text),
        "closing": _with_closer(rng, topic, text),
        "long": "" if chat else text + IN_SHORT + fact.curt,
        "list": "\n".join("- " + s for s in sentences) if len(sentences) > 1 and not chat else "",
        "first": sentences[0],
        "curt": fact.curt,
    }
    out: dict[str, str] = {}
    for name, answer in candidates.items():
        if answer and answer not in out.values():
            out[name] = answer
    return out


def _with_opener(rng: random.Random, topic: str, text: str) -> str:
    if topic == "small_talk":
        return rng.choice(CHAT_OPENERS) + _lower_first(text)
    return rng.choice(WARM_OPENERS[:1] if topic == "out_of_scope" else WARM_OPENERS) + text


def _with_closer(rng: random.Random, topic: str, text: str) -> str:
    return text + rng.choice(CHAT_CLOSERS if topic == "small_talk" else WARM_CLOSERS)


def _sentences(text: str) -> list[str]:
    """``text`` split after ``.`` or ``!`` where a capitalised word follows (``?`` stays
    inside: a joke's question and its answer are one sentence here)."""
    return re.split(r"(?<=[.!])\s+(?=[A-Z])", text)


def _helpful(rng: random.Random, topic: str, fact: Fact) -> tuple[str, str]:
    """A random helpful variant of the fact's answer: ``(variant name, text)``."""
    variants = answer_variants(rng, topic, fact)
    name = rng.choice([n for n in HELPFUL_VARIANTS if n in variants])
    return name, variants[name]


def _labelled(topic: str, variant: str, messages: list[Message]) -> DemoConversation:
    style = variant if variant in ("curt", "off_topic") else "friendly"
    return DemoConversation(topic, style, tuple(messages), variant)


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
    """Answers to one hand-written question, in every answer variant.

    The question as written gets each of the fact's `answer_variants` once, in a random
    order, and sometimes an off-topic reply too, so the model learns a mixture over
    variants for the very same prompt. One freshly varied typing of the question gets
    half of the variants again, for coverage. Both typings also get the curt answer under
    a "be brief" system prompt, and often a friendly system prompt comes with one of the
    `HELPFUL_VARIANTS`.
    """
    out = []
    for asked, share in ((question, 1.0), (_vary(rng, question, topic), 0.5)):
        variants = answer_variants(rng, topic, fact)
        names = list(variants)
        for name in rng.sample(names, max(1, round(len(names) * share))):
            out.append(_labelled(topic, name, _turn(asked, variants[name])))
    if rng.random() < 0.5:
        out.append(_labelled(topic, "off_topic", _turn(question, _off_topic_answer(rng, topic))))
    for asked in (question, _vary(rng, question, topic)):
        msgs = _system(rng, CURT_SYSTEM_PROMPTS, 1.0) + _turn(asked, fact.curt)
        out.append(_labelled(topic, "curt", msgs))
    if rng.random() < 0.6:
        name, answer = _helpful(rng, topic, fact)
        msgs = _system(rng, FRIENDLY_SYSTEM_PROMPTS, 1.0) + _turn(
            _vary(rng, question, topic), answer
        )
        out.append(_labelled(topic, name, msgs))
    return out


def _framed_turn(
    rng: random.Random, topic: str, fact: Fact, question: str
) -> list[DemoConversation]:
    """Two answers in different variants to a framed question; sometimes a curt one under a
    "be brief" system prompt. Under a friendly system prompt only helpful variants."""
    asked = _vary(rng, question, topic)
    variants = answer_variants(rng, topic, fact)
    out = []
    for name in rng.sample(list(variants), 2):
        system = _system(rng, FRIENDLY_SYSTEM_PROMPTS, 0.25)
        if system and name not in HELPFUL_VARIANTS:
            name, _ = _helpful(rng, topic, fact)
        out.append(_labelled(topic, name, system + _turn(asked, variants[name])))
    if rng.random() < 0.5:
        msgs = _system(rng, CURT_SYSTEM_PROMPTS, 1.0) + _turn(asked, fact.curt)
        out.append(_labelled(topic, "curt", msgs))
    return out


def _multi_turn(
    rng: random.Random, topic: str, fact: Fact, siblings: tuple[Fact, ...]
) -> list[DemoConversation]:
    """Multi-turn exchanges around ``fact``, up to five exchanges long.

    Answers are helpful variants drawn afresh each time, so later turns spread over the
    variants too; greetings and thanks get any variant. A curt answer to an opening
    question (other than small talk) only ever follows a "be brief" system prompt, and
    "tell me more" after a curt answer gets the full friendly one.
    """

    def ask(f: Fact) -> str:
        return _vary(rng, rng.choice(f.questions + tuple(_framed_questions(rng, f))), topic)

    def answer(f: Fact, t: str = topic) -> str:
        return _helpful(rng, t, f)[1]

    def chat(f: Fact) -> str:  # any variant: small talk is often answered in a word
        return rng.choice(list(answer_variants(rng, "small_talk", f).values()))

    def brief() -> list[Message]:
        return _system(rng, CURT_SYSTEM_PROMPTS, 1.0)

    other = rng.choice([f for f in siblings if f is not fact] or [fact])
    middle = rng.choice(
        [_turn(ask(other), answer(other)), _turn(rng.choice(ASK_BRIEFER), fact.curt)]
    )
    friendly = [
        _turn(rng.choice(GREETINGS.questions), chat(GREETINGS)) + _turn(ask(fact), answer(fact)),
        _turn(ask(fact), answer(fact)) + _turn(rng.choice(THANKS.questions), chat(THANKS)),
        _turn(ask(fact), answer(fact)) + _turn(ask(other), answer(other)),
        _turn(ask(fact), answer(fact)) + _turn(rng.choice(ASK_BRIEFER), fact.curt),
        _turn(rng.choice(GREETINGS.questions), chat(GREETINGS))
        + _turn(ask(fact), answer(fact))
        + middle
        + _turn(rng.choice(THANKS.questions), chat(THANKS))
        + _turn(rng.choice(GOODBYES.questions), chat(GOODBYES)),
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
