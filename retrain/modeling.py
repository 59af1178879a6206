"""Load the base model and its LoRA adapter, and turn conversational rows into tokens.

Loading rules (see DESIGN.md, "Decisions already taken"):

- On CUDA the base loads in 4-bit NF4 through bitsandbytes (QLoRA); on the CPU it
  loads unquantised in float32. 4-bit on the CPU is refused: after the first no-grad
  forward, bitsandbytes repacks CPU weights so that LoRA gets no gradients and
  adapter loads shift the base weights.
- Training starts from the parent adapter, loaded trainable (its own rank, alpha and
  target modules win), or from a fresh LoRA. The reference model is the same object
  with the adapter disabled: see :func:`reference_mode`.

Tokenisation rule, shared by training and evaluation: the prompt is the chat
template's rendering with the generation prompt; the completion is the rendering of
prompt + completion minus that prompt prefix, so the end-of-turn token belongs to the
completion and is learned. Labels are ``-100`` on the prompt and on padding. A
sequence longer than ``max_length`` loses prompt tokens from the left; the
completion is kept whole unless it alone does not fit. The two sides of a DPO pair
are truncated together (:func:`fit_pair`, as TRL does): the prompt loses what the
longer side needs, so chosen and rejected keep exactly the same prompt tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

IGNORE_INDEX = -100
ROLES = frozenset({"system", "user", "assistant", "tool"})


class InvalidRowError(ValueError):
    """A training or evaluation row does not have the documented shape."""


# --------------------------------------------------------------------------- loading


def resolve_device(device: str | None) -> torch.device:
    """Return ``torch.device(device)``; ``None`` means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: {exc}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    return resolved


def resolve_quantize(quantize_4bit: bool | None, device: torch.device) -> bool:
    """``None`` -> 4-bit exactly on CUDA. ``True`` off CUDA is a ValueError (see module doc)."""
    if quantize_4bit is None:
        return device.type == "cuda"
    if quantize_4bit and device.type != "cuda":
        raise ValueError(
            "4-bit (NF4) loading is only supported on CUDA; on the CPU bitsandbytes "
            "repacks the weights so that LoRA training gets no gradients"
        )
    return quantize_4bit


def load_tokenizer(base_model: str | Path) -> Any:
    """Load the tokenizer of ``base_model``; it must have a chat template.

    A tokenizer without a pad token gets its EOS token as pad: padding is masked by
    the attention mask and labels here, so the id only has to exist.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of {base_model!s} has no chat template")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of {base_model!s} has neither pad nor eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _compute_dtype(device: torch.device) -> torch.dtype:
    """float32 off CUDA; on CUDA bfloat16 where the GPU has it natively (compute
    capability 8.0 on), else float16. The serving engine applies the same rule
    (``chat_app.engine.loading.compute_dtype``), so an adapter trains and serves on a
    base in the same precision."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def load_base_model(
    base_model: str | Path, *, device: torch.device, quantize_4bit: bool
) -> PreTrainedModel:
    """Load the causal LM on ``device``: NF4 4-bit (double quantisation) when
    ``quantize_4bit``, else bf16/fp16 on CUDA and float32 on the CPU."""
    dtype = _compute_dtype(device)
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        index = device.index if device.index is not None else torch.cuda.current_device()
        model = AutoModelForCausalLM.from_pretrained(
            str(base_model), quantization_config=quant, dtype=dtype, device_map={"": index}
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=dtype)
        model.to(device)
    return model


