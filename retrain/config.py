"""What a training round needs to know, passed from the server or CLI to the worker."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class RetrainSettings:
    database_url: str
    adapters_dir: str
    model: str
    device: str | None = None
    quantize_4bit: bool | None = None
    eval_fraction: float = 0.2
    # TrainConfig and GateConfig overrides, e.g. {"kto_steps": 20}; also read from
    # FEEDBACK_CHAT_TRAIN_<NAME> and FEEDBACK_CHAT_GATE_<NAME> environment variables.
    train: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    # CanaryConfig overrides, e.g. {"share": 0} (off: promote directly); also read from
    # FEEDBACK_CHAT_CANARY_<NAME> environment variables.
    canary: dict[str, Any] = field(default_factory=dict)
    heartbeat_seconds: float = 5.0
    stale_after_seconds: float = 600.0  # a run silent this long is declared dead

    @classmethod
    def coerce(cls, value: RetrainSettings | dict[str, Any]) -> RetrainSettings:
        if isinstance(value, cls):
            return value
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in value.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def train_config(self):  # type: ignore[no-untyped-def]
        from .train import TrainConfig

        overrides = {**_env_overrides("FEEDBACK_CHAT_TRAIN_", TrainConfig), **self.train}
        overrides.setdefault("device", self.device)
        overrides.setdefault("quantize_4bit", self.quantize_4bit)
        cfg = TrainConfig(**overrides)
        cfg.validate()
        return cfg

    def gate_config(self):  # type: ignore[no-untyped-def]
        from .gate import GateConfig

        cfg = GateConfig(**{**_env_overrides("FEEDBACK_CHAT_GATE_", GateConfig), **self.gate})
        cfg.validate()
        return cfg

    def canary_config(self):  # type: ignore[no-untyped-def]
        from feedback_store.canary import CanaryConfig

        return CanaryConfig(**{**_env_overrides("FEEDBACK_CHAT_CANARY_", CanaryConfig),
                               **self.canary}).validate()


def _env_overrides(prefix: str, cls: type) -> dict[str, Any]:
    """Read PREFIX<FIELD> variables, converted by the field's annotated type
    ("none" clears an optional field; a comma list becomes a tuple where one is allowed)."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        raw = os.environ.get(prefix + f.name.upper())
        if raw is None:
            continue
        kind = str(f.type)
        if "None" in kind and raw.strip().lower() in ("", "none", "null"):
            out[f.name] = None
        elif "bool" in kind:
            out[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
        elif "float" in kind:
            out[f.name] = float(raw)
        elif "int" in kind:
            out[f.name] = int(raw)
        elif "tuple" in kind and "," in raw:
            out[f.name] = tuple(p.strip() for p in raw.split(",") if p.strip())
        else:
            out[f.name] = raw
    return out
