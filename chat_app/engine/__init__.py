"""The serving engine: a causal LM with LoRA adapter versions, streaming many chats at once.

Usage::

    engine = Engine.from_config(EngineConfig(model="path/or/hub-id"))
    engine.load_adapter("v0001", "adapters/v0001")
    engine.activate("v0001")
    for piece in engine.stream([{"role": "user", "content": "Hello!"}]):
        print(piece, end="")
"""

from .engine import Engine
from .errors import (
    BASE_VERSION,
    AdapterError,
    EngineBusy,
    EngineUnavailable,
    InputTooLong,
    ModelLoadError,
)
from .generation import Generation, RankedGeneration
from .params import EngineConfig, SamplingParams

__all__ = [
    "BASE_VERSION",
    "AdapterError",
    "Engine",
    "EngineBusy",
    "EngineConfig",
    "EngineUnavailable",
    "Generation",
    "InputTooLong",
    "ModelLoadError",
    "RankedGeneration",
    "SamplingParams",
]
