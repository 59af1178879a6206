"""Sign-in attempts are limited per account and per client address, on the chat page's
login and the operator console's alike (over HTTP, against the real served app)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from live_server import live_server
from tiny_models import make_tiny_model

from chat_app.console import CONSOLE_PATH
from chat_app.login_limit import LoginLimiter


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("login")
    model = make_tiny_model(root / "model")
    with live_server(model, root / "data", users="alice:alice-pw,bob:bob-pw",
                     operator_user="ops", operator_password="ops-password-1",
                     login_max_failures=3, login_lockout_seconds=30) as srv:
        yield srv


def sign_in(base: str, user: str, password: str) -> httpx.Response:
    return httpx.post(base + "/login", data={"username": user, "password": password})


def test_an_account_is_locked_after_repeated_failures_then_the_rest_still_work(server):
    for _ in range(3):
        assert sign_in(server.url, "alice", "wrong").status_code == 400
    locked = sign_in(server.url, "alice", "alice-pw")  # the right password waits too
    assert locked.status_code == 429
    assert int(locked.headers["retry-after"]) in range(1, 31)
    assert "try again in" in locked.json()["detail"]
    assert sign_in(server.url, "ALICE ", "wrong").status_code == 429  # the same account
    ok = sign_in(server.url, "bob", "bob-pw")  # another account from the same address
    assert ok.status_code == 200 and ok.cookies
    # the console's login counts the same way, for its own account
    console = server.url + CONSOLE_PATH
    for _ in range(3):
        assert sign_in(console, "ops", "nope").status_code == 400
    assert sign_in(console, "ops", "ops-password-1").status_code == 429


def test_success_clears_failures_and_an_address_has_a_wider_limit() -> None:
    now = [0.0]
    statuses = {("carol", "pw"): 200}

    async def app(scope, receive, send):  # the login form: 200 or 400
        body = (await receive())["body"].decode()
        fields = dict(part.split("=") for part in body.split("&"))
        code = statuses.get((fields["username"], fields["password"]), 400)
        await send({"type": "http.response.start", "status": code, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    limiter = LoginLimiter(app, max_failures=2, window_s=10, lockout_s=5, address_factor=2,
                           clock=lambda: now[0])

    def attempt(user: str, password: str, host: str = "10.0.0.1") -> int:
        sent: list[dict] = []
        body = f"username={user}&password={password}".encode()

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/login", "client": (host, 1)}
        asyncio.run(limiter(scope, receive, send))
        return sent[0]["status"]

    assert [attempt("carol", "x"), attempt("carol", "pw")] == [400, 200]
    assert [attempt("carol", "x"), attempt("carol", "x"), attempt("carol", "pw")] == [
        400, 400, 429]  # the success before cleared the count; two new failures lock
    now[0] = 6.0  # the lockout is over
    assert attempt("carol", "pw") == 200
    # four failures from one address over two accounts lock the address for everyone
    for user in ("dan", "erin", "dan", "erin"):
        now[0] += 0.1
        attempt(user, "x")
    assert attempt("frank", "x") == 429 and attempt("frank", "x", host="10.0.0.2") == 400
    now[0] += 20  # outside the window: the old failures no longer count
    assert attempt("carol", "pw") == 200
