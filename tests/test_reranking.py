"""The best of several sampled replies, by the reply scorer a round saves beside its adapter.

The scorer file must score exactly as the trainer's scorer does; the engine must hand out
the sampled reply that scorer ranks highest, only for versions that have one, only when
sampling; a damaged scorer file is refused like a damaged adapter, and serving goes on.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_adapter, make_tiny_model

from chat_app.engine import (
    BASE_VERSION,
    AdapterError,
    Engine,
    EngineBusy,
    EngineConfig,
    Generation,
    RankedGeneration,
    SamplingParams,
)
from feedback_store.reply_scorer import DIMENSIONS, SCORER_FILE, ReplyScorer
from retrain.reward_model import train_reward_model

torch.set_num_threads(1)

CHAT = [{"role": "user", "content": "Where do cats sleep at night?"}]
SAMPLED = SamplingParams(temperature=1.0, max_new_tokens=12, seed=5)


def _thumb(prompt: str, reply: str, up: bool) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": reply}], "label": up}


def test_the_scorer_file_scores_as_the_trainers_scorer_does(tmp_path: Path) -> None:
    rng = random.Random(0)
    words = "cats dogs sleep warm bed sofa night day quiet loud".split()
    rows = []
    for i in range(60):
        reply = " ".join(rng.choice(words) for _ in range(6)) + ("!" if i % 2 else ".")
        rows.append(_thumb(f"question {i % 7} about cats", reply, up=not i % 2))
    model = train_reward_model(rows, [], seed=0)
    path = tmp_path / SCORER_FILE
    model.to_reply_scorer({"rows": 60}).save(path)
    loaded = ReplyScorer.load(path)
    pairs = [("Where do cats sleep?", "On the sofa, warm and quiet."),
             ("Where do cats sleep?", "On the sofa!"), ("hi", ""), ("", "cats cats")]
    expected = model.log_odds(pairs)
    assert [loaded.log_odds(p, r) for p, r in pairs] == pytest.approx(expected, abs=1e-5)
    assert loaded.best("Where do cats sleep?", ["On the bed!", "On the bed."]) == 1
    assert loaded.accuracy == {"rows": 60}
    assert 0 < len(loaded.weights) < DIMENSIONS  # only the features the rows had


@pytest.mark.parametrize("content", ["not json", '{"format": "other"}',
                                     '{"format": "hashed-linear-v1", "dimensions": 65536, '
                                     '"bias": 0, "weights": {"70000": 1.0}}',
                                     '{"format": "hashed-linear-v1", "dimensions": 65536, '
                                     '"bias": 0, "weights": [1, 2]}'])
def test_a_damaged_scorer_file_is_refused_with_its_reason(tmp_path: Path, content: str) -> None:
    path = tmp_path / SCORER_FILE
    path.write_text(content)
    with pytest.raises(ValueError, match="scorer file"):
        ReplyScorer.load(path)


def _random_scorer(seed: int) -> ReplyScorer:
    rng = random.Random(seed)
    return ReplyScorer({i: rng.gauss(0, 1) for i in range(DIMENSIONS)}, 0.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("rerank")
    model_dir = make_tiny_model(root / "base", seed=2)
    plain = make_tiny_adapter(model_dir, root / "plain", seed=3)
    ranked = root / "ranked"
    shutil.copytree(plain, ranked)
    scorer = _random_scorer(1)
    scorer.save(ranked / SCORER_FILE)
    return {"model": model_dir, "plain": plain, "ranked": ranked, "scorer": scorer}


def wait_until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def engine(setup: dict):
    with Engine.from_config(EngineConfig(model=str(setup["model"]))) as eng:
        eng.load_adapter("ranked", setup["ranked"])
        eng.load_adapter("plain", setup["plain"])
        yield eng


def test_a_version_with_a_scorer_serves_the_best_of_its_samples(
    engine: Engine, setup: dict
) -> None:
    scorer: ReplyScorer = setup["scorer"]
    assert engine.reply_scorer("ranked") is not None and engine.reply_scorer("plain") is None
    chosen_not_first = 0
    for seed in range(6):
        gen = engine.stream(CHAT, SamplingParams(temperature=1.0, max_new_tokens=12, seed=seed),
                            version="ranked")
        assert isinstance(gen, RankedGeneration) and gen.samples == 4
        text = "".join(gen)
        assert gen.finish_reason in ("stop", "length") and text == gen.text
        assert len(gen.candidates) == 4 and len(set(gen.candidates)) > 1
        odds = [scorer.log_odds(CHAT[0]["content"], c) for c in gen.candidates]
        assert text == gen.candidates[gen.chosen_index]
        assert odds[gen.chosen_index] == max(odds)
        assert gen.completion_tokens > 0 and gen.sampled_tokens >= gen.completion_tokens
        chosen_not_first += gen.chosen_index != 0
    assert chosen_not_first > 0, "the pick never mattered: the test shows nothing"
    assert wait_until(lambda: engine.in_flight() == 0)


def test_greedy_replies_plain_versions_and_one_sample_are_not_ranked(
    engine: Engine, setup: dict
) -> None:
    greedy = engine.stream(CHAT, SamplingParams(temperature=0.0, max_new_tokens=8),
                           version="ranked")
    assert isinstance(greedy, Generation)
    greedy.result(timeout=60)
    assert isinstance(engine.stream(CHAT, SAMPLED, version="plain"), Generation)
    assert isinstance(engine.stream(CHAT, SAMPLED, version=BASE_VERSION), Generation)
    with Engine.from_config(EngineConfig(model=str(setup["model"]), rerank_samples=1)) as one:
        one.load_adapter("ranked", setup["ranked"])
        assert isinstance(one.stream(CHAT, SAMPLED, version="ranked"), Generation)


def test_a_nearly_full_engine_draws_fewer_samples(setup: dict) -> None:
    config = EngineConfig(model=str(setup["model"]), max_concurrent=1, max_queued=2)
    with Engine.from_config(config) as eng:
        eng.load_adapter("ranked", setup["ranked"])
        first = eng.stream(CHAT, SAMPLED, version="ranked")
        assert isinstance(first, RankedGeneration) and first.samples == 3  # 1 + 2 places
        with pytest.raises(EngineBusy):  # no place left until they end
            eng.stream(CHAT, SAMPLED, version="ranked")
        first.cancel()
        first.result(timeout=60)
        assert first.finish_reason == "cancelled"
        assert wait_until(lambda: eng.in_flight() == 0)
        assert eng.stream(CHAT, SAMPLED, version="ranked").samples == 3


def test_cancelling_a_ranked_reply_frees_every_sample(engine: Engine) -> None:
    gen = engine.stream(CHAT, SamplingParams(temperature=1.0, max_new_tokens=200, seed=1),
                        version="ranked")
    gen.cancel()
    gen.result(timeout=60)
    assert gen.finish_reason == "cancelled"
    assert wait_until(lambda: engine.in_flight() == 0)


def test_a_damaged_scorer_refuses_the_version_and_serving_goes_on(
    engine: Engine, setup: dict, tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(setup["plain"], bad)
    (bad / SCORER_FILE).write_text(json.dumps({"format": "hashed-linear-v1"}))
    engine.activate("plain")
    with pytest.raises(AdapterError, match="scorer file"):
        engine.load_adapter("bad", bad)
    assert "bad" not in engine.loaded_versions() and engine.active_version == "plain"
    assert engine.stream(CHAT, SAMPLED).result(timeout=60)

