"""One reply streamed from an engine server (server-sent events of OpenAI chat
completion chunks), read by a thread of its own, with the in-process ``Generation``'s
face; and the typed errors for an engine server's refusals.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx

from .errors import AdapterError, EngineBusy, InputTooLong

_END = object()


class RemoteGeneration:
    """A reply streamed from an engine server, with the in-process ``Generation``'s face.

    ``prompt_tokens`` and ``trimmed_turns`` are known once the server says them (ours in
    its first chunk, others in the final usage); until then they are 0.
    ``finish_reason``: ``"stop" | "length" | "cancelled" | "error"`` (None while running).
    """

    def __init__(self, response: httpx.Response, version: str, server: str,
                 on_end: Any) -> None:
        self.version = version
        self.server = server
        self.prompt_tokens = 0
        self.trimmed_turns = 0
        self.text = ""
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._response = response
        self._pieces: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._finished = threading.Event()
        self._cancelled = False
        self._done = False
        self._on_end = on_end
        self._started = time.perf_counter()
        self._first: float | None = None
        self._ended: float | None = None
        threading.Thread(target=self._read, daemon=True, name="remote-reply").start()

    @property
    def time_to_first_token(self) -> float | None:
        return None if self._first is None else self._first - self._started

    @property
    def decode_seconds(self) -> float | None:
        if self._first is None or self._ended is None:
            return None
        return self._ended - self._first

    def _read(self) -> None:
        reason, error, seen = None, None, 0
        try:
            for line in self._response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if isinstance(chunk.get("error"), dict):
                    error = str(chunk["error"].get("message") or "engine error")
                    reason = "error"
                    break
                self.prompt_tokens = int(chunk.get("prompt_tokens") or self.prompt_tokens)
                self.trimmed_turns = int(chunk.get("trimmed_turns") or self.trimmed_turns)
                usage = chunk.get("usage") or {}
                if usage:
                    self.prompt_tokens = int(usage.get("prompt_tokens") or self.prompt_tokens)
                    self.completion_tokens = int(usage.get("completion_tokens") or 0)
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        if self._first is None:
                            self._first = time.perf_counter()
                        seen += 1
                        self.text += piece
                        self._pieces.put(piece)
                    if choice.get("finish_reason"):
                        reason = choice["finish_reason"]
        except Exception as exc:  # connection cut, bad JSON: the reply ends here
            if not self._cancelled:
                error = f"the engine server stopped answering: {exc}"
                reason = "error"
        finally:
            self._response.close()
        if self._cancelled:
            reason = "cancelled"
        elif reason is None:
            reason, error = "error", error or "the engine server ended the reply without a reason"
        if not self.completion_tokens:
            self.completion_tokens = seen
        self.finish_reason = reason if reason in ("stop", "length", "cancelled") else "error"
        if self.finish_reason == "error" and error is None:
            error = f"engine finish reason {reason!r}"
        self.error = error
        self._ended = time.perf_counter()
        self._finished.set()
        self._pieces.put(_END)
        self._on_end()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        piece = self._pieces.get()
        if piece is _END:
            self._done = True
            raise StopIteration
        return piece  # type: ignore[return-value]

    def result(self, timeout: float | None = None) -> str:
        if not self._finished.wait(timeout):
            raise TimeoutError(f"generation not finished after {timeout} s")
        for _ in self:
            pass
        return self.text

    def cancel(self) -> None:
        """Stop: close the connection, and the engine server frees the slot."""
        if not self._finished.is_set():
            self._cancelled = True
            self._response.close()

    def close(self) -> None:
        self.cancel()

    def __repr__(self) -> str:
        return (f"RemoteGeneration(version={self.version!r}, server={self.server!r}, "
                f"completion_tokens={self.completion_tokens}, "
                f"finish_reason={self.finish_reason!r})")


def error_message(response: httpx.Response) -> str:
    try:
        response.read()
        body = response.json()
    except Exception:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error.get("detail") or error)
        if "detail" in body:
            return str(body["detail"])
        return str(error)
    return str(body)


def client_error(response: httpx.Response) -> Exception:
    """The typed error for a 4xx answer to a chat completion (the response is closed)."""
    message = error_message(response)
    status = response.status_code
    code = ""
    try:
        error = response.json().get("error", {})
        code = str(error.get("code") or "") if isinstance(error, dict) else ""
    except Exception:
        pass
    response.close()
    if status == 429:
        return EngineBusy(message)
    if code == "context_length_exceeded" or "context length" in message.lower():
        return InputTooLong(0, 0, message)
    if status == 404:
        return AdapterError(message)
    return ValueError(message)
