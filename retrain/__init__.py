"""Retraining from feedback: KTO and DPO rounds on one LoRA adapter, an evaluation
gate, adapter publishing and the schedule.

The narrow entry points the serving side uses: ``start_round`` (one round in a
child process) and ``start_scheduler``. Both import torch only in the child.
"""

from .config import RetrainSettings
from .runner import start_round
from .scheduler import RetrainScheduler, start_scheduler

__all__ = ["RetrainScheduler", "RetrainSettings", "start_round", "start_scheduler"]
