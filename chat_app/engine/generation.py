"""One reply in progress: the worker's request record and the caller's ``Generation`` handle.

The worker thread holds only the ``Request``; the caller holds the ``Generation``. So when a
caller drops its ``Generation`` (client gone), the handle is garbage collected and its
finaliser flags the request as cancelled; the worker then frees its slot at the next step.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator

import torch

from .detokenize import IncrementalDecoder, StopFilter
from .params import SamplingParams

_END = object()
_ids = itertools.count(1)


class Request:
    """Everything the worker needs for one reply, and the state it reports back."""

    def __init__(
        self,
        *,
        version: str,
        adapter: str | None,
        prompt_ids: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        trimmed_turns: int,
        decoder: IncrementalDecoder,
        generator: torch.Generator | None,
        on_cancel: Callable[[Request], None],
    ) -> None:
        self.id = next(_ids)
        self.version = version
        self.adapter = adapter  # PEFT adapter name serving this reply; None for the base
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.trimmed_turns = trimmed_turns
        self.decoder = decoder
        self.stop_filter = StopFilter(params.stop)
        self.generator = generator
        self.pieces: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.cancel_requested = False  # set from any thread, read by the worker
        self.finished = threading.Event()
        self.text = ""
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.created_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._on_cancel = on_cancel

    def emit(self, piece: str) -> None:
        """Hand a piece of text to the reader (worker thread)."""
        if piece:
            self.text += piece
            self.pieces.put(piece)

    def close(self, reason: str, error: str | None = None) -> None:
        """Record how the reply ended and wake the reader (once; later calls are ignored)."""
        if self.finished.is_set():
            return
        self.finish_reason = reason
        self.error = error
        self.finished_at = time.perf_counter()
        self.finished.set()
        self.pieces.put(_END)

    def cancel(self) -> None:
        """Ask for the reply to stop (any thread); the engine frees its slot."""
        self.cancel_requested = True
        self._on_cancel(self)


class Generation:
    """A reply being generated. Iterate it for text pieces as they are produced.

    ``version``, ``prompt_tokens`` and ``trimmed_turns`` are fixed at creation;
    ``text``, ``completion_tokens`` (tokens sampled, the end token included) and
    ``finish_reason`` (``"stop" | "length" | "cancelled" | "error"``, None while running)
    follow the worker. A ``Generation`` is its own iterator: ``cancel()``/``close()``, or
    dropping the last reference to it (the client went away), stops the generation and frees
    its slot; merely pausing or breaking out of a loop does not. Iterate from one thread.
    """

    def __init__(self, request: Request) -> None:
        self._request = request
        self._done = False
        self.version: str = request.version
        self.prompt_tokens: int = len(request.prompt_ids)
        self.trimmed_turns: int = request.trimmed_turns

    @property
    def text(self) -> str:
        """The reply text produced so far (stop strings excluded)."""
        return self._request.text

    @property
    def completion_tokens(self) -> int:
        return self._request.completion_tokens

    @property
    def finish_reason(self) -> str | None:
        return self._request.finish_reason

    @property
    def error(self) -> str | None:
        """A one-line description when ``finish_reason == "error"``."""
        return self._request.error

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from ``stream()`` to the first sampled token (None before it)."""
        first = self._request.first_token_at
        return None if first is None else first - self._request.created_at

    @property
    def decode_seconds(self) -> float | None:
        """Seconds from the first sampled token to the end (None while running)."""
        first, end = self._request.first_token_at, self._request.finished_at
        return None if first is None or end is None else end - first

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        """The next piece of text, waiting for it; ``StopIteration`` once the reply ended."""
        if self._done:
            raise StopIteration
        piece = self._request.pieces.get()
        if piece is _END:
            self._done = True
            raise StopIteration
        return piece  # type: ignore[return-value]

    def result(self, timeout: float | None = None) -> str:
        """Wait for the end (consuming the pieces) and return the whole text."""
        if not self._request.finished.wait(timeout):
            raise TimeoutError(f"generation not finished after {timeout} s")
        for _ in self:
            pass
        return self.text

    def cancel(self) -> None:
        """Stop generating (client went away); the slot is freed within one step."""
        if not self._request.finished.is_set():
            self._request.cancel()

    def close(self) -> None:
        """Closing the stream is cancelling it (the iterator protocol's name for it)."""
        self.cancel()

    def __del__(self) -> None:
        request = getattr(self, "_request", None)
        if request is not None and not request.finished.is_set():
            request.cancel_requested = True

    def __repr__(self) -> str:
        return (
            f"Generation(version={self.version!r}, prompt_tokens={self.prompt_tokens}, "
            f"completion_tokens={self.completion_tokens}, finish_reason={self.finish_reason!r})"
        )


