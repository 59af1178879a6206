"""The 4-bit NF4 serving path, on CUDA only (skipped, with the reason, elsewhere)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_model

from chat_app.engine import Engine, EngineConfig, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_engine_serves_a_4bit_nf4_base_with_an_adapter_on_cuda(tmp_path):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path / "m", hidden_size=128)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                                LoraConfig(r=8, target_modules="all-linear"))
    peft_model.save_pretrained(tmp_path / "v0001")
    with Engine.from_config(EngineConfig(model=str(path), device="cuda")) as engine:
        assert engine.quantized
        engine.load_adapter("v0001", tmp_path / "v0001")
        engine.activate("v0001")
        gen = engine.stream([{"role": "user", "content": "hello"}],
                            SamplingParams(max_new_tokens=8, temperature=0))
        "".join(gen)
        assert gen.version == "v0001" and gen.finish_reason in ("stop", "length")
        model = engine._adapters.model
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
