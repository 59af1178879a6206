"""Sign-in attempts limited per account and per client address.

An ASGI middleware in front of the whole served app: it watches ``POST .../login``
(the chat page's login form and the operator console's alike; Gradio posts
``username`` and ``password`` form-encoded) and counts the failed ones (any answer
but 200) in a sliding window, per account name and per client address. An account
with ``max_failures`` failures in ``window_s``, or an address with
``address_factor`` times as many (one address may front many people), is refused for
``lockout_s`` from its last failure: ``429`` with ``Retry-After`` and a body that
says "try again in N s" (a right password does not get through meanwhile). A
successful sign-in clears its account's failures.

The counts live in this process: with several replicas each keeps its own, so the
limit per replica is what is stated (a shared limit would go in the database).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

ASGIApp = Callable[..., Any]
MAX_FORM_BYTES = 64 * 1024


class LoginLimiter:
    def __init__(self, app: ASGIApp, *, max_failures: int = 5, window_s: float = 300.0,
                 lockout_s: float = 60.0, address_factor: int = 4,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.max_failures, self.window_s, self.lockout_s = max_failures, window_s, lockout_s
        self.address_factor = address_factor
        self.clock = clock
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" \
                or not scope["path"].rstrip("/").endswith("/login"):
            await self.app(scope, receive, send)
            return
        body, receive = await _buffer(receive)
        form = parse_qs(body.decode("utf-8", "replace")) if body else {}
        account = "account:" + (form.get("username") or [""])[0].strip().lower()
        address = "address:" + ((scope.get("client") or ("?", 0))[0])
        wait = self.wait_seconds(account, address)
        if wait > 0:
            await _refuse(send, wait)
            return
        status: list[int] = []

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self.app(scope, receive, watch)
        if status and status[0] == 200:
            with self._lock:
                self._failures.pop(account, None)
        elif status:
            now = self.clock()
            with self._lock:
                self._failures[account].append(now)
                self._failures[address].append(now)

    def wait_seconds(self, account: str, address: str) -> float:
        """Seconds before ``account`` from ``address`` may try again (0: now)."""
        now = self.clock()
        wait = 0.0
        with self._lock:
            for key, limit in ((account, self.max_failures),
                               (address, self.max_failures * self.address_factor)):
                times = self._failures.get(key)
                if not times:
                    continue
                while times and now - times[0] > self.window_s:
                    times.popleft()
                if len(times) >= limit:
                    wait = max(wait, times[-1] + self.lockout_s - now)
        return wait


async def _buffer(receive: Callable) -> tuple[bytes, Callable]:
    """Read the request body (up to MAX_FORM_BYTES) and a ``receive`` that replays it."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= MAX_FORM_BYTES:
            chunks.append(chunk)
        more = message.get("more_body", False)
    body = b"".join(chunks)
    sent = [False]

    async def replay() -> dict:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


async def _refuse(send: Callable, wait: float) -> None:
    seconds = max(1, math.ceil(wait))
    body = json.dumps({"detail": f"Too many failed sign-in attempts; try again in "
                                 f"{seconds} s."}).encode()
    await send({"type": "http.response.start", "status": 429,
                "headers": [(b"content-type", b"application/json"),
                            (b"retry-after", str(seconds).encode()),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
