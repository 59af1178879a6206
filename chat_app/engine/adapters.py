"""LoRA adapter versions on one model: checking folders, loading, switching, deleting.

``read_adapter_folder`` checks a folder without touching the model (any thread).
``AdapterSet`` changes the model and must only be used by the thread that runs the model:
the active adapter is global state of the PEFT model. The first adapter wraps the model with
``PeftModel.from_pretrained``; later ones use ``load_adapter``; a failed load is undone, so
the model serves exactly as before it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from feedback_store.reply_scorer import SCORER_FILE, ReplyScorer

from .errors import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
_UNKNOWN = object()
_MIXED = object()


@dataclass(frozen=True)
class AdapterFolder:
    """A checked adapter folder: its path and the tensor names its weights file holds."""

    path: Path
    tensor_names: frozenset[str]


def read_adapter_folder(path: str | Path) -> AdapterFolder:
    """Check that ``path`` holds a readable LoRA adapter; raise ``AdapterError`` if not."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {str(folder)!r} does not exist")
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise AdapterError(f"adapter folder {str(folder)!r} has no {CONFIG_FILE}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{config_file} is unreadable: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file} does not hold a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{config_file} is not a LoRA adapter (peft_type={config.get('peft_type')!r})")
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise AdapterError(f"adapter folder {str(folder)!r} has no {' or '.join(WEIGHT_FILES)}")
    try:
        names = _tensor_names(weights)
    except Exception as exc:  # safetensors and torch raise many kinds for a damaged file
        raise AdapterError(f"adapter weights {weights} are unreadable: {exc}") from exc
    if not names:
        raise AdapterError(f"adapter weights {weights} hold no tensors")
    return AdapterFolder(folder, frozenset(names))


def read_reply_scorer(folder: Path) -> ReplyScorer | None:
    """The reply scorer saved beside the adapter in ``folder`` (None when there is none);
    ``AdapterError`` when its file is damaged."""
    path = folder / SCORER_FILE
    if not path.exists():
        return None
    try:
        return ReplyScorer.load(path)
    except ValueError as exc:
        raise AdapterError(f"adapter folder {str(folder)!r}: {exc}") from exc


def _tensor_names(weights: Path) -> set[str]:
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            names = set(handle.keys())
            for name in names:  # reads every tensor, so a truncated file fails here
                handle.get_slice(name)[...]
            return names
    state = torch.load(weights, map_location="cpu", weights_only=True)
    return set(state)


class AdapterSet:
    """The adapters loaded into one model, addressed by internal PEFT adapter names."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model  # forward through this; LoRA layers are injected into it in place
        self.peft: PeftModel | None = None
        self._state: object = None  # adapter name in use, None for the bare base

    def load(self, name: str, folder: AdapterFolder) -> None:
        """Load ``folder`` as adapter ``name``; on any failure undo it and raise AdapterError."""
        try:
            with torch.no_grad():
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(
                        self.model, str(folder.path), adapter_name=name, is_trainable=False
                    )
                else:
                    self.peft.load_adapter(str(folder.path), adapter_name=name, is_trainable=False)
            expected = {_strip(k) for k in get_peft_model_state_dict(self.peft, adapter_name=name)}
            missing = sorted(expected - {_strip(k) for k in folder.tensor_names})
            if missing:
                raise AdapterError(
                    f"adapter weights in {str(folder.path)!r} lack {len(missing)} of the "
                    f"tensors its config needs, e.g. {missing[0]!r}"
                )
        except Exception as exc:
            self._undo(name)
            if isinstance(exc, AdapterError):
                raise
            text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise AdapterError(f"cannot load adapter {str(folder.path)!r}: {text}") from exc
        finally:
            self._state = _UNKNOWN

    def delete(self, name: str) -> None:
        """Remove adapter ``name``; with none left, the model is unwrapped back to the base."""
        if self.peft is not None and name in self.peft.peft_config:
            others = [n for n in self.peft.peft_config if n != name]
            if others and name in self.peft.active_adapters:
                self.peft.base_model.set_adapter(others[0], inference_mode=True)
            self.peft.delete_adapter(name)
            if not self.peft.peft_config:
                self.peft.base_model.unload()
                self.peft = None
                _forget_peft(self.model)
        self._state = _UNKNOWN

    def use(self, name: str | None) -> None:
        """Make the next plain forward run with adapter ``name`` (None: the base alone)."""
        if self._state == name or self.peft is None:
            self._state = name if self.peft is not None else None
            return
        tuner = self.peft.base_model
        if name is None:
            tuner.disable_adapter_layers()
        else:
            tuner.enable_adapter_layers()
            tuner.set_adapter(name, inference_mode=True)
        self._state = name

    def forward(self, names: list[str | None], **inputs: Any) -> Any:
        """Run the model on a batch whose row ``i`` uses adapter ``names[i]`` (None: base).

        Rows that all share one adapter take the plain path; a mix takes PEFT's mixed-batch
        path: one base forward for every row plus each adapter's LoRA on its own rows.
        """
        distinct = set(names)
        if len(distinct) == 1 or self.peft is None:
            self.use(names[0])
            return self.model(**inputs)
        if self._state is not _MIXED:
            self.peft.base_model.enable_adapter_layers()
            self._state = _MIXED
        return self.peft(**inputs, adapter_names=[n or "__base__" for n in names])

    def _undo(self, name: str) -> None:
        if self.peft is not None:
            if name in self.peft.peft_config:
                self.delete(name)
        else:  # the first wrap failed part-way: take out any LoRA layer it injected
            _strip_tuner_layers(self.model)
            _forget_peft(self.model)


def _strip(key: str) -> str:
    return key[len(_PREFIX) :] if key.startswith(_PREFIX) else key


def _strip_tuner_layers(model: torch.nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if name and isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())


def _forget_peft(model: torch.nn.Module) -> None:
    if "peft_config" in vars(model):
        del model.peft_config
