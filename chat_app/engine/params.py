"""Settings: per-request sampling parameters and the engine's configuration."""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_RERANK_SAMPLES = 16


@dataclass(frozen=True)
class SamplingParams:
    """How one reply is sampled.

    ``temperature == 0`` means greedy decoding (``top_p`` and ``seed`` are then unused).
    Otherwise the next token is drawn from ``softmax(logits / temperature)`` restricted to the
    smallest set of most likely tokens whose probabilities sum to at least ``top_p``.
    Generation stops at the chat template's end-of-turn token, at any of the model's EOS ids,
    at one of ``stop`` (the stop string itself is not returned), or after ``max_new_tokens``.
    """

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming every problem at once; return None when all is well."""
        problems: list[str] = []
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            problems.append(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        elif self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not _is_real(self.temperature) or self.temperature < 0:
            problems.append(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.stop, (tuple, list)):
            problems.append(f"stop must be a tuple of strings, got {type(self.stop).__name__}")
        else:
            for s in self.stop:
                if not isinstance(s, str) or not s:
                    problems.append(f"each stop string must be a non-empty str, got {s!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0
        ):
            problems.append(f"seed must be None or an int >= 0, got {self.seed!r}")
        if problems:
            raise ValueError("invalid sampling parameters: " + "; ".join(problems))


@dataclass(frozen=True)
class EngineConfig:
    """What to load and how much work to take on.

    ``max_concurrent`` generations advance together, step by step; up to ``max_queued`` more
    wait for a free slot; beyond that ``Engine.stream`` raises ``EngineBusy``.
    ``max_input_tokens`` is the prompt budget: the oldest turns are dropped first and the
    system prompt is always kept.
    ``rerank_samples``: when the version asked for has a reply scorer (``scorer.json`` in
    its adapter folder, written by the round that trained it), that many replies are
    sampled together and the one the scorer ranks highest is returned; 1 turns it off.
    """

    model: str
    device: str | None = None
    quantize_4bit: bool | None = None
    max_input_tokens: int = 2048
    max_concurrent: int = 8
    max_queued: int = 32
    torch_threads: int | None = None
    rerank_samples: int = 4

    def validate(self) -> None:
        """Raise ``ValueError`` naming every problem at once; return None when all is well."""
        problems: list[str] = []
        if not isinstance(self.model, str) or not self.model.strip():
            problems.append(f"model must be a non-empty hub id or path, got {self.model!r}")
        if self.device is not None and (
            not isinstance(self.device, str)
            or self.device.split(":")[0] not in ("cpu", "cuda")
        ):
            problems.append(f"device must be None, 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        for name, low in (
            ("max_input_tokens", 1),
            ("max_concurrent", 1),
            ("max_queued", 0),
            ("rerank_samples", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                problems.append(f"{name} must be an int >= {low}, got {value!r}")
        if isinstance(self.rerank_samples, int) and self.rerank_samples > MAX_RERANK_SAMPLES:
            problems.append(f"rerank_samples must be at most {MAX_RERANK_SAMPLES}, "
                            f"got {self.rerank_samples}")
        if self.torch_threads is not None and (
            isinstance(self.torch_threads, bool)
            or not isinstance(self.torch_threads, int)
            or self.torch_threads < 1
        ):
            problems.append(f"torch_threads must be None or an int >= 1, got {self.torch_threads!r}")
        if problems:
            raise ValueError("invalid engine configuration: " + "; ".join(problems))


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