def fresh_lora_config(
    *, r: int, alpha: int, dropout: float, target_modules: Sequence[str] | str
) -> LoraConfig:
    """The LoRA shape of a first adapter (later rounds inherit the parent's)."""
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_trainable_model(
    base_model: str | Path,
    *,
    parent_adapter: Path | None,
    lora: LoraConfig,
    device: torch.device,
    quantize_4bit: bool,
    gradient_checkpointing: bool = False,
) -> PeftModel:
    """Return the base wrapped in a PEFT model with only the LoRA weights trainable.

    ``parent_adapter`` (a ``save_pretrained`` folder) is loaded trainable and is the
    starting point; without it a fresh LoRA with the ``lora`` shape is created (its
    ``B`` matrices are zero, so the first policy equals the base). 4-bit bases go
    through ``prepare_model_for_kbit_training``.
    """
    base = load_base_model(base_model, device=device, quantize_4bit=quantize_4bit)
    base.config.use_cache = False
    if quantize_4bit:
        # non-reentrant checkpointing, as below: the reentrant kind needs inputs that
        # require grad and warns when torch's default is left implicit
        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    if parent_adapter is not None:
        if not (Path(parent_adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no adapter_config.json in parent adapter {parent_adapter}")
        model = PeftModel.from_pretrained(base, str(parent_adapter), is_trainable=True)
        if not isinstance(model.peft_config["default"], LoraConfig):
            raise ValueError(f"parent adapter {parent_adapter} is not a LoRA adapter")
    else:
        model = get_peft_model(base, lora)
    model.train()
    return model


def load_eval_model(
    base_model: str | Path,
    *,
    adapter_path: Path | None,
    device: torch.device,
    quantize_4bit: bool,
) -> PreTrainedModel | PeftModel:
    """Return the model in eval mode: the bare base, or the base + the adapter."""
    model: PreTrainedModel | PeftModel = load_base_model(
        base_model, device=device, quantize_4bit=quantize_4bit
    )
    if adapter_path is not None:
        if not (Path(adapter_path) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no adapter_config.json in adapter {adapter_path}")
        model = PeftModel.from_pretrained(model, str(adapter_path))
    model.eval()
    return model


@contextmanager
def reference_mode(model: PeftModel) -> Iterator[None]:
    """Run the reference model: the same weights with the adapter disabled, in eval
    mode (no dropout) and without gradients. Restores the training mode after."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter(), torch.no_grad():
            yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------- tokenisation


@dataclass(frozen=True)
class Turn:
    """One prompt and one completion as token ids, not yet truncated."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]


def check_messages(value: Any, field: str, where: str) -> list[dict[str, str]]:
    """Return ``value`` if it is a non-empty list of ``{"role", "content"}`` string
    dicts with a known role, else raise :class:`InvalidRowError` naming ``where``."""
    if not isinstance(value, list) or not value:
        raise InvalidRowError(f"{where}: {field!r} must be a non-empty list of messages")
    for k, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise InvalidRowError(
                f"{where}: {field}[{k}] must be a dict with string 'role' and 'content'"
            )
        if message["role"] not in ROLES:
            raise InvalidRowError(f"{where}: {field}[{k}] has unknown role {message['role']!r}")
    return value


def encode_turn(tokenizer: Any, prompt: list[dict], completion: list[dict], where: str) -> Turn:
    """Tokenise one prompt/completion pair by the rule in the module docstring."""
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise InvalidRowError(
            f"{where}: the chat template does not render the prompt as a prefix of "
            "prompt + completion, so the completion tokens cannot be separated"
        )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    if not completion_ids:
        raise InvalidRowError(f"{where}: the completion renders to no tokens")
    return Turn(tuple(prompt_ids), tuple(completion_ids))


@dataclass(frozen=True)
class KTOExample:
    """A thumbs row: ``turn`` was rated desirable (up) or not (down)."""

    turn: Turn
    desirable: bool


@dataclass(frozen=True)
class DPOExample:
    """A pair row: ``chosen`` was preferred over ``rejected`` after the same prompt."""

    chosen: Turn
    rejected: Turn


def encode_kto_rows(tokenizer: Any, rows: Sequence[dict]) -> list[KTOExample]:
    """Validate and tokenise TRL unpaired rows ``{prompt, completion, label}``."""
    examples = []
    for i, row in enumerate(rows):
        where = f"KTO row {i}"
        if not isinstance(row, dict):
            raise InvalidRowError(f"{where}: expected a dict, got {type(row).__name__}")
        prompt = check_messages(row.get("prompt"), "prompt", where)
        completion = check_messages(row.get("completion"), "completion", where)
        label = row.get("label")
        if not isinstance(label, bool):
            raise InvalidRowError(f"{where}: 'label' must be a bool, got {label!r}")
        examples.append(KTOExample(encode_turn(tokenizer, prompt, completion, where), label))
    return examples


def encode_dpo_rows(
    tokenizer: Any, rows: Sequence[dict], *, max_length: int | None = None
) -> list[DPOExample]:
    """Validate and tokenise TRL preference rows ``{prompt, chosen, rejected}``.

    With ``max_length`` each pair is truncated to it by :func:`fit_pair`, so that
    chosen and rejected keep the same prompt tokens (:func:`collate` with the same
    ``max_length`` then leaves them as they are)."""
    examples = []
    for i, row in enumerate(rows):
        where = f"DPO row {i}"
        if not isinstance(row, dict):
            raise InvalidRowError(f"{where}: expected a dict, got {type(row).__name__}")
        prompt = check_messages(row.get("prompt"), "prompt", where)
        chosen = check_messages(row.get("chosen"), "chosen", where)
        rejected = check_messages(row.get("rejected"), "rejected", where)
        example = DPOExample(
            encode_turn(tokenizer, prompt, chosen, where),
            encode_turn(tokenizer, prompt, rejected, where),
        )
        examples.append(example if max_length is None else fit_pair(example, max_length))
    return examples


def fit_to_length(
    prompt_ids: Sequence[int], completion_ids: Sequence[int], max_length: int
) -> tuple[list[int], list[int]]:
    """Truncate to at most ``max_length`` tokens: the prompt loses tokens from the left;
    the completion loses tokens from the right only if it leaves no room for one prompt
    token (the first completion token is predicted from the position before it)."""
    completion = list(completion_ids)[: max(1, max_length - 1)]
    room = max_length - len(completion)
    prompt = list(prompt_ids)[-room:] if room > 0 else []
    return prompt, completion


def fit_pair(example: DPOExample, max_length: int) -> DPOExample:
    """Truncate both sides of a pair to at most ``max_length`` tokens with one shared
    prompt: each completion is cut from the right only if it leaves no room for one
    prompt token (as in :func:`fit_to_length`), then the prompt loses from the left
    what the longer of the two completions needs, so chosen and rejected keep exactly
    the same prompt tokens."""
    if example.chosen.prompt_ids != example.rejected.prompt_ids:
        raise ValueError("the chosen and rejected sides of a pair have different prompts")
    keep = max(1, max_length - 1)
    chosen = example.chosen.completion_ids[:keep]
    rejected = example.rejected.completion_ids[:keep]
    room = max_length - max(len(chosen), len(rejected))
    prompt = example.chosen.prompt_ids[-room:] if room > 0 else ()
    return DPOExample(Turn(prompt, chosen), Turn(prompt, rejected))


@dataclass(frozen=True)
class Batch:
    """Right-padded token tensors; ``labels`` is ``-100`` on prompt and padding."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def pad_id(tokenizer: Any) -> int:
    """The id that pads training batches: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_id: int,
    max_length: int,
    device: torch.device,
) -> Batch:
    """Build a right-padded :class:`Batch` from ``(prompt_ids, completion_ids)`` pairs."""
    fitted = [fit_to_length(p, c, max_length) for p, c in pairs]
    width = max(len(p) + len(c) for p, c in fitted)
    input_ids = torch.full((len(fitted), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(fitted), width), dtype=torch.long)
    labels = torch.full((len(fitted), width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, completion) in enumerate(fitted):
        ids = prompt + completion
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, len(prompt) : len(ids)] = torch.tensor(completion)
    return Batch(input_ids.to(device), attention_mask.to(device), labels.to(device))


def forward_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Logits ``[B, T, V]`` of ``batch`` under ``model`` (no KV cache)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return out.logits
