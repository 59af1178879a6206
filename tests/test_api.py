"""The HTTP API through the official `openai` client, unchanged, against a live server."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from live_server import live_server
from tiny_models import make_tiny_model

from feedback_store import build_dpo_rows, build_kto_rows
from feedback_store.export import export


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    model = make_tiny_model(root / "model")
    with live_server(model, root / "data", api_keys="key-one,key-two") as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="key-one", max_retries=0)


def test_plain_completion_is_stored_with_its_version_and_rated(server, client):
    store = server.services.store
    r = client.chat.completions.create(
        model="anything", messages=[{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hello there"}],
        max_tokens=12, temperature=0)
    reply = store.get_message(int(r.id))
    assert reply.role == "assistant" and reply.content == r.choices[0].message.content
    assert reply.adapter_version == "base" and r.model.endswith(":base")
    assert r.usage.completion_tokens == reply.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert store.get_conversation(reply.conversation_id).system_prompt == "Be brief."

    ev = httpx.post(server.url + "/v1/feedback", headers={"Authorization": "Bearer key-two"},
                    json={"reply_id": r.id, "rating": "down", "comment": "too short",
                          "tags": ["brevity"]})
    assert ev.status_code == 200, ev.text
    assert ev.json()["event"]["kind"] == "down"
    rows = build_kto_rows(store, with_ids=True)
    assert any(row["reply_id"] == int(r.id) and row["label"] is False for row in rows)


def test_streamed_completion_then_edit_regenerate_and_choice(server, client, tmp_path):
    store = server.services.store
    chunks = list(client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Tell me about cats"}],
        max_tokens=16, temperature=0.8, seed=3, stream=True,
        stream_options={"include_usage": True}))
    ids = {c.id for c in chunks}
    assert len(ids) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None
    reply = store.get_message(int(ids.pop()))
    assert reply.content == text and reply.finish_reason in ("stop", "length")

    h = {"Authorization": "Bearer key-one"}
    e = httpx.post(f"{server.url}/v1/replies/{reply.id}/edit", headers=h,
                   json={"content": "Cats are small, curious animals."})
    assert e.status_code == 200, e.text
    edited = e.json()["reply"]
    assert edited["source_reply_id"] == reply.id and store.get_message(reply.id).content == text

    g = httpx.post(f"{server.url}/v1/replies/{reply.id}/regenerate", headers=h,
                   json={"max_tokens": 8}, timeout=60)
    assert g.status_code == 200, g.text
    sibling = int(g.json()["id"])
    assert store.get_message(sibling).source_reply_id == reply.id
    c = httpx.post(f"{server.url}/v1/preferences", headers=h,
                   json={"chosen_id": sibling, "rejected_id": reply.id})
    assert c.status_code == 200, c.text

    pairs = build_dpo_rows(store, with_ids=True)
    assert {(p["chosen_id"], p["rejected_id"]) for p in pairs} >= {
        (edited["id"], reply.id), (sibling, reply.id)}
    out = tmp_path / "dpo.jsonl"
    export(store, kind="dpo", out=out)
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert {"prompt": [{"role": "user", "content": "Tell me about cats"}],
            "chosen": [{"role": "assistant", "content": "Cats are small, curious animals."}],
            "rejected": [{"role": "assistant", "content": text}]} in exported


def test_a_request_sent_again_with_its_idempotency_key_is_not_repeated(server, client):
    store = server.services.store
    counts = store.counts()
    body = {"messages": [{"role": "user", "content": "Only once, please"}], "max_tokens": 8}
    auth = {"Authorization": "Bearer key-one"}
    first = httpx.post(server.url + "/v1/chat/completions", json=body,
                       headers={**auth, "Idempotency-Key": "chat-1"})
    again = httpx.post(server.url + "/v1/chat/completions", json=body,
                       headers={**auth, "Idempotency-Key": "chat-1"})
    streamed = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": True},
                          headers={**auth, "Idempotency-Key": "chat-1"})
    assert first.status_code == again.status_code == streamed.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["choices"] == first.json()["choices"]
    chunk = json.loads(streamed.text.split("data: ")[1])
    assert chunk["id"] == first.json()["id"]
    assert chunk["choices"][0]["delta"]["content"] == first.json()["choices"][0]["message"][
        "content"]
    assert store.counts()["messages"] == counts["messages"] + 2  # one question, one reply
    rate = {"reply_id": first.json()["id"], "rating": "up"}
    for _ in range(3):
        r = httpx.post(server.url + "/v1/feedback", json=rate,
                       headers={**auth, "Idempotency-Key": "thumb-1"})
        assert r.status_code == 200 and r.json()["event"]["kind"] == "up"
    assert store.counts()["events"] == counts["events"] + 1
    reused = httpx.post(server.url + "/v1/feedback", json={**rate, "rating": "down"},
                        headers={**auth, "Idempotency-Key": "thumb-1"})
    assert reused.status_code == 409 and "different write" in reused.json()["error"]["message"]
    assert store.counts()["events"] == counts["events"] + 1


def test_history_continues_the_same_stored_conversation(server, client):
    store = server.services.store
    first = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "First question"}], max_tokens=6)
    answer = first.choices[0].message.content
    second = client.chat.completions.create(model="x", max_tokens=6, messages=[
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "A follow-up"}])
    a, b = store.get_message(int(first.id)), store.get_message(int(second.id))
    assert a.conversation_id == b.conversation_id
    assert [m.id for m in store.context(b.id)][:2] == [a.parent_id, a.id]

    third = httpx.post(server.url + "/v1/chat/completions",
                       headers={"Authorization": "Bearer key-one"},
                       json={"messages": [{"role": "user", "content": "And then?"}],
                             "conversation_id": a.conversation_id, "max_tokens": 4}, timeout=60)
    assert third.status_code == 200, third.text
    c = store.get_message(int(third.json()["id"]))
    assert c.conversation_id == a.conversation_id
    assert store.context(c.id)[-2].parent_id == b.id


def test_models_lists_the_base_and_active_version(client):
    (m,) = client.models.list().data
    assert m.id.endswith(":base")


@pytest.mark.parametrize("body,status,fragment", [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": ""}]}, 400, "empty"),
    ({"messages": [{"role": "user", "content": "x" * 5000}]}, 400, "too long"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "last message"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
     "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": "hi"}], "conversation_id": 999999}, 404,
     "conversation"),
])
def test_bad_chat_requests_get_openai_errors_and_write_nothing(server, body, status, fragment):
    store = server.services.store
    before = store.counts()
    r = httpx.post(server.url + "/v1/chat/completions", json=body,
                   headers={"Authorization": "Bearer key-one"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in (err["message"] + str(err.get("param"))).lower()
    assert store.counts() == before


@pytest.mark.parametrize("path,body,status", [
    ("/v1/feedback", {"reply_id": 987654, "rating": "up"}, 404),
    ("/v1/feedback", {"reply_id": "abc", "rating": "up"}, 400),
    ("/v1/feedback", {"reply_id": 1, "rating": "meh"}, 400),
    ("/v1/feedback", {"reply_id": 1}, 400),
    ("/v1/replies/987654/edit", {"content": "x"}, 404),
    ("/v1/replies/1/edit", {"content": "   "}, 400),
    ("/v1/replies/-3/regenerate", {}, 400),
    ("/v1/preferences", {"chosen_id": 1, "rejected_id": 1}, 400),
])
def test_bad_feedback_gets_4xx_and_writes_nothing(server, client, path, body, status):
    client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                   max_tokens=2)
    store = server.services.store
    before = store.counts()
    r = httpx.post(server.url + path, json=body, headers={"Authorization": "Bearer key-one"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    assert store.counts() == before


def test_rating_a_user_message_is_refused(server, client):
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hey"}],
                                       max_tokens=2)
    user_msg = server.services.store.get_message(int(r.id)).parent_id
    bad = httpx.post(server.url + "/v1/feedback", headers={"Authorization": "Bearer key-one"},
                     json={"reply_id": user_msg, "rating": "up"})
    assert bad.status_code == 400 and "not a reply" in bad.json()["error"]["message"]


def test_api_keys_are_required_when_configured(server):
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_health_and_metrics(server, client):
    h = httpx.get(server.url + "/healthz").json()
    assert h["status"] == "ok" and h["adapter_version"] == "base"
    client.chat.completions.create(model="x", messages=[{"role": "user", "content": "count me"}],
                                   max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    assert "feedback_chat_generations_total" in text
    assert 'feedback_chat_active_adapter{adapter_version="base"} 1.0' in text
    assert "feedback_chat_feedback_events" in text


def test_openapi_schema_is_served(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"] and "/v1/feedback" in schema["paths"]


def test_streamed_chunks_stay_on_one_line_whatever_the_model_emits():
    """A random model can emit U+2028, U+2029 or U+0085; httpx's iter_lines (and other
    SSE readers using str.splitlines) would cut a chunk there and fail to parse it."""
    import httpx

    from chat_app.api.routes import sse_json

    body = {"delta": {"content": "a\u2028b\u2029c\x85d\x0be\x1cf é ✓"}}
    line = f"data: {sse_json(body)}\n\n"
    decoded = list(httpx.Response(200, content=line.encode()).iter_lines())
    assert [ln for ln in decoded if ln] == [line.strip()]
    assert json.loads(decoded[0][6:]) == body
