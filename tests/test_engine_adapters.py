"""Adapter versions: served side by side, each reply on the version it started with,
corrupt folders refused without disturbing what is being served, unloads that wait.

Every expected text comes from PEFT alone: a fresh base model, ``PeftModel.from_pretrained``
with one adapter, greedy ``generate``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from chat_app.engine import BASE_VERSION, AdapterError, Engine, EngineConfig, SamplingParams

torch.set_num_threads(1)

CHAT = [{"role": "user", "content": "Where do cats sleep at night?"}]
N = 60
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=N)


def make_adapter(model_dir: Path, out: Path, seed: int, r: int = 8) -> Path:
    """A LoRA adapter whose B weights are random, so it really changes the outputs."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(model, lora)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.5)
    peft_model.save_pretrained(out)
    return out


def reference(model_dir: Path, adapter: Path | None, n: int = N) -> str:
    """The greedy reply of the base, or of the base with ``adapter`` and nothing else."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    enc = tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**enc, do_sample=False, max_new_tokens=n)
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return text.replace("\x00", "\ufffd")  # as served: a decoded NUL is streamed as U+FFFD


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("adapters")
    model_dir = make_tiny_model(root / "base", seed=2)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():  # never end early, so every reply runs its full length
        model.lm_head.weight[model.generation_config.eos_token_id] = 0.0
    model.save_pretrained(model_dir)
    a1 = make_adapter(model_dir, root / "v1", seed=1)
    a2 = make_adapter(model_dir, root / "v2", seed=2)
    refs = {BASE_VERSION: reference(model_dir, None), "v1": reference(model_dir, a1)}
    refs["v2"] = reference(model_dir, a2)
    assert len(set(refs.values())) == 3, "setup: each adapter must change the reply"
    return {"root": root, "model": model_dir, "v1": a1, "v2": a2, "refs": refs}


@pytest.fixture
def engine(setup: dict):
    with Engine.from_config(EngineConfig(model=str(setup["model"]))) as eng:
        yield eng


def wait_until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not condition():
        time.sleep(0.005)
    return condition()


def lora_adapters_in(eng: Engine) -> list[str]:
    """Adapter names present in the LoRA layers of the served model (white-box check)."""
    names: set[str] = set()
    for module in eng._adapters.model.modules():
        if isinstance(module, BaseTunerLayer):
            names.update(module.lora_A.keys())
    return sorted(names)


def reply(eng: Engine, version: str | None = None, n: int = N) -> str:
    params = SamplingParams(temperature=0.0, max_new_tokens=n)
    return eng.stream(CHAT, params, version=version).result(timeout=120)


def test_loading_a_second_adapter_leaves_the_first_ones_replies_unchanged(
    engine: Engine, setup: dict
) -> None:
    engine.load_adapter("v1", setup["v1"])
    engine.activate("v1")
    before = reply(engine)
    engine.load_adapter("v2", setup["v2"])
    engine.activate("v2")
    assert reply(engine, "v1") == before == setup["refs"]["v1"]
    assert reply(engine) == setup["refs"]["v2"]
    assert engine.loaded_versions() == [BASE_VERSION, "v1", "v2"]


def test_versions_are_served_side_by_side_and_each_reply_keeps_its_version(
    engine: Engine, setup: dict
) -> None:
    engine.load_adapter("v1", setup["v1"])
    engine.load_adapter("v2", setup["v2"])
    engine.activate("v1")
    long_v1 = engine.stream(CHAT, SamplingParams(temperature=0.0, max_new_tokens=400))
    next(iter(long_v1))
    engine.activate("v2")  # the reply under way stays on v1
    on_v2 = engine.stream(CHAT, GREEDY)
    on_base = engine.stream(CHAT, GREEDY, version=BASE_VERSION)
    on_v1 = engine.stream(CHAT, GREEDY, version="v1")
    texts = {g.version: g.result(timeout=120) for g in (on_v2, on_base, on_v1)}
    long_v1.result(timeout=120)

    assert texts == setup["refs"]
    assert long_v1.version == "v1" and long_v1.text.startswith(setup["refs"]["v1"])
    assert long_v1.text == reference(setup["model"], setup["v1"], n=400)
    assert on_v2._request.first_token_at < long_v1._request.finished_at, "setup: no overlap"
    assert engine.active_version == "v2"


def test_unload_waits_for_replies_on_that_version_then_deletes_it(
    engine: Engine, setup: dict
) -> None:
    engine.load_adapter("v1", setup["v1"])
    engine.load_adapter("v2", setup["v2"])
    engine.activate("v1")
    long_v1 = engine.stream(CHAT, SamplingParams(temperature=0.0, max_new_tokens=400))
    engine.activate("v2")
    with pytest.raises(TimeoutError):
        engine.unload_adapter("v1", timeout=0.0)  # 400 tokens cannot be done already
    with pytest.raises(AdapterError, match="being unloaded"):
        engine.stream(CHAT, GREEDY, version="v1")
    engine.unload_adapter("v1", timeout=120)
    assert long_v1.finish_reason == "length"
    assert long_v1.text == reference(setup["model"], setup["v1"], n=400)
    assert engine.loaded_versions() == [BASE_VERSION, "v2"]
    assert engine.in_flight("v1") == 0
    assert reply(engine) == setup["refs"]["v2"]

    long_v2 = engine.stream(CHAT, SamplingParams(temperature=0.0, max_new_tokens=400))
    engine.activate(BASE_VERSION)
    engine.unload_adapter("v2", wait=False)  # returns at once; a reply still uses v2
    assert "v2" in engine.loaded_versions()
    assert long_v2.result(timeout=120) == reference(setup["model"], setup["v2"], n=400)
    assert wait_until(lambda: engine.loaded_versions() == [BASE_VERSION])
    assert lora_adapters_in(engine) == []
    assert reply(engine) == setup["refs"][BASE_VERSION]
    engine.load_adapter("v1", setup["v1"])  # a fresh load after all were unloaded
    assert reply(engine, "v1") == setup["refs"]["v1"]


def test_reactivating_a_version_whose_unload_is_pending_calls_the_unload_off(
    engine: Engine, setup: dict
) -> None:
    """A rollback right after a swap: the old version is still finishing a reply and
    waiting to be unloaded when it becomes active again; it must keep serving."""
    import threading

    engine.load_adapter("v1", setup["v1"])
    engine.load_adapter("v2", setup["v2"])
    engine.activate("v1")
    long_v1 = engine.stream(CHAT, SamplingParams(temperature=0.0, max_new_tokens=400))
    engine.activate("v2")
    outcome: list[BaseException | None] = []

    def unload() -> None:
        try:
            engine.unload_adapter("v1", timeout=120)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion below
            outcome.append(exc)

    waiter = threading.Thread(target=unload)
    waiter.start()
    assert wait_until(lambda: "v1" in engine._shared.unloading)
    engine.activate("v1")  # the rollback
    waiter.join(timeout=120)
    assert isinstance(outcome[0], AdapterError) and "called off" in str(outcome[0])
    assert long_v1.result(timeout=120) == reference(setup["model"], setup["v1"], n=400)
    assert "v1" in engine.loaded_versions() and engine.active_version == "v1"
    assert reply(engine) == setup["refs"]["v1"]


def test_versions_that_cannot_be_used_are_refused(engine: Engine, setup: dict) -> None:
    engine.load_adapter("v1", setup["v1"])
    with pytest.raises(AdapterError, match="already loaded"):
        engine.load_adapter("v1", setup["v2"])
    with pytest.raises(AdapterError, match="not loaded"):
        engine.activate("v9")
    with pytest.raises(AdapterError, match="not loaded"):
        engine.stream(CHAT, GREEDY, version="v9")
    with pytest.raises(AdapterError, match="base"):
        engine.load_adapter(BASE_VERSION, setup["v2"])
    with pytest.raises(AdapterError, match="base"):
        engine.unload_adapter(BASE_VERSION)
    engine.activate("v1")
    with pytest.raises(AdapterError, match="active"):
        engine.unload_adapter("v1")
    assert engine.in_flight() == 0


def corrupt(kind: str, good: Path, bad: Path) -> Path:
    """A copy of the adapter in ``good`` damaged in one way."""
    if kind == "missing folder":
        return bad / "nowhere"
    shutil.copytree(good, bad)
    config_file, weights = bad / "adapter_config.json", bad / "adapter_model.safetensors"
    if kind == "no config":
        config_file.unlink()
    elif kind == "garbled config":
        config_file.write_text("{not json")
    elif kind == "not lora":
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "peft_type": "IA3"}))
    elif kind == "no weights":
        weights.unlink()
    elif kind == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif kind == "wrong shapes":
        config = json.loads(config_file.read_text())
        config_file.write_text(json.dumps({**config, "r": 4, "lora_alpha": 8}))
    elif kind == "missing tensors":
        tensors = load_file(weights)
        save_file({k: v for k, v in tensors.items() if "layers.1." not in k}, weights)
    return bad


KINDS = [
    "missing folder", "no config", "garbled config", "not lora", "no weights",
    "truncated weights", "wrong shapes", "missing tensors",
]


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_adapter_is_refused_and_serving_goes_on_unchanged(
    engine: Engine, setup: dict, tmp_path: Path, kind: str
) -> None:
    engine.load_adapter("v1", setup["v1"])
    engine.activate("v1")
    with pytest.raises(AdapterError):
        engine.load_adapter("v2", corrupt(kind, setup["v2"], tmp_path / "bad"))
    assert engine.loaded_versions() == [BASE_VERSION, "v1"]
    assert len(lora_adapters_in(engine)) == 1, "the failed load left an adapter behind"
    assert engine.active_version == "v1"
    assert reply(engine) == setup["refs"]["v1"]
    assert reply(engine, BASE_VERSION) == setup["refs"][BASE_VERSION]
    engine.load_adapter("v2", setup["v2"])  # the name was not left half-taken
    assert reply(engine, "v2") == setup["refs"]["v2"]


@pytest.mark.parametrize("kind", ["wrong shapes", "missing tensors"])
def test_a_failed_first_adapter_leaves_the_bare_base_serving(
    engine: Engine, setup: dict, tmp_path: Path, kind: str
) -> None:
    with pytest.raises(AdapterError):
        engine.load_adapter("v1", corrupt(kind, setup["v1"], tmp_path / "bad"))
    assert engine.loaded_versions() == [BASE_VERSION]
    assert not any(isinstance(m, BaseTunerLayer) for m in engine._adapters.model.modules())
    assert reply(engine) == setup["refs"][BASE_VERSION]
    engine.load_adapter("v1", setup["v1"])
    assert reply(engine, "v1") == setup["refs"]["v1"]
