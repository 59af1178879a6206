"""Tiny causal LMs with random weights and a locally trained tokenizer, for tests.

Nothing is downloaded: the tokenizer is trained on a few sentences here and the
model is a two-layer Llama or Qwen2 with random weights, saved like any Hugging Face
checkpoint so the code under test loads it by path, as it would a real model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from chat_app.demo_model.tokenizer import train_chat_tokenizer

SAMPLE_TEXT = [
    "Hello! How can I help you today?",
    "The capital of France is Paris, a city on the Seine.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Thank you, that was very helpful. Have a nice day!",
    "I am not sure about that; could you tell me more?",
    "Cats sleep for most of the day and hunt at night.",
    "A good reply is short, kind, and correct.",
    "user assistant system 0123456789 <script>alert(1)</script> é ü ß 你好",
]


def make_tiny_model(
    path: Path | str,
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 384,
    seed: int = 0,
) -> Path:
    """Write a tiny chat model (weights + tokenizer) to ``path`` and return it."""
    path = Path(path)
    tokenizer = train_chat_tokenizer(SAMPLE_TEXT * 4, vocab_size=vocab_size)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_adapter(model_dir: Path | str, out: Path | str, *, seed: int = 3, r: int = 4,
                      scale: float = 0.5,
                      target_modules: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A LoRA adapter for ``model_dir`` whose B weights are random (``scale`` times a
    standard normal), so it really changes the replies; saved to ``out``."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                LoraConfig(r=r, target_modules=list(target_modules)))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * scale)
    peft_model.save_pretrained(out)
    return Path(out)
