"""The feedback-trained reply scorer as a file: what a retraining round writes beside its
adapter (``scorer.json``) and the engine reads to pick the best of several sampled replies.

A round fits the scorer (``retrain.reward_model``) to the users' thumbs and pairs; it is
linear over hashed features of a (prompt, reply) pair, so its whole state is the weights
of the features it has seen and a bias. This module holds the features themselves and a
scorer that needs nothing but the standard library, so the chat server, which must not
import the trainer, scores replies with exactly the function the trainer fitted.

Features of a (prompt, reply) pair, hashed into ``DIMENSIONS`` buckets (each present
feature counts 1, the vector is scaled to unit length):

- the reply's word unigrams and bigrams (lower-cased words and punctuation marks);
- its length in words, bucketed (0, 1-3, 4-7, 8-15, 16-31, 32-63, 64-127, 128+);
- how many ``!`` and ``?`` it has and how many list lines (``-``, ``*``, ``1.``), bucketed;
- the share of the prompt's words (last user message) that the reply repeats, bucketed.

The file is JSON: ``{"format": "hashed-linear-v1", "dimensions": 65536, "bias": b,
"weights": {"index": w, ...}, "accuracy": {...}}`` with only the non-zero weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DIMENSIONS = 2**16
SCORER_FILE = "scorer.json"
FORMAT = "hashed-linear-v1"
_TOKEN = re.compile(r"\w+|[^\w\s]")
_WORD = re.compile(r"\w+")
_LIST_LINE = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+", re.MULTILINE)


def _bucket(n: float, edges: Sequence[float]) -> int:
    """Index of the first edge ``n`` is below (``len(edges)`` when none)."""
    return next((i for i, edge in enumerate(edges) if n < edge), len(edges))


def _hash(feature: str) -> int:
    return int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "big") % (
        DIMENSIONS
    )


def features(prompt: str, reply: str) -> list[int]:
    """The hashed feature indices of ``reply`` answering ``prompt`` (see module doc)."""
    tokens = _TOKEN.findall(reply.lower())
    words = _WORD.findall(reply.lower())
    names = [f"u:{t}" for t in tokens]
    names += [f"b:{a} {b}" for a, b in zip(tokens, tokens[1:], strict=False)]
    names.append(f"len:{_bucket(len(words), (1, 4, 8, 16, 32, 64, 128))}")
    names.append(f"excl:{_bucket(reply.count('!'), (1, 2, 4))}")
    names.append(f"ques:{_bucket(reply.count('?'), (1, 2, 4))}")
    names.append(f"list:{_bucket(len(_LIST_LINE.findall(reply)), (1, 3, 6))}")
    asked = set(_WORD.findall(prompt.lower()))
    if asked:
        overlap = len(asked & set(words)) / len(asked)
        names.append(f"overlap:{_bucket(overlap, (1e-9, 0.2, 0.5, 0.8))}")
    return sorted({_hash(n) for n in names})


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text of the last user message of a conversation ('' when none)."""
    users = [m.get("content", "") for m in messages if m.get("role") == "user"]
    return users[-1] if users else ""


class ReplyScorer:
    """Log-odds that users like a reply: ``w . phi(prompt, reply) + b``."""

    def __init__(self, weights: Mapping[int, float], bias: float,
                 accuracy: Mapping[str, Any] | None = None) -> None:
        self.weights = {int(i): float(w) for i, w in weights.items() if w != 0.0}
        self.bias = float(bias)
        self.accuracy = dict(accuracy or {})

    def log_odds(self, prompt: str, reply: str) -> float:
        index = features(prompt, reply)
        if not index:
            return self.bias
        return sum(self.weights.get(i, 0.0) for i in index) / math.sqrt(len(index)) + self.bias

    def best(self, prompt: str, replies: Sequence[str]) -> int:
        """The index of the reply scored highest (the first of equals)."""
        if not replies:
            raise ValueError("no replies to choose from")
        odds = [self.log_odds(prompt, r) for r in replies]
        return max(range(len(replies)), key=odds.__getitem__)

    def save(self, path: str | Path) -> None:
        payload = {"format": FORMAT, "dimensions": DIMENSIONS, "bias": self.bias,
                   "weights": {str(i): w for i, w in sorted(self.weights.items())},
                   "accuracy": self.accuracy}
        Path(path).write_text(json.dumps(payload), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ReplyScorer:
        """Read a scorer file; ``ValueError`` naming what is wrong when it is not one."""
        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"scorer file {path} is unreadable: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"scorer file {path} is not a {FORMAT} scorer")
        if payload.get("dimensions") != DIMENSIONS:
            raise ValueError(f"scorer file {path} has {payload.get('dimensions')!r} "
                             f"dimensions, {DIMENSIONS} expected")
        weights, bias = payload.get("weights"), payload.get("bias")
        try:
            parsed = {int(i): float(w) for i, w in weights.items()}
            bias = float(bias)
        except (AttributeError, TypeError, ValueError) as exc:
            raise ValueError(f"scorer file {path} has malformed weights: {exc}") from exc
        if not all(0 <= i < DIMENSIONS and math.isfinite(w) for i, w in parsed.items()) \
                or not math.isfinite(bias):
            raise ValueError(f"scorer file {path} has weights out of range or not finite")
        return cls(parsed, bias, payload.get("accuracy") or {})
