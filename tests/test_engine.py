"""The engine streams what the model would generate, stops where it should, and fits prompts.

Real tiny models (random weights, a locally trained ChatML tokenizer) are loaded from disk
and every reply is checked against ``model.generate`` on the same prompt.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from chat_app.engine import (
    BASE_VERSION,
    Engine,
    EngineConfig,
    InputTooLong,
    ModelLoadError,
    SamplingParams,
)
from chat_app.engine.detokenize import IncrementalDecoder, StopFilter
from feedback_store.convert import clean_model_text

torch.set_num_threads(1)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello! How can I help you today?"},
]


def greedy(n: int, stop: tuple[str, ...] = ()) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=n, stop=stop)


def generate_ids(model_dir: Path, messages: list[dict], n: int, **kwargs: object) -> list[int]:
    """Token ids ``model.generate`` produces greedily after the chat prompt."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**enc, do_sample=False, max_new_tokens=n, **kwargs)
    return out[0, enc["input_ids"].shape[1] :].tolist()


def decode(model_dir: Path, ids: list[int]) -> str:
    """The text of ``ids`` as served: a decoded NUL is streamed as U+FFFD."""
    text = AutoTokenizer.from_pretrained(model_dir).decode(ids, skip_special_tokens=True)
    return text.replace("\x00", "\ufffd")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def engine(model_dir: Path):
    with Engine.from_config(EngineConfig(model=str(model_dir))) as eng:
        yield eng


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_streamed_pieces_join_to_what_greedy_generate_writes(tmp_path: Path, arch: str) -> None:
    model_dir = make_tiny_model(tmp_path / arch, arch=arch, seed=3)
    expected = decode(model_dir, generate_ids(model_dir, CHAT, 40))
    with Engine.from_config(EngineConfig(model=str(model_dir))) as eng:
        gen = eng.stream(CHAT, greedy(40))
        pieces = list(gen)
        assert "".join(pieces) == expected == gen.text
        assert len(pieces) > 1, "the reply arrived in one piece: nothing was streamed"
        assert gen.version == BASE_VERSION
        assert gen.prompt_tokens == eng.count_tokens(CHAT)
        assert gen.trimmed_turns == 0
        if gen.finish_reason == "length":
            assert gen.completion_tokens == 40
        else:  # the random model happened to write its end token
            assert gen.finish_reason == "stop" and gen.completion_tokens < 40
        assert eng.in_flight() == 0


def test_reply_ends_at_the_chat_templates_end_token(tmp_path: Path) -> None:
    """The tokenizer's EOS is moved off <|im_end|> and generation_config names no EOS: only
    the template shows that <|im_end|> ends a turn, and the engine still stops there."""
    model_dir = make_tiny_model(tmp_path / "m", seed=5)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    plain = generate_ids(model_dir, CHAT, 30, eos_token_id=None)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # Make <|im_end|> win wherever the 6th greedy token would: the reply must end there.
    with torch.no_grad():
        model.lm_head.weight[im_end] = model.lm_head.weight[plain[5]] * 2.0
    model.generation_config.eos_token_id = None
    model.save_pretrained(model_dir)
    tokenizer.eos_token = "<|bos|>"
    tokenizer.save_pretrained(model_dir)
    reference = generate_ids(model_dir, CHAT, 30, eos_token_id=im_end)
    assert reference[-1] == im_end and len(reference) < 30, "setup: the model must end early"

    with Engine.from_config(EngineConfig(model=str(model_dir))) as eng:
        assert im_end in eng.stop_token_ids
        gen = eng.stream(CHAT, greedy(30))
        assert "".join(gen) == decode(model_dir, reference)
        assert gen.finish_reason == "stop"
        assert gen.completion_tokens == len(reference)


def test_reply_ends_at_any_generation_config_eos_id(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "m", seed=7)
    plain = generate_ids(model_dir, CHAT, 30, eos_token_id=None)
    k = next(i for i in range(3, 30) if plain[i] not in plain[:i])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.generation_config.eos_token_id = [plain[k], model.generation_config.eos_token_id]
    model.save_pretrained(model_dir)
    with Engine.from_config(EngineConfig(model=str(model_dir))) as eng:
        gen = eng.stream(CHAT, greedy(30))
        assert "".join(gen) == decode(model_dir, plain[:k])
        assert gen.finish_reason == "stop"
        assert gen.completion_tokens == k + 1


def test_stop_string_ends_the_reply_and_is_never_sent(engine: Engine) -> None:
    full = engine.stream(CHAT, greedy(40)).result()
    clean = [i for i in range(8, len(full) - 3) if "\ufffd" not in full[i : i + 3]]
    assert clean, f"setup: need a plain stretch of text in {full!r}"
    stop = full[clean[0] : clean[0] + 3]
    expected = full[: full.find(stop)]

    gen = engine.stream(CHAT, greedy(40, stop=("never-there", stop)))
    pieces = list(gen)
    assert "".join(pieces) == expected == gen.text
    assert gen.finish_reason == "stop"
    assert stop not in "".join(pieces)


