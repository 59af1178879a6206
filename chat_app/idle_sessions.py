"""Sign-ins that expire after an idle time, for the Gradio apps mounted with a login
(the chat page and the operator console).

Gradio keeps each app's sessions as tokens (``app.tokens``, set by its login form in
the ``access-token-<cookie_id>`` cookie) that never expire. This ASGI wrapper of such an
app notes when each token was last used; a token unused for ``idle_s`` is removed from
the app at its next use (and from time to time otherwise), so that request and every
later one meet the login page, as after a sign-out. Gradio's heartbeat, which an open
tab keeps up on its own, does not count as use. A token first seen after a sign-in
counts from the sign-in.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.cookies import SimpleCookie
from typing import Any

ASGIApp = Callable[..., Any]


class IdleSessions:
    def __init__(self, app: ASGIApp, *, idle_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.app, self.idle_s, self.clock = app, idle_s, clock
        self.seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:  # cookie_id, tokens, ... of the wrapped app
        return getattr(self.app, name)

    def _tokens(self) -> dict:
        return getattr(self.app, "tokens", None) or {}

    def _cookie_tokens(self, scope: dict) -> list[str]:
        raw = b"; ".join(v for k, v in scope.get("headers", ()) if k == b"cookie")
        cookies = SimpleCookie()
        try:
            cookies.load(raw.decode("latin-1"))
        except Exception:
            return []
        cookie_id = getattr(self.app, "cookie_id", None)
        names = (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}")
        return [cookies[n].value for n in names if n in cookies]

    def sweep(self) -> None:
        """Forget expired tokens; start the clock of tokens not seen before."""
        now = self.clock()
        tokens = self._tokens()
        with self._lock:
            for token in list(tokens):
                last = self.seen.setdefault(token, now)
                if now - last > self.idle_s:
                    tokens.pop(token, None)
                    self.seen.pop(token, None)
            for token in [t for t in self.seen if t not in tokens]:
                del self.seen[token]  # signed out

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket") or self.idle_s <= 0:
            await self.app(scope, receive, send)
            return
        self.sweep()  # an expired token is gone before this request is served
        if "/heartbeat/" not in scope.get("path", ""):
            now = self.clock()
            tokens = self._tokens()
            with self._lock:
                for token in self._cookie_tokens(scope):
                    if token in tokens:
                        self.seen[token] = now
        await self.app(scope, receive, send)
        if scope["type"] == "http" and scope.get("method") == "POST" \
                and scope.get("path", "").rstrip("/").endswith("/login"):
            self.sweep()  # a new sign-in's clock starts now
