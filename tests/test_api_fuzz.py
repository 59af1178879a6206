"""Property-based fuzzing of the HTTP API: whatever a client sends, no 5xx and no crash.

Hypothesis generates arbitrary JSON and near-valid OpenAI requests (wrong types,
odd roles, huge numbers, control characters, unknown ids) for every endpoint; each
answer must be a 2xx or a 4xx with an OpenAI-style error body, and the server must
still answer /healthz afterwards.
"""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import live_server
from tiny_models import make_tiny_model

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(
    allow_nan=False, allow_infinity=False) | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
    st.text(max_size=12), kids, max_size=4), max_leaves=12)
ids = st.integers(-5, 2**40) | st.text(max_size=8) | st.none() | st.floats(allow_nan=False, allow_infinity=False)
texts = st.text(max_size=60) | st.just("\x00") | st.just("<script>alert(1)</script>")
message = st.fixed_dictionaries({"role": st.sampled_from(
    ["user", "assistant", "system", "developer", "tool", "", "USER"]) | json_scalars,
    "content": texts | json_values})
chat_body = st.fixed_dictionaries({"messages": st.lists(message, max_size=4) | json_values}, optional={
    "max_tokens": st.integers(-3, 10) | json_scalars,
    "max_completion_tokens": st.integers(-3, 10),
    "temperature": st.floats(allow_nan=False, allow_infinity=False) | json_scalars,
    "top_p": st.floats(allow_nan=False, allow_infinity=False) | json_scalars,
    "stop": texts | st.lists(texts, max_size=6) | json_scalars,
    "stream": st.booleans() | json_scalars,
    "n": st.integers(-1, 3), "seed": st.integers(-5, 2**70) | json_scalars,
    "conversation_id": ids, "user": texts | json_scalars, "model": json_scalars,
    "tools": json_values, "logprobs": json_scalars, "response_format": json_values,
})
feedback_body = st.fixed_dictionaries({}, optional={
    "reply_id": ids, "rating": st.sampled_from(["up", "down", "meh", ""]) | json_scalars,
    "comment": texts | json_scalars, "tags": st.lists(texts, max_size=25) | json_scalars,
    "user": texts | json_scalars})
pref_body = st.fixed_dictionaries({}, optional={"chosen_id": ids, "rejected_id": ids,
                                                "user": json_scalars})
edit_body = st.fixed_dictionaries({}, optional={"content": texts | json_scalars,
                                                "user": json_scalars})
paths = st.sampled_from(["1", "2", "0", "-1", "abc", "99999999999", "3.5", "%00"])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    with live_server(make_tiny_model(root / "model"), root / "data", max_new_tokens=4) as srv:
        # a few real replies so that small ids hit existing rows too
        for i in range(3):
            httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": f"seed {i}"}], "max_tokens": 2})
        yield srv


def check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        assert r.json()["error"]["message"]


FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(body=chat_body | json_values)
def test_chat_completions_never_5xx(server, body):
    check(httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60))


@FUZZ
@given(body=feedback_body | json_values)
def test_feedback_never_5xx(server, body):
    check(httpx.post(server.url + "/v1/feedback", json=body, timeout=30))


@FUZZ
@given(rid=paths, body=edit_body | json_values, action=st.sampled_from(["edit", "regenerate"]))
def test_reply_actions_never_5xx(server, rid, body, action):
    check(httpx.post(f"{server.url}/v1/replies/{rid}/{action}", json=body, timeout=60))


@FUZZ
@given(body=pref_body | json_values)
def test_preferences_never_5xx(server, body):
    check(httpx.post(server.url + "/v1/preferences", json=body, timeout=30))


@FUZZ
@given(raw=st.binary(max_size=200), path=st.sampled_from(
    ["/v1/chat/completions", "/v1/feedback", "/v1/preferences", "/v1/replies/1/edit"]))
def test_malformed_bodies_never_5xx(server, raw, path):
    check(httpx.post(server.url + path, content=raw, timeout=30,
                     headers={"Content-Type": "application/json"}))


def test_server_still_healthy_after_fuzzing(server):
    assert httpx.get(server.url + "/healthz").json()["status"] == "ok"