class RankedGeneration:
    """The best of several replies sampled together, with ``Generation``'s face.

    All the requests run side by side on the engine; when every one has ended, ``choose``
    (the version's reply scorer) picks among those that ended normally (``"stop"``
    preferred to ``"length"``), and the chosen reply's pieces are handed out. Nothing is
    read until then, so ``time_to_first_token`` is the time to that choice.
    ``samples`` is how many replies were drawn and ``sampled_tokens`` their tokens in all.
    """

    def __init__(self, requests: list[Request], choose: Callable[[list[str]], int]) -> None:
        if not requests:
            raise ValueError("a ranked generation needs at least one request")
        self._requests = requests
        self._choose = choose
        self._chosen: Request | None = None
        self._chosen_at: float | None = None
        self._done = False
        first = requests[0]
        self.version: str = first.version
        self.prompt_tokens: int = len(first.prompt_ids)
        self.trimmed_turns: int = first.trimmed_turns
        self.samples: int = len(requests)
        self.chosen_index: int | None = None
        self.candidates: list[str] = []

    def _pick(self, timeout: float | None = None) -> Request:
        if self._chosen is not None:
            return self._chosen
        deadline = None if timeout is None else time.perf_counter() + timeout
        for request in self._requests:
            left = None if deadline is None else max(0.0, deadline - time.perf_counter())
            if not request.finished.wait(left):
                raise TimeoutError(f"generation not finished after {timeout} s")
        self.candidates = [r.text for r in self._requests]
        pool = [i for i, r in enumerate(self._requests) if r.finish_reason == "stop"] or [
            i for i, r in enumerate(self._requests) if r.finish_reason == "length"]
        if not pool:  # every sample failed or was cancelled: report the first
            index = 0
        elif len(pool) == 1:
            index = pool[0]
        else:
            index = pool[self._choose([self._requests[i].text for i in pool])]
        self.chosen_index = index
        self._chosen = self._requests[index]
        self._chosen_at = time.perf_counter()
        return self._chosen

    @property
    def text(self) -> str:
        return "" if self._chosen is None else self._chosen.text

    @property
    def completion_tokens(self) -> int:
        return 0 if self._chosen is None else self._chosen.completion_tokens

    @property
    def sampled_tokens(self) -> int:
        return sum(r.completion_tokens for r in self._requests)

    @property
    def finish_reason(self) -> str | None:
        return None if self._chosen is None else self._chosen.finish_reason

    @property
    def error(self) -> str | None:
        return None if self._chosen is None else self._chosen.error

    @property
    def time_to_first_token(self) -> float | None:
        if self._chosen_at is None:
            return None
        return self._chosen_at - self._requests[0].created_at

    @property
    def decode_seconds(self) -> float | None:
        first = [r.first_token_at for r in self._requests if r.first_token_at is not None]
        ends = [r.finished_at for r in self._requests if r.finished_at is not None]
        if self._chosen is None or not first or len(ends) < len(self._requests):
            return None
        return max(ends) - min(first)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        piece = self._pick().pieces.get()
        if piece is _END:
            self._done = True
            raise StopIteration
        return piece  # type: ignore[return-value]

    def result(self, timeout: float | None = None) -> str:
        self._pick(timeout)
        for _ in self:
            pass
        return self.text

    def cancel(self) -> None:
        for request in self._requests:
            if not request.finished.is_set():
                request.cancel()

    def close(self) -> None:
        self.cancel()

    def __del__(self) -> None:
        for request in getattr(self, "_requests", ()):
            if not request.finished.is_set():
                request.cancel_requested = True

    def __repr__(self) -> str:
        return (
            f"RankedGeneration(version={self.version!r}, samples={self.samples}, "
            f"chosen={self.chosen_index}, finish_reason={self.finish_reason!r})"
        )
