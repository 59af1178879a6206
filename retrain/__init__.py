"""Retraining from feedback: KTO and DPO rounds on one LoRA adapter, an evaluation
gate, adapter publishing and the schedule.

The narrow entry points the serving side uses: ``start_round`` (one round in a
child process) and ``start_scheduler``. Both import torch only in the child.

The schedule needs APScheduler, which a trainer-only install (the store and the
ML extras) lacks: ``RetrainScheduler`` and ``start_scheduler`` are imported from
``retrain.scheduler`` on first use, so ``import retrain`` and ``python -m
retrain.worker`` work without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import RetrainSettings
from .runner import start_round

if TYPE_CHECKING:
    from .scheduler import RetrainScheduler, start_scheduler

__all__ = ["RetrainScheduler", "RetrainSettings", "start_round", "start_scheduler"]

_LAZY = frozenset({"RetrainScheduler", "start_scheduler"})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import scheduler

        value = getattr(scheduler, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
