"""Many chats at once: replies interleave, the queue is bounded, gone clients free their slot.

The tiny model here never writes its end token under greedy decoding (its output row for
<|im_end|> is zeroed), so a reply asked for N tokens runs for exactly N steps.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM

from chat_app.engine import Engine, EngineBusy, EngineConfig, SamplingParams

torch.set_num_threads(1)

LONG = SamplingParams(temperature=0.0, max_new_tokens=400)
SHORT = SamplingParams(temperature=0.0, max_new_tokens=5)


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def wait_until(condition, timeout: float = 30.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_tiny_model(tmp_path_factory.mktemp("chatty") / "m", seed=1)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight[model.generation_config.eos_token_id] = 0.0
    model.save_pretrained(path)
    return path


@pytest.fixture
def make_engine(model_dir: Path) -> Iterator:
    engines: list[Engine] = []

    def make(**kw: int) -> Engine:
        engines.append(Engine.from_config(EngineConfig(model=str(model_dir), **kw)))
        return engines[-1]

    yield make
    for eng in engines:
        eng.close()


def test_short_chats_finish_while_an_earlier_long_one_is_still_running(make_engine) -> None:
    eng = make_engine(max_concurrent=8)
    prompts = [chat(f"Short question number {i} about cats?") for i in range(3)]
    solo = [eng.stream(p, SHORT).result() for p in prompts]

    long = eng.stream(chat("Tell me everything about the Seine."), LONG)
    long_pieces: list[str] = []
    started = threading.Event()

    def read_long() -> None:
        for piece in long:
            long_pieces.append(piece)
            started.set()

    results: dict[int, tuple[str, str | None]] = {}

    def read_short(i: int) -> None:
        gen = eng.stream(prompts[i], SHORT)
        text = "".join(gen)
        results[i] = (text, long.finish_reason)  # the long reply's state when this one ended

    long_reader = threading.Thread(target=read_long)
    long_reader.start()
    assert started.wait(30)
    readers = [threading.Thread(target=read_short, args=(i,)) for i in range(3)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(60)
    long_reader.join(120)

    for i in range(3):
        text, long_state_then = results[i]
        assert long_state_then is None, "a short chat waited for the long one to finish"
        assert text == solo[i], "batching beside another chat changed the reply"
    assert long.finish_reason == "length" and long.completion_tokens == 400
    assert "".join(long_pieces) == long.text
    assert eng.in_flight() == 0


def test_full_queue_answers_busy_at_once(make_engine) -> None:
    eng = make_engine(max_concurrent=1, max_queued=1)
    running = eng.stream(chat("first"), LONG)
    queued = eng.stream(chat("second"), LONG)
    with pytest.raises(EngineBusy, match="try again"):
        eng.stream(chat("third"), SHORT)
    assert eng.in_flight() == 2

    queued.cancel()  # a waiting request leaves the queue at once
    assert queued.finish_reason == "cancelled" and queued.completion_tokens == 0
    assert list(queued) == []
    third = eng.stream(chat("third"), SHORT)
    running.cancel()
    third.result(timeout=60)
    assert third.finish_reason == "length"
    assert running.finish_reason == "cancelled"


def test_cancel_stops_generation_promptly_and_frees_the_slot(make_engine) -> None:
    eng = make_engine(max_concurrent=1, max_queued=0)
    gen = eng.stream(chat("go on and on"), LONG)
    it = iter(gen)
    first = next(it)
    with pytest.raises(EngineBusy):
        eng.stream(chat("me too"), SHORT)
    gen.cancel()
    rest = list(it)
    assert gen.finish_reason == "cancelled"
    assert gen.completion_tokens < LONG.max_new_tokens
    assert gen.text == first + "".join(rest)
    after = eng.stream(chat("me too"), SHORT)
    after.result(timeout=60)
    assert after.finish_reason == "length"


def test_a_dropped_generation_is_cancelled_by_garbage_collection(make_engine) -> None:
    eng = make_engine(max_concurrent=1, max_queued=0)
    gen = eng.stream(chat("nobody reads me"), LONG)
    for _piece in gen:
        break  # the reader stops, then the client goes away and drops its handle
    request = gen._request  # kept only to read how it ended
    del gen, _piece
    gc.collect()
    assert wait_until(lambda: eng.in_flight() == 0)
    assert request.finish_reason == "cancelled"
    assert request.completion_tokens < LONG.max_new_tokens
    nxt = eng.stream(chat("next"), SHORT)
    nxt.result(timeout=60)
    assert nxt.finish_reason == "length"


def test_closing_the_stream_cancels_it_but_pausing_does_not(make_engine) -> None:
    eng = make_engine(max_concurrent=1, max_queued=0)
    gen = eng.stream(chat("read some pieces, pause, read on"), SHORT)
    first = next(gen)
    gen.result(timeout=60)  # paused: the reply still ran to its end
    assert gen.finish_reason == "length" and gen.text.startswith(first)
    gen = eng.stream(chat("read one piece only"), LONG)
    next(gen)
    gen.close()
    list(gen)  # what was produced before the close, then the end
    assert gen.finish_reason == "cancelled"
    assert gen.completion_tokens < LONG.max_new_tokens
    nxt = eng.stream(chat("next"), SHORT)
    nxt.result(timeout=60)
    assert nxt.finish_reason == "length"


def test_close_ends_running_replies_and_refuses_new_ones(make_engine) -> None:
    eng = make_engine(max_concurrent=1, max_queued=2)
    running = eng.stream(chat("one"), LONG)
    waiting = eng.stream(chat("two"), LONG)
    next(iter(running))
    eng.close()
    assert running.finish_reason == "cancelled" and waiting.finish_reason == "cancelled"
    assert eng.in_flight() == 0
    with pytest.raises(RuntimeError, match="closed"):
        eng.stream(chat("three"), SHORT)


def test_an_engine_dropped_without_close_stops_its_worker(model_dir: Path) -> None:
    eng = Engine.from_config(EngineConfig(model=str(model_dir)))
    worker = eng._worker
    eng.stream(chat("one reply"), SHORT).result(timeout=60)
    del eng
    gc.collect()
    worker.join(30)
    assert not worker.is_alive()
