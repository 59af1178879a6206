"""Streaming text out of token ids: whole characters only, and stop strings held back.

``IncrementalDecoder`` decodes a window of recent tokens twice (with and without the newest
ones) and emits the difference, so multi-token characters of byte-level BPE are emitted once
complete (a trailing U+FFFD means "incomplete, wait") and tokenizers that drop a leading
space when decoding a lone token still get their spaces right. A NUL that a byte-level
tokenizer decodes becomes U+FFFD: a client must be able to send a reply back as history,
and no SQL text column holds a NUL, so what is streamed is what is stored.

``StopFilter`` holds back the end of the text that could still become a stop string, so a
stop string is never emitted, not even in part.
"""

from __future__ import annotations

from typing import Any

_INCOMPLETE = "\ufffd"


class IncrementalDecoder:
    """Feed token ids one at a time; get back the new text they complete."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: a point where the decoded text was complete
        self._read = 0  # tokens up to here have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True).replace("\x00", _INCOMPLETE)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (often '', or several characters)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(_INCOMPLETE):
            new = full_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
            return new
        return ""

    def flush(self) -> str:
        """The text still held (an incomplete character at the very end), as decoded."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text) :]


class StopFilter:
    """Pass text through, cutting it before the first stop string.

    ``push`` returns ``(text to emit, stopped)``. Once stopped, nothing more is emitted.
    """

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        """Add decoded text; return what is safe to emit and whether a stop string was seen."""
        if self.stopped:
            return "", True
        if not self._stops:
            return text, False
        pending = self._held + text
        cut = min((i for i in (pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held, self.stopped = "", True
            return pending[:cut], True
        keep = self._longest_stop_prefix_suffix(pending)
        self._held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep], False

    def flush(self) -> str:
        """At the end of generation, the held text was not a stop string after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest end of ``text`` that is a proper start of a stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
