"""Over HTTP, against the real served app: sign-ins on the chat page and the console
expire after the idle time, and a user's API key ('name:key') reaches that user's
conversations and replies only, whatever ids it sends."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from live_server import live_server
from tiny_models import make_tiny_model

from chat_app.console import CONSOLE_PATH
from chat_app.idle_sessions import IdleSessions

IDLE_S = 3.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("sessions")
    model = make_tiny_model(root / "model")
    with live_server(model, root / "data", users="alice:alice-pw,bob:bob-pw",
                     operator_user="ops", operator_password="ops-password-1",
                     session_idle_minutes=IDLE_S / 60,
                     api_keys="alice:key-a,bob:key-b,service-key") as srv:
        yield srv


def signed_in(base: str, user: str, password: str) -> httpx.Client:
    client = httpx.Client(base_url=base, timeout=30)
    r = client.post("/login", data={"username": user, "password": password})
    assert r.status_code == 200, r.text
    return client


def test_a_sign_in_expires_after_the_idle_time_and_use_keeps_it(server):
    for base, (user, password) in ((server.url, ("alice", "alice-pw")),
                                   (server.url + CONSOLE_PATH, ("ops", "ops-password-1"))):
        client = signed_in(base, user, password)
        assert client.get("/gradio_api/login_check").status_code == 200
        for _ in range(3):  # used more often than the idle time: it stays valid
            time.sleep(IDLE_S / 3)
            assert client.get("/gradio_api/login_check").status_code == 200
        time.sleep(IDLE_S + 1)  # left alone: it is gone
        assert client.get("/gradio_api/login_check").status_code == 401
        assert client.get("/gradio_api/login_check").status_code == 401
        again = signed_in(base, user, password)  # signing in again works
        assert again.get("/gradio_api/login_check").status_code == 200
    console = httpx.Client(base_url=server.url + CONSOLE_PATH, timeout=30)
    assert console.get("/config").status_code == 401  # never signed in


def test_the_idle_clock_starts_at_sign_in_and_ignores_the_heartbeat() -> None:
    now = [0.0]

    class App:
        cookie_id = "c"
        tokens: dict = {}

        async def __call__(self, scope, receive, send):
            if scope["path"] == "/login":
                self.tokens["t1"] = "alice"

    import asyncio

    wrapped = IdleSessions(App(), idle_s=10, clock=lambda: now[0])
    cookie = [(b"cookie", b"access-token-c=t1")]

    def call(path: str, method: str = "GET") -> None:
        asyncio.run(wrapped({"type": "http", "method": method, "path": path,
                             "headers": cookie}, None, None))

    call("/login", "POST")
    now[0] = 8.0
    call("/heartbeat/abc")  # an open tab, no one there
    assert "t1" in App.tokens
    now[0] = 11.0
    call("/config")
    assert "t1" not in App.tokens


def ask(base: str, key: str, **body) -> httpx.Response:
    return httpx.post(base + "/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {key}"},
                      json={"messages": [{"role": "user", "content": "hello"}],
                            "max_tokens": 4, **body})


def test_a_users_api_key_reaches_only_that_users_conversations(server):
    base, store = server.url, server.services.store
    a = ask(base, "key-a").json()
    b = ask(base, "key-b").json()
    a_conv, a_reply = a["conversation_id"], int(a["id"])
    b_conv, b_reply = b["conversation_id"], int(b["id"])
    assert store.get_conversation(a_conv).user_id == "alice"
    assert store.get_conversation(b_conv).user_id == "bob"
    events = len(store.events_for(a_reply))
    messages = len(store.context(a_reply))

    def with_key(key: str):
        return {"Authorization": f"Bearer {key}"}

    # bob, whatever ids he sends, cannot continue, read, rate, edit, regenerate or pick
    # alice's: the answer is the one for an id that does not exist
    refused = [
        ask(base, "key-b", conversation_id=a_conv),
        httpx.get(f"{base}/v1/replies/{a_reply}", headers=with_key("key-b")),
        httpx.post(f"{base}/v1/feedback", headers=with_key("key-b"),
                   json={"reply_id": a_reply, "rating": "down"}),
        httpx.post(f"{base}/v1/replies/{a_reply}/edit", headers=with_key("key-b"),
                   json={"content": "mine now"}),
        httpx.post(f"{base}/v1/replies/{a_reply}/regenerate", headers=with_key("key-b"),
                   json={}),
        httpx.post(f"{base}/v1/preferences", headers=with_key("key-b"),
                   json={"chosen_id": b_reply, "rejected_id": a_reply}),
    ]
    for r in refused:
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "not_found"
    unknown = httpx.get(f"{base}/v1/replies/999999", headers=with_key("key-b"))
    assert unknown.status_code == 404
    assert refused[1].json()["error"]["message"] == \
        unknown.json()["error"]["message"].replace("999999", str(a_reply))
    assert len(store.events_for(a_reply)) == events  # nothing was written
    assert len(store.context(a_reply)) == messages
    assert len(store.siblings(a_reply)) == 1

    # a key cannot speak for another user either
    r = ask(base, "key-b", user="alice")
    assert r.status_code == 403 and r.json()["error"]["code"] == "user_mismatch"

    # each reaches its own
    assert ask(base, "key-a", conversation_id=a_conv).status_code == 200
    ok = httpx.post(f"{base}/v1/feedback", headers=with_key("key-a"),
                    json={"reply_id": a_reply, "rating": "up"})
    assert ok.status_code == 200 and ok.json()["event"]["user_id"] == "alice"
    assert httpx.get(f"{base}/v1/replies/{a_reply}", headers=with_key("key-a")).status_code \
        == 200
    # a plain key is a trusted program: it names the user in each request, as before
    r = ask(base, "service-key", user="carol")
    assert r.status_code == 200
    assert store.get_conversation(r.json()["conversation_id"]).user_id == "carol"


class PageSession:
    """One browser tab of the chat page, spoken to as the page does: Gradio's queue over
    HTTP (join, then the event stream), with a sign-in cookie. Any event of the page can
    be sent, the private ones too, with whatever data the sender likes."""

    def __init__(self, base: str, user: str, password: str) -> None:
        self.base = base
        self.client = signed_in(base, user, password)
        self.config = self.client.get("/config").json()
        self.hash = f"{user}-{time.monotonic_ns()}"
        self.fire("new-chat", "click")  # the tab's state, as the page's load makes it

    def component(self, elem_id: str) -> int:
        return next(c["id"] for c in self.config["components"]
                    if c.get("props", {}).get("elem_id") == elem_id)

    def fire(self, elem_id: str, event: str, *values: object) -> str:
        """Send ``event`` of the component ``elem_id`` with ``values`` after the session
        state; return everything the server answered (the outputs, as JSON text)."""
        target = self.component(elem_id)
        dep = next(d for d in self.config["dependencies"] if [target, event] in d["targets"])
        data = [None, *values]
        assert len(data) == len(dep["inputs"]), (elem_id, event, dep["inputs"])
        joined = self.client.post("/gradio_api/queue/join", json={
            "data": data, "fn_index": dep["id"], "trigger_id": target,
            "session_hash": self.hash, "event_data": None})
        assert joined.status_code == 200, joined.text
        answers = []
        with self.client.stream("GET", "/gradio_api/queue/data",
                                params={"session_hash": self.hash}, timeout=120) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                answers.append(message)
                if message.get("msg") == "process_completed":
                    break
        assert answers and answers[-1].get("msg") == "process_completed", answers[-1:]
        self.ok = answers[-1].get("success", True)
        return json.dumps(answers)


def test_through_the_page_neither_user_reaches_the_others_chats(server):
    store = server.services.store
    bob = PageSession(server.url, "bob", "bob-pw")
    bob.fire("send", "click", "Bob's secret plan", "")
    bobs = [c for c in store.list_conversations(user_id="bob") if "secret" in c.title]
    assert [c.title for c in bobs] == ["Bob's secret plan"]
    bob_chat = bobs[0].id
    before = store.messages(bob_chat)

    alice = PageSession(server.url, "alice", "alice-pw")
    # open bob's chat by its id (the list's own event, sent by hand): Gradio refuses an
    # id that is not among the choices it gave this tab (alice's own chats)
    alice.fire("chat-search", "change", "")
    answer = alice.fire("chat-list", "input", bob_chat)
    assert not alice.ok and "not in the list of choices" in answer
    assert "secret plan" not in answer
    # and act on whatever the tab has open now: nothing of bob's
    alice.fire("chat-title", "submit", "Mine now")
    alice.fire("confirm-delete-yes", "click")
    listed = alice.fire("chat-search", "change", "secret")
    assert "secret plan" not in listed
    assert store.get_conversation(bob_chat).title is None  # not renamed
    assert store.get_conversation(bob_chat).deleted_at is None  # not deleted
    assert store.messages(bob_chat) == before
    # "delete all my data" on alice's tab leaves bob's chat alone
    alice.fire("confirm-forget-yes", "click")
    assert store.messages(bob_chat) == before
    # bob still has it, and can open it (signed in again: this server's idle time is 3 s)
    bob = PageSession(server.url, "bob", "bob-pw")
    assert "secret plan" in bob.fire("chat-search", "change", "")  # listed for him
    assert "secret plan" in bob.fire("chat-list", "input", bob_chat)
    assert bob.ok
