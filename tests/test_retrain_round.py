"""Training rounds end to end: feedback in the store -> a worker process -> the gate
-> a published, registered adapter version (or a failed/rejected run with reasons)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from feedback_data import seed_preferences
from tiny_models import make_tiny_model

from feedback_store import FeedbackStore, RunInProgress
from feedback_store.datasets import RowFilter, build_dpo_rows
from retrain import RetrainSettings, start_round
from retrain.publish import read_manifest

SMALL_TRAIN = {"kto_steps": 6, "dpo_steps": 6, "batch_size": 4, "learning_rate": 5e-3,
               "max_length": 128, "lora_r": 8, "log_every": 1,
               # a random-weight model's replies never end: the KL probe and the own-reply
               # pairs sample 24 tokens, as the gate does, not 256
               "kl_probe_tokens": 24}
# A random-weight model's sampled replies are noise either way, so the degenerate-reply
# and KL limits are opened up for it, and its replies (which never end on their own)
# are cut short; the evidence checks (held-out size, scorer, score bound) still apply.
TINY_GATE = {"max_degenerate_share": 1.0, "max_degenerate_increase": 1.0, "max_canary_kl": 5.0,
             "max_new_tokens": 24}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("model") / "tiny"))


@pytest.fixture
def setup(tmp_path, tiny_model):
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    store = FeedbackStore.open(url)
    seed_preferences(store, rounds=3)
    settings = RetrainSettings(database_url=url, adapters_dir=str(tmp_path / "adapters"),
                               model=tiny_model, device="cpu", eval_fraction=0.3,
                               train=SMALL_TRAIN, gate=TINY_GATE, heartbeat_seconds=0.5)
    return store, settings


def test_round_trains_in_a_child_process_and_the_gate_holds_without_evidence(setup):
    # The seeded feedback asks 8 distinct questions, so the held-out split has a handful
    # of prompts: whatever the training, the gate holds the candidate for lack of
    # evidence. It stays a candidate that an operator can promote.
    store, settings = setup
    assert build_dpo_rows(store, RowFilter(split="eval", eval_fraction=0.3))  # held-out pairs
    run = start_round(settings=settings, trigger="test")
    assert run.status == "succeeded", run.error or run.reasons
    assert run.decision == "held" and run.candidate_version == "v0001"
    assert run.kto_rows > 0 and run.dpo_rows > 0 and run.history
    assert run.history[-1]["phase"] in ("kto", "dpo")
    assert run.reasons and all(r.startswith("hold: ") for r in run.reasons)
    m = run.metrics
    held_rows = m["heldout_thumbs"] + m["heldout_pairs"]
    assert held_rows < 20
    assert m["scorer_rows"] == run.kto_rows + run.dpo_rows + held_rows
    assert run.reasons[0] == (
        f"hold: not enough evidence: the scorer was checked on {m['scorer_rows']} rows "
        f"cross-validated by prompt ({held_rows} held-out) ({m['heldout_thumbs'] + run.kto_rows}"
        f" thumbs, {m['heldout_pairs'] + run.dpo_rows} pairs) and there are "
        f"{m['heldout_prompts']} distinct held-out prompts; the gate needs at least 10 rows "
        f"and 8 prompts")
    assert m["heldout_prompts"] < 8

    candidate = store.registry.get_version("v0001")
    assert candidate.status == "candidate" and candidate.reasons == run.reasons
    assert store.registry.active_version() is None  # still the base
    folder = Path(candidate.path)
    assert folder == Path(settings.adapters_dir) / "v0001"
    assert (folder / "adapter_config.json").is_file()
    manifest = read_manifest(folder)
    assert manifest["parent_version"] is None and manifest["data_hash"] == candidate.data_hash
    assert manifest["rows"] == {"kto": run.kto_rows, "dpo": run.dpo_rows}
    assert manifest["gate"] == {"decision": "hold", "reasons": list(run.reasons)}
    # the reply scorer goes beside the adapter exactly when its check passed
    assert manifest["scorer"]["written"] == (folder / "scorer.json").is_file()
    assert manifest["scorer"]["written"] == bool(m["reply_scorer"])
    assert manifest["scorer"]["reason"].startswith(
        "reply scorer fitted" if manifest["scorer"]["written"] else "no reply scorer")
    assert not list(Path(settings.adapters_dir).glob(".tmp-*"))  # nothing half-written left

    # an operator promotes it; the next round starts from the active adapter
    store.registry.activate("v0001", reasons=["promoted by operator test"])
    run2 = start_round(settings=settings, trigger="test")
    assert run2.status in ("succeeded", "rejected"), run2.error
    assert run2.decision in ("held", "rejected")
    v2 = store.registry.get_version(run2.candidate_version)
    assert v2.parent_version == "v0001"
    assert read_manifest(Path(v2.path))["parent_version"] == "v0001"
    assert store.registry.active_version().version == "v0001"  # a held v0002 does not serve


def test_gate_rejects_with_reasons_and_keeps_the_active_version(setup):
    store, settings = setup
    strict = RetrainSettings(**{**settings.__dict__, "gate": {**TINY_GATE, "max_canary_kl": 0.0}})
    run = start_round(settings=strict, trigger="test")
    assert run.status == "rejected" and run.decision == "rejected"
    assert any("kl" in r.lower() for r in run.reasons), run.reasons
    v = store.registry.get_version(run.candidate_version)
    assert v.status == "rejected" and v.reasons == run.reasons
    assert store.registry.active_version() is None  # still the base


@pytest.mark.parametrize("fault,expect", [
    ("exception", "injected training failure"),
    ("oom", "out of memory"),
    ("kill", "SIGKILL"),
])
def test_a_crashing_round_is_marked_failed_and_frees_the_slot(setup, fault, expect):
    store, settings = setup
    run = start_round(settings=settings, trigger="test",
                      env={"FEEDBACK_CHAT_RETRAIN_FAULT": fault})
    assert run.status == "failed"
    assert expect in run.error
    assert store.registry.current_run() is None
    assert store.registry.list_versions() == []
    # the slot is free again: the next round can claim it
    nxt = store.registry.start_run(trigger="test")
    assert store.registry.current_run().id == nxt.id


def test_one_run_at_a_time(setup):
    store, settings = setup
    run = start_round(settings=settings, trigger="test", wait=False)
    with pytest.raises(RunInProgress):
        start_round(settings=settings, trigger="test")
    import time

    deadline = time.time() + 300
    while store.registry.get_run(run.id).status in ("queued", "running"):
        assert time.time() < deadline
        time.sleep(0.5)
    assert store.registry.get_run(run.id).status in ("succeeded", "rejected")
    assert store.registry.get_run(run.id).decision in ("held", "rejected", "promoted")


def test_no_feedback_means_a_clear_failed_run(tmp_path, tiny_model):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    FeedbackStore.open(url)
    run = start_round(settings=RetrainSettings(database_url=url, model=tiny_model,
                                               adapters_dir=str(tmp_path / "a")), trigger="test")
    assert run.status == "failed" and "no training rows" in run.error


def test_run_log_is_kept(setup):
    store, settings = setup
    run = start_round(settings=settings, trigger="test", env={"FEEDBACK_CHAT_RETRAIN_FAULT":
                                                              "exception"})
    log = Path(settings.adapters_dir).parent / "runs" / f"run-{run.id}.log"
    assert "injected training failure" in log.read_text()
    assert json.loads(settings.to_json())["model"] == settings.model
