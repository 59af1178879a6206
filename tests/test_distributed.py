"""A training round data-parallel on 2 CPU processes (gloo), launched by accelerate: the
same adapter as one process on the same rows and seed, within a stated tolerance; only
the main process saves; and the worker runs such a round end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
from feedback_data import TOPICS, curt, polite, seed_preferences
from safetensors.torch import load_file
from tiny_models import make_tiny_model

from feedback_store import FeedbackStore
from retrain import RetrainSettings, start_round
from retrain.distributed import train_data_parallel
from retrain.train import TrainConfig, World, train_round

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CONFIG = TrainConfig(device="cpu", kto_steps=6, dpo_steps=6, batch_size=4, learning_rate=5e-3,
                     max_length=128, lora_r=4, kl_budget=None)
# float32 sums in another order (two halves of a batch, then an all-reduce) differ in the
# last bits; over 12 Adam steps that stays far below this, on weights of about 0.1
TOLERANCE = 1e-4


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def rows():
    kto, dpo = [], []
    for question, fact in TOPICS:
        kto.append({"prompt": chat(question), "completion": reply(polite(fact)), "label": True})
        kto.append({"prompt": chat(question), "completion": reply(curt(fact)), "label": False})
        dpo.append({"prompt": chat(question), "chosen": reply(polite(fact)),
                    "rejected": reply(curt(fact))})
    return kto, dpo


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("dp") / "model")


def test_two_processes_train_the_same_adapter_as_one(model, rows, tmp_path):
    kto, dpo = rows
    one = train_round(base_model=str(model), parent_adapter=None, kto_rows=kto, dpo_rows=dpo,
                      out_dir=tmp_path / "one", config=CONFIG)
    two = train_data_parallel(processes=2, base_model=str(model), parent_adapter=None,
                              kto_rows=kto, dpo_rows=dpo, out_dir=tmp_path / "two",
                              config=CONFIG, timeout=300)
    assert two.metrics["processes"] == 2.0
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    moved = max(t.abs().max().item() for name, t in a.items() if "lora_B" in name)
    assert moved > 1e-3  # the round trained: B starts at zero
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < TOLERANCE, diff
    for phase in ("kto", "dpo"):  # the whole batch's loss, logged by the main process
        assert two.metrics[f"{phase}/steps"] == one.metrics[f"{phase}/steps"] == 6
        assert two.metrics[f"{phase}/loss"] == pytest.approx(one.metrics[f"{phase}/loss"],
                                                             rel=1e-4)


def test_only_the_main_process_saves(model, rows, tmp_path):
    kto, dpo = rows
    config = TrainConfig(**{**CONFIG.__dict__, "kto_steps": 1, "dpo_steps": 1})
    train_round(base_model=str(model), parent_adapter=None, kto_rows=kto[:4], dpo_rows=dpo[:2],
                out_dir=tmp_path / "rank1", config=config, world=World(rank=1, size=1))
    assert not (tmp_path / "rank1").exists()


def test_the_worker_runs_a_round_on_two_processes(model, tmp_path):
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    store = FeedbackStore.open(url)
    seed_preferences(store, rounds=3)
    settings = RetrainSettings(
        database_url=url, adapters_dir=str(tmp_path / "adapters"), model=str(model),
        device="cpu", eval_fraction=0.3,
        train={"processes": 2, "kto_steps": 4, "dpo_steps": 4, "batch_size": 4,
               "max_length": 128, "lora_r": 4},
        gate={"max_degenerate_share": 1.0, "max_degenerate_increase": 1.0, "max_kl": 50.0,
              "max_new_tokens": 16})
    run = start_round(settings=settings, trigger="test")
    assert run.status == "succeeded", run.error or run.reasons
    assert run.metrics["train/processes"] == 2.0
    assert (tmp_path / "adapters" / run.candidate_version / "adapter_model.safetensors").is_file()
    store.close()
