"""Mount the operator console on the served app, behind the operator login.

``mount_console(app, services)`` mounts the console at ``/console`` with Gradio's
login (``settings.operator_user`` / ``operator_password``): the page, its config, its
Gradio API and its files answer 401 (or the login page) to anyone not logged in as
the operator; a chat user's login, made on the chat page, is not valid here (each
mounted Gradio app keeps its own session tokens). Without operator credentials the
console is not built at all: ``/console`` answers 403 with a page saying how to turn
it on. Exports are written to a private folder that only the console serves.

Gradio itself checks the login on its data routes only (a few, such as
``/gradio_api/startup-events``, ``/cancel`` or ``/heartbeat``, answer anyone), so the
console's mount is wrapped in ``OperatorGate``: a request without the operator's
session token reaches only the login page, the login form and static assets.

It may be called before or after the chat page is mounted at ``/``: the console's
route is placed ahead of that catch-all mount either way.
"""

from __future__ import annotations

import html
import json
from http.cookies import SimpleCookie
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.routing import BaseRoute, Mount
from starlette.types import ASGIApp, Receive, Scope, Send

CONSOLE_PATH = "/console"
DISABLED_STATUS = 403
DISABLED_PAGE = """<!doctype html><html><head><title>Operator console disabled</title></head>
<body style="font-family:sans-serif;max-width:40em;margin:3em auto">
<h1>The operator console is disabled</h1>
<p>Set <code>FEEDBACK_CHAT_OPERATOR_USER</code> and <code>FEEDBACK_CHAT_OPERATOR_PASSWORD</code>
(or <code>--operator-user</code> / <code>--operator-password</code>) and restart the server to
turn it on at <code>{path}/</code>.</p></body></html>"""


def mount_console(
    app: FastAPI,
    services: Any,
    *,
    path: str = CONSOLE_PATH,
    retrain_settings: Any | None = None,
) -> bool:
    """Mount the console at ``path``; returns True if mounted, False if disabled.

    ``retrain_settings``: see ``build_console`` (default: those of ``feedback-chat
    retrain``).
    """
    settings = services.settings
    before = len(app.router.routes)
    if not (settings.operator_user and settings.operator_password):
        page = DISABLED_PAGE.format(path=html.escape(path))

        def disabled(rest: str = "") -> HTMLResponse:
            return HTMLResponse(page, status_code=DISABLED_STATUS)

        for route in (path, path + "/", path + "/{rest:path}"):
            app.add_api_route(route, disabled, methods=["GET", "POST", "HEAD"],
                              include_in_schema=False)
        _ahead_of_root_mount(app, before)
        return False

    import gradio as gr

    from ..idle_sessions import IdleSessions
    from .page import build_console

    console = build_console(services=services, retrain_settings=retrain_settings)
    ctx = console.console_context  # type: ignore[attr-defined]
    ctx.export_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    console.queue(default_concurrency_limit=4)
    message = "Operator console: sign in with the operator login."
    gr.mount_gradio_app(
        app, console, path=path, auth=(settings.operator_user, settings.operator_password),
        auth_message=message, allowed_paths=[str(ctx.export_dir)], run_history=False,
        footer_links=["gradio", "settings"],
    )
    for route in app.router.routes[before:]:
        if isinstance(route, Mount) and route.path == path.rstrip("/"):
            route.app = OperatorGate(
                IdleSessions(route.app, idle_s=settings.session_idle_minutes * 60),
                auth_message=message)
    app.add_api_route(path, lambda: RedirectResponse(path + "/"), methods=["GET", "HEAD"],
                      include_in_schema=False)
    _ahead_of_root_mount(app, before)
    return True


# Paths (relative to the mount) that answer without a login: the login page and what
# it loads. Everything else needs the operator's session token.
PUBLIC_PATHS = frozenset({"", "/", "/login", "/login/", "/logout", "/theme.css",
                          "/favicon.ico", "/manifest.json", "/robots.txt"})
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")


class OperatorGate:
    """ASGI wrapper of a Gradio app mounted with ``auth``: refuse (401) every request
    outside PUBLIC_PATHS/PUBLIC_PREFIXES that carries no session token of that app.

    The token is Gradio's own (``access-token-<cookie_id>`` cookie, checked against the
    app's ``tokens``), so logging in and out work as Gradio's login page does them.
    """

    def __init__(self, app: ASGIApp, *, auth_message: str) -> None:
        self.app = app
        self.body = json.dumps({"detail": {"error": "Not authenticated",
                                           "auth_message": auth_message}}).encode()

    def _logged_in(self, scope: Scope) -> bool:
        raw = b"; ".join(v for k, v in scope.get("headers", ()) if k == b"cookie")
        cookies = SimpleCookie()
        try:
            cookies.load(raw.decode("latin-1"))
        except Exception:  # a malformed Cookie header is no login
            return False
        cookie_id = getattr(self.app, "cookie_id", None)
        tokens = getattr(self.app, "tokens", {})
        for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
            if name in cookies and cookies[name].value in tokens:
                return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            root = scope.get("root_path", "")
            path = scope["path"][len(root):] if scope["path"].startswith(root) else scope["path"]
            public = path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
            if not public and not self._logged_in(scope):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(self.body)).encode())]})
                await send({"type": "http.response.body", "body": self.body})
                return
        await self.app(scope, receive, send)


def _ahead_of_root_mount(app: FastAPI, before: int) -> None:
    """Move the routes added since index ``before`` ahead of a mount at "/" (which
    would otherwise answer every path, the console's included)."""
    routes: list[BaseRoute] = app.router.routes
    added = routes[before:]
    del routes[before:]
    root = next((i for i, r in enumerate(routes) if isinstance(r, Mount) and r.path == ""), None)
    if root is None:
        routes.extend(added)
    else:
        routes[root:root] = added
