"""Load a causal LM and its tokenizer for serving, with one-line errors for what cannot work.

On CUDA the weights load in 4-bit NF4 through bitsandbytes (double quantisation, bfloat16
compute, float16 on GPUs without native bfloat16) unless asked otherwise; on the CPU they
load unquantised in float32, because the bitsandbytes CPU path repacks 4-bit weights in a
way that breaks later adapter loads.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .errors import ModelLoadError
from .params import EngineConfig

log = logging.getLogger("chat_app.engine")

_MARKER = "ENGINEEOTMARKER"


@dataclass
class LoadedModel:
    """A model ready to serve: weights on ``device``, tokenizer with a pad token and template."""

    model: PreTrainedModel
    tokenizer: Any
    device: str
    quantized: bool
    stop_token_ids: frozenset[int]
    context_length: int | None


def resolve_device(config: EngineConfig) -> tuple[str, bool]:
    """Return ``(device, quantize)`` from the config's choices and what this machine has."""
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available here")
    on_cuda = device.startswith("cuda")
    quantize = on_cuda if config.quantize_4bit is None else bool(config.quantize_4bit)
    if quantize and not on_cuda:
        raise ModelLoadError(
            "4-bit quantisation is only supported on CUDA; on the CPU the model loads "
            "unquantised (set quantize_4bit=False or leave it unset)"
        )
    return device, quantize


def compute_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype of the weights (and the 4-bit compute dtype) on ``device``: float32 off
    CUDA; on CUDA bfloat16 where the GPU has it natively (compute capability 8.0 on),
    else float16. Training uses the same rule (``retrain.modeling``), so an adapter is
    served on a base in the precision it was trained against."""
    kind = device.type if isinstance(device, torch.device) else str(device).split(":", 1)[0]
    if kind != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def load_model(config: EngineConfig) -> LoadedModel:
    """Load ``config.model`` (hub id or local folder) for serving; raise ``ModelLoadError``."""
    device, quantize = resolve_device(config)
    source = _check_source(config.model)
    tokenizer = _load_tokenizer(source)
    dtype = compute_dtype(device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device.startswith("cuda"):
        kwargs["device_map"] = {"": device}
        if quantize:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
    else:
        log.info("loading %s on the CPU unquantised (float32); 4-bit NF4 needs CUDA", source)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
        raise ModelLoadError(f"cannot load model {source!r}: {_first_line(exc)}") from exc
    if not device.startswith("cuda"):
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        quantized=quantize,
        stop_token_ids=frozenset(stop_token_ids(model, tokenizer)),
        context_length=_context_length(model),
    )


def _check_source(name: str) -> str:
    """Return the path or hub id to load; a missing local path is an error, not a hub lookup."""
    path = Path(os.path.expanduser(name))
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path {name!r} is a file, not a model folder")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {name!r} has no config.json")
        return str(path)
    looks_local = (
        path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name
    )
    if looks_local:
        raise ModelLoadError(f"model path {name!r} does not exist")
    return name


def _load_tokenizer(source: str) -> Any:
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {source!r}: {_first_line(exc)}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"the tokenizer of {source!r} has no chat template; serve a chat (instruct) model"
        )
    if tokenizer.pad_token_id is None:
        for fallback in ("eos_token", "unk_token"):
            token = getattr(tokenizer, fallback, None)
            if token is not None:
                log.warning("%s has no pad token; padding with its %s %r", source, fallback, token)
                tokenizer.pad_token = token
                break
        else:
            raise ModelLoadError(
                f"the tokenizer of {source!r} has no pad, eos or unk token to pad batches with"
            )
    return tokenizer


def stop_token_ids(model: PreTrainedModel, tokenizer: Any) -> set[int]:
    """Token ids that end a reply: the tokenizer's EOS, the generation config's EOS ids and the
    special token the chat template writes right after an assistant message."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(int(i) for i in gen_eos)
    end = template_end_token(tokenizer)
    if end is not None:
        ids.add(end)
    if not ids:
        log.warning("no end-of-turn token found: replies end only at max_new_tokens or stop strings")
    return ids


def template_end_token(tokenizer: Any) -> int | None:
    """The id of the special token the chat template closes an assistant turn with, if any."""
    chat = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": _MARKER},
    ]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception:  # a template may refuse this shape of chat; then rely on EOS ids
        return None
    if _MARKER not in text:
        return None
    after = text.split(_MARKER, 1)[1].lstrip()
    best: tuple[int, int] | None = None
    for token_id, added in tokenizer.added_tokens_decoder.items():
        content = str(added)
        if added.special and content and after.startswith(content):
            if best is None or len(content) > best[1]:
                best = (token_id, len(content))
    return None if best is None else best[0]


def _context_length(model: PreTrainedModel) -> int | None:
    config = model.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
