"""The chat page served over HTTP, driven with ``gradio_client`` as a program would.

A real server (``Blocks.launch`` on a free port, logins on) over a tiny engine and a SQLite
file: messages stream back in several updates, land in the store under the logged-in
user's name, and regenerate / prefer endpoints write siblings and choices. (Thumbs and
edits carry event data that ``gradio_client`` cannot send: the browser test covers them.)
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from gradio_client import Client
from tiny_models import make_tiny_model

from chat_app.engine import Engine, EngineConfig, SamplingParams
from chat_app.ui.markup import display_text
from chat_app.ui.page import ChatPageSettings, build_chat_page
from feedback_store import FeedbackStore

torch.set_num_threads(1)

LOGIN = ("alice", "correct-horse")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("ui-client")
    model = make_tiny_model(root / "tiny")
    engine = Engine.from_config(EngineConfig(model=str(model), torch_threads=1))
    store = FeedbackStore.open(f"sqlite:///{root / 'feedback.db'}")
    # A fixed seed makes every reply here the same from run to run (a regenerate adds the
    # number of siblings to it, so it still differs).
    sampling = SamplingParams(max_new_tokens=120, temperature=0.8, seed=11)
    settings = ChatPageSettings(sampling=sampling, stream_interval_s=0.0)
    demo = build_chat_page(store=store, engine=engine, settings=settings)
    demo.queue(default_concurrency_limit=4)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                quiet=True, auth=[LOGIN])
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "store": store, "engine": engine}
    finally:
        demo.close()
        engine.close()
        store.close()


@pytest.fixture
def client(served: dict[str, Any]) -> Client:
    return Client(served["url"], auth=LOGIN, verbose=False)


def texts(chat_output: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, text) of each message in a Chatbot output sent to the client."""
    return [(m["role"], "".join(part["text"] for part in m["content"]))
            for m in chat_output["value"]]


def test_a_message_sent_over_http_streams_back_and_is_stored_under_the_login(
    served: dict[str, Any], client: Client
) -> None:
    store: FeedbackStore = served["store"]
    job = client.submit("Hello <i>server</i>", "", api_name="/send")
    job.result(timeout=120)
    outputs = job.outputs()
    assert len(outputs) >= 3  # accepted, at least one partial reply, the end
    first, final = texts(outputs[0][0]), texts(outputs[-1][0])
    assert first[0] == ("user", "Hello &lt;i>server&lt;/i>") and first[1][0] == "assistant"
    memory = outputs[-1][-1]
    user, reply = store.messages(memory["conversation_id"])
    assert final == [("user", display_text(user.content)), ("assistant", display_text(reply.content))]
    partial = [texts(o[0])[-1][1] for o in outputs[1:-1]]
    assert reply.completion_tokens > 3
    assert any(0 < len(p) < len(final[-1][1]) for p in partial)  # it grew while streaming
    assert user.content == "Hello <i>server</i>" and user.user_id == "alice"
    assert store.get_conversation(memory["conversation_id"]).user_id == "alice"
    assert reply.adapter_version == served["engine"].active_version
    assert memory["head_id"] == reply.id
    assert "adapter: `base`" in outputs[-1][1]


def test_one_client_session_keeps_one_conversation_and_can_regenerate_and_choose(
    served: dict[str, Any], client: Client
) -> None:
    store: FeedbackStore = served["store"]
    client.predict("First", "", api_name="/send")
    out = client.predict("Second", "", api_name="/send")
    memory = out[-1]
    messages = store.messages(memory["conversation_id"])
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
    old = messages[-1]

    out = client.predict(api_name="/regenerate")
    new_id = out[-1]["head_id"]
    new = store.get_message(new_id)
    assert (new.origin, new.source_reply_id) == ("regenerated", old.id)
    assert texts(out[0])[-1] == ("assistant", display_text(new.content))

    out = client.predict(api_name="/prefer_new")
    assert "new reply is better" in out[2]
    (choice,) = [e for e in store.events_for(new.id) if e.kind == "choice"]
    assert (choice.reply_id, choice.other_reply_id, choice.user_id) == (new.id, old.id, "alice")

    out = client.predict("needs a source", api_name="/comment")
    (comment,) = [e for e in store.events_for(new.id) if e.kind == "comment"]
    assert comment.comment == "needs a source"


def test_an_empty_message_over_http_is_refused_and_stores_nothing(
    served: dict[str, Any], client: Client
) -> None:
    store: FeedbackStore = served["store"]
    before = store.counts()
    out = client.predict("   ", "", api_name="/send")
    assert out[2].startswith("⚠️") and "empty message" in out[2]
    assert texts(out[0]) == []
    assert store.counts() == before


def test_wrong_login_is_refused(served: dict[str, Any]) -> None:
    with pytest.raises(Exception, match="(?i)login|credentials|401|auth"):
        Client(served["url"], auth=("alice", "wrong"), verbose=False)
