"""The questions simulated users ask (``train``) and the held-out paraphrases the served model
is measured on (``heldout``), built from the demo model's facts (``corpus_data.TOPICS``).

For every fact, its last question and its subjects/tasks in the last three question frames
(``SUBJECT_FRAMES[-3:]``, ``TASK_FRAMES[-3:]``) are held out; the other questions and the
other frames are what users ask. No held-out prompt equals a train prompt once both are
normalised (lower case, punctuation and repeated spaces removed): the gains measured on
``heldout`` are on wordings no user ever rated.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from chat_app.demo_model.corpus_data import SUBJECT_FRAMES, TASK_FRAMES, TOPICS

HELDOUT_FRAMES = 3


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def _framed(frame: str, phrase: str) -> str:
    text = frame.format(phrase)
    return text[0].upper() + text[1:]


@dataclass(frozen=True)
class PromptSets:
    """``train`` grouped by fact (users pick a fact, then one of its wordings, so facts
    with many subjects do not crowd out the rest); ``heldout`` flat."""

    train: tuple[tuple[str, ...], ...]
    heldout: tuple[str, ...]

    def pick_train(self, rng: random.Random) -> str:
        return rng.choice(rng.choice(self.train))

    @property
    def train_count(self) -> int:
        return sum(len(group) for group in self.train)


def build_prompt_sets(heldout_size: int, *, seed: int = 0) -> PromptSets:
    """``heldout_size`` held-out prompts drawn evenly over the facts (at most one question
    and one framed phrase per fact), and every train prompt."""
    train_groups: list[list[str]] = []
    per_fact: list[list[str]] = []
    for facts in TOPICS.values():
        for fact in facts:
            train: list[str] = []
            held: list[str] = []
            if len(fact.questions) > 1:
                held.append(fact.questions[-1])
                train += fact.questions[:-1]
            else:
                train += fact.questions
            for k, (phrases, frames) in enumerate(((fact.subjects, SUBJECT_FRAMES),
                                                   (fact.tasks, TASK_FRAMES))):
                for i, phrase in enumerate(phrases):
                    train += [_framed(f, phrase) for f in frames[:-HELDOUT_FRAMES]]
                    if i == 0:
                        unseen = frames[-HELDOUT_FRAMES:]
                        held.append(_framed(unseen[(len(per_fact) + k) % len(unseen)], phrase))
            per_fact.append(held)
            train_groups.append(train)
    rng = random.Random(seed)
    for held in per_fact:
        rng.shuffle(held)
    rng.shuffle(per_fact)
    heldout: list[str] = []
    depth = 0
    while len(heldout) < heldout_size and any(len(h) > depth for h in per_fact):
        heldout += [h[depth] for h in per_fact if len(h) > depth]
        depth += 1
    heldout = list(dict.fromkeys(heldout))[:heldout_size]
    held_keys = {normalise(p) for p in heldout}
    groups = [tuple(dict.fromkeys(p for p in g if normalise(p) not in held_keys))
              for g in train_groups]
    groups = [g for g in groups if g]
    assert not held_keys & {normalise(p) for g in groups for p in g}, "held-out prompt in train"
    return PromptSets(tuple(groups), tuple(heldout))
