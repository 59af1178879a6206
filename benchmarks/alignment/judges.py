"""Ground-truth judges of a reply, fixed before any tuning of the training or of the benchmark.

Each judge is ``score(prompt, reply) -> float`` in [0, 1] and ``improve(prompt, reply) ->
str``, the edit a simulated user makes to a reply it dislikes (a natural text that ends a
sentence). A simulated user rates "up" when the score is >= 0.5. The training never sees a
judge: it only sees the thumbs, edits and choices the users derive from it.

* ``concise`` (length): 1.0 at <= 12 words, falling linearly to 0.0 at 40 words.
  improve: the first sentence, or, when that is longer, its first 12 words (cut at the
  last comma among them if there is one) ending with a full stop.
* ``calm`` (style): 1.0 when the reply has no "!", else 0.0. improve: every "!" becomes ".".
* ``on_subject`` (content): the question's content words (lower case, letters only, stop
  words removed, >= 4 letters, compared by their first 5 letters) found in the reply:
  ``min(1, hits / min(2, n))`` for ``n`` content words (two hits are enough; 1.0 when the
  question has none). improve: a short opening naming the missing subject words
  ("About pasta and cook: ...").
* ``detailed`` (length, the other way): ``min(1, words / 30)``. improve: a closing sentence
  that offers more (about 20 words) is added.

Two more, written after the defaults were chosen and never used to choose anything, to check
that the loop learns tastes it was not tuned on:

* ``listed`` (format): 1.0 when a line of the reply starts a list item (``- ``, ``* `` or
  ``1. ``), else 0.0. improve: each sentence becomes an item (``- ...`` on its own line).
* ``no_filler`` (phrase avoidance): 0.0 when the reply has a stock pleasantry (``good
  question``, ``great question``, ``sure!``, ``happy to help``, ``hope that helps``, ``hope
  this helps``, ``let me know``), else 1.0. improve: the sentences and openers that hold
  one are taken out (the reply's first sentence stays when nothing else would).

Words are counted by whitespace-separated tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_LETTERS = re.compile(r"[a-z]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

STOPWORDS = frozenset("""
about above after again against also because been before being below between both could
does doing down during each ever every from further have having here into just like make
more most much need only other over please same should some such than that their them then
there these they thing things this those through very want were what when where which while
with would your yours explain tell know question talk help tips best good really today
going anything something someone lets shall might must""".split())


def words(text: str) -> list[str]:
    return text.split()


def content_keys(text: str) -> list[str]:
    """The content words of ``text`` as 5-letter keys, in order, without repeats."""
    keys: list[str] = []
    for word in _LETTERS.findall(text.lower()):
        if len(word) >= 4 and word not in STOPWORDS and word[:5] not in keys:
            keys.append(word[:5])
    return keys


def _end_sentence(text: str) -> str:
    text = text.strip().rstrip(",;:-")
    return text if text.endswith((".", "!", "?")) else text + "."


# ------------------------------------------------------------------------------- concise


def concise_score(prompt: str, reply: str) -> float:
    n = len(words(reply))
    return 1.0 if n <= 12 else max(0.0, (40 - n) / 28)


def concise_improve(prompt: str, reply: str) -> str:
    first = words(_SENTENCE_END.split(reply.strip(), maxsplit=1)[0])
    if len(first) <= 12:
        return _end_sentence(" ".join(first))
    # cut at the last comma of the first 12 words when there is one (a clause ends
    # there), else after the 12th word
    commas = [i for i, w in enumerate(first[:12]) if w.endswith(",") and i >= 3]
    first = first[: commas[-1] + 1] if commas else first[:12]
    return " ".join(first).rstrip(".,;:!?-") + "."


# ---------------------------------------------------------------------------------- calm


def calm_score(prompt: str, reply: str) -> float:
    return 0.0 if "!" in reply else 1.0


def calm_improve(prompt: str, reply: str) -> str:
    return _end_sentence(reply.replace("!", "."))


# ---------------------------------------------------------------------------- on_subject


def on_subject_score(prompt: str, reply: str) -> float:
    keys = content_keys(prompt)
    if not keys:
        return 1.0
    found = {w[:5] for w in _LETTERS.findall(reply.lower())}
    hits = sum(k in found for k in keys)
    return min(1.0, hits / min(2, len(keys)))


def on_subject_improve(prompt: str, reply: str) -> str:
    found = {w[:5] for w in _LETTERS.findall(reply.lower())}
    missing: list[str] = []
    for word in _LETTERS.findall(prompt.lower()):
        if (len(word) >= 4 and word not in STOPWORDS and word[:5] not in found
                and word not in missing):
            missing.append(word)
    if not missing:
        return _end_sentence(reply)
    return _end_sentence(f"About {' and '.join(missing[:2])}: {reply.strip()}")


# ------------------------------------------------------------------------------ detailed


def detailed_score(prompt: str, reply: str) -> float:
    return min(1.0, len(words(reply)) / 30)


def detailed_improve(prompt: str, reply: str) -> str:
    return (_end_sentence(reply) + " I hope this helps, and I am happy to explain any part "
            "of it in more detail if you would like to know more.")


# -------------------------------------------------------------------------------- listed

_LIST_ITEM = re.compile(r"^\s*(?:[-*]|\d+[.)])\s+\S", re.MULTILINE)
_SENTENCES = re.compile(r"(?<=[.!?])\s+(?=\S)")


def listed_score(prompt: str, reply: str) -> float:
    return 1.0 if _LIST_ITEM.search(reply) else 0.0


def listed_improve(prompt: str, reply: str) -> str:
    sentences = [s.strip() for s in _SENTENCES.split(reply.strip()) if s.strip()]
    return "\n".join("- " + _end_sentence(s) for s in sentences or [reply])


# ----------------------------------------------------------------------------- no_filler

FILLERS = ("good question", "great question", "sure!", "happy to help", "hope that helps",
           "hope this helps", "let me know")
_FILLER = re.compile("|".join(re.escape(f) for f in FILLERS), re.IGNORECASE)
# an opener such as "Happy to help: " or "Sure! " before the answer itself
_FILLER_OPENER = re.compile(r"^(?:good question|great question|sure|happy to help)[.!:,]?\s+",
                            re.IGNORECASE)


def no_filler_score(prompt: str, reply: str) -> float:
    return 0.0 if _FILLER.search(reply) else 1.0


def no_filler_improve(prompt: str, reply: str) -> str:
    text = _FILLER_OPENER.sub("", reply.strip())
    kept = [s for s in _SENTENCES.split(text) if s.strip() and not _FILLER.search(s)]
    if not kept:
        kept = [_FILLER.sub("", _SENTENCES.split(text)[0]).strip(" .!,:") or "Here it is"]
    text = " ".join(kept)
    return _end_sentence(text[:1].upper() + text[1:])


@dataclass(frozen=True)
class Judge:
    name: str
    kind: str
    score: Callable[[str, str], float]
    improve: Callable[[str, str], str]


JUDGES: dict[str, Judge] = {
    "concise": Judge("concise", "length", concise_score, concise_improve),
    "calm": Judge("calm", "style", calm_score, calm_improve),
    "on_subject": Judge("on_subject", "content", on_subject_score, on_subject_improve),
    "detailed": Judge("detailed", "length", detailed_score, detailed_improve),
    "listed": Judge("listed", "format", listed_score, listed_improve),
    "no_filler": Judge("no_filler", "phrase", no_filler_score, no_filler_improve),
}