def test_decoder_never_splits_a_character_across_pieces(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "héllo 🙂 你好 ß, and a plain tail"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split()), "setup: some characters span several tokens"
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_a_decoded_nul_is_streamed_as_it_is_stored(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    (nul,) = [i for i in range(len(tokenizer)) if tokenizer.decode([i]) == "\x00"]
    ids = tokenizer("say ", add_special_tokens=False)["input_ids"] + [nul] + tokenizer(
        " again", add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tokenizer)
    text = "".join([decoder.push(i) for i in ids] + [decoder.flush()])
    assert text == "say \ufffd again" == clean_model_text(tokenizer.decode(ids))


def test_stop_filter_holds_back_a_possible_stop_string_until_it_is_decided() -> None:
    f = StopFilter(("END",))
    assert f.push("hello E") == ("hello ", False)
    assert f.push("N") == ("", False)
    assert f.push("D and more") == ("", True)
    g = StopFilter(("END",))
    assert g.push("open EN") == ("open ", False)
    assert g.push("VY") == ("ENVY", False)
    assert g.push(" E") == (" ", False)
    assert g.flush() == "E"


def test_sampling_is_seeded_and_a_tiny_top_p_is_greedy(engine: Engine) -> None:
    def run(**kw: object) -> str:
        return engine.stream(CHAT, SamplingParams(max_new_tokens=20, **kw)).result()

    assert run(temperature=1.0, top_p=1.0, seed=11) == run(temperature=1.0, top_p=1.0, seed=11)
    assert run(temperature=1.0, top_p=1.0, seed=11) != run(temperature=1.0, top_p=1.0, seed=12)
    assert run(temperature=1.0, top_p=1e-6, seed=1) == run(temperature=0.0)


def long_chat(turns: int) -> list[dict]:
    chat = [{"role": "system", "content": "You are the SYSTEM prompt; keep me."}]
    for i in range(turns):
        chat.append({"role": "user", "content": f"Question {i}: where do cats sleep at night?"})
        chat.append({"role": "assistant", "content": f"Answer {i}: cats sleep most of the day."})
    chat.append({"role": "user", "content": "And what is the capital of France?"})
    return chat


def test_trimming_drops_the_oldest_turns_and_keeps_the_system_prompt(
    engine: Engine, model_dir: Path
) -> None:
    chat = long_chat(6)
    expected_kept = [chat[0], *chat[-5:]]  # system + two old turns + the newest message
    budget = engine.count_tokens(expected_kept)
    assert engine.count_tokens([chat[0], *chat[-7:]]) > budget
    with Engine.from_config(EngineConfig(model=str(model_dir), max_input_tokens=budget)) as small:
        kept, dropped = small.trim_messages(chat)
        assert kept == expected_kept and dropped == 4
        gen = small.stream(chat, greedy(20))
        text = gen.result()
        assert gen.trimmed_turns == 4
        assert gen.prompt_tokens == budget
    # What was generated is the reply to the kept messages, as if they were the whole chat.
    assert text == engine.stream(expected_kept, greedy(20)).result()


def test_newest_message_too_long_for_the_budget_is_refused(model_dir: Path) -> None:
    with Engine.from_config(EngineConfig(model=str(model_dir), max_input_tokens=40)) as eng:
        chat = long_chat(3)
        chat[-1] = {"role": "user", "content": "cats " * 60}
        with pytest.raises(InputTooLong) as err:
            eng.stream(chat)
        assert err.value.limit == 40 and err.value.tokens > 40
        assert isinstance(err.value, ValueError)
        assert eng.in_flight() == 0


def test_bad_parameters_and_messages_are_refused_listing_every_problem(engine: Engine) -> None:
    with pytest.raises(ValueError) as err:
        SamplingParams(max_new_tokens=0, temperature=-1.0, top_p=1.5, stop=("",)).validate()
    for word in ("max_new_tokens", "temperature", "top_p", "stop"):
        assert word in str(err.value)
    with pytest.raises(ValueError, match="top_p"):
        engine.stream(CHAT, SamplingParams(top_p=0.0))
    with pytest.raises(ValueError) as err:
        engine.stream([{"role": "robot", "content": "hi"}, {"role": "user"}])
    assert "messages[0].role" in str(err.value) and "messages[1].content" in str(err.value)
    with pytest.raises(ValueError):
        engine.stream([])
    with pytest.raises(ValueError) as err:
        EngineConfig(model="", max_concurrent=0, max_queued=-1, device="tpu").validate()
    for word in ("model", "max_concurrent", "max_queued", "device"):
        assert word in str(err.value)
    assert engine.in_flight() == 0


def test_unusable_models_get_a_clear_model_load_error(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        Engine.from_config(EngineConfig(model=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        Engine.from_config(EngineConfig(model=str(tmp_path / "empty")))
    with pytest.raises(ModelLoadError, match="CUDA"):
        Engine.from_config(EngineConfig(model=str(model_dir), device="cpu", quantize_4bit=True))

    no_template = tmp_path / "no_template"
    shutil.copytree(model_dir, no_template)
    (no_template / "chat_template.jinja").unlink()
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="chat template"):
        Engine.from_config(EngineConfig(model=str(no_template)))


def test_missing_pad_token_falls_back_to_eos_or_fails_clearly(
    tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    no_pad = tmp_path / "no_pad"
    shutil.copytree(model_dir, no_pad)
    tokenizer = AutoTokenizer.from_pretrained(no_pad)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(no_pad)
    with caplog.at_level(logging.WARNING, logger="chat_app.engine"):
        with Engine.from_config(EngineConfig(model=str(no_pad))) as eng:
            assert eng.tokenizer.pad_token == "<|im_end|>"
            gen = eng.stream(CHAT, greedy(5))
            gen.result()
            assert gen.finish_reason in ("stop", "length")
    assert "no pad token" in caplog.text

    tokenizer.eos_token = None
    tokenizer.save_pretrained(no_pad)
    with pytest.raises(ModelLoadError, match="pad"):
        Engine.from_config(EngineConfig(model=str(no_pad)))


def test_cpu_load_is_unquantised_and_says_so(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="chat_app.engine"):
        with Engine.from_config(EngineConfig(model=str(model_dir), device="cpu")) as eng:
            assert eng.device == "cpu" and eng.quantized is False
            assert eng.model_name == str(model_dir)
    assert "unquantised" in caplog.text


def test_a_failing_step_ends_its_reply_with_error_and_serving_goes_on(tmp_path: Path) -> None:
    """Fault: the model's embedding table lacks the tokenizer's last 5 tokens."""
    model_dir = make_tiny_model(tmp_path / "m", seed=9)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    known = len(tokenizer) - 5
    model.resize_token_embeddings(known)
    model.save_pretrained(model_dir)
    unknown_word = tokenizer.decode([len(tokenizer) - 1])
    with Engine.from_config(EngineConfig(model=str(model_dir))) as eng:
        bad = eng.stream([{"role": "user", "content": unknown_word}], greedy(5))
        assert max(bad._request.prompt_ids) >= known, "setup: the prompt must hit the gap"
        bad.result(timeout=60)
        assert bad.finish_reason == "error" and "IndexError" in (bad.error or "")
        good = eng.stream(CHAT, greedy(5))
        assert max(good._request.prompt_ids) < known
        good.result(timeout=60)
        assert good.finish_reason in ("stop", "length") and good.error is None
        assert eng.in_flight() == 0


class _StopLoad(Exception):
    pass


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, *, native_bf16: bool) -> None:
    """Pretend a GPU is here: bf16 natively (compute capability 8.0 on), or only emulated."""

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native_bf16 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


@pytest.mark.parametrize(
    ("device", "native_bf16", "expected"),
    [
        ("cuda", True, torch.bfloat16),
        ("cuda:0", False, torch.float16),
        ("cpu", False, torch.float32),
        ("cpu", True, torch.float32),
    ],
)
def test_serving_and_training_load_the_base_in_the_same_dtype(
    monkeypatch: pytest.MonkeyPatch, model_dir: Path, device: str, native_bf16: bool,
    expected: torch.dtype,
) -> None:
    from chat_app.engine import loading
    from retrain import modeling

    _fake_cuda(monkeypatch, native_bf16=native_bf16)
    assert loading.compute_dtype(device) == expected
    assert modeling._compute_dtype(torch.device(device)) == expected

    # and both loaders hand that dtype (and 4-bit compute dtype) to transformers
    seen: list[dict] = []

    def from_pretrained(source: str, **kwargs: object) -> None:
        seen.append(kwargs)
        raise _StopLoad

    quantize = device.startswith("cuda")
    for module in (loading, modeling):
        monkeypatch.setattr(module.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(ModelLoadError):
        loading.load_model(EngineConfig(model=str(model_dir), device=device,
                                        quantize_4bit=quantize))
    with pytest.raises(_StopLoad):
        modeling.load_base_model(model_dir, device=torch.device(device), quantize_4bit=quantize)
    assert [kw["dtype"] for kw in seen] == [expected, expected]
    if quantize:
        assert [kw["quantization_config"].bnb_4bit_compute_dtype for kw in seen] == [
            expected, expected,
        ]
