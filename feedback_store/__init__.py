"""The feedback store: conversations, replies, feedback, adapter versions and runs.

Imports only SQLAlchemy and the standard library (no torch, no gradio).
"""

from .datasets import RowFilter, build_asked_prompts, build_dpo_rows, build_kto_rows, split_of
from .db import Database, default_sqlite_url, upgrade
from .errors import Conflict, InvalidInput, NotFound, RunInProgress, StoreError, StoreUnavailable
from .listing import ConversationSummary
from .records import (
    AdapterVersion,
    Conversation,
    FeedbackEvent,
    FeedbackLogRow,
    Message,
    TrainingRun,
)
from .registry import Registry
from .store import FeedbackStore, Limits

__all__ = [
    "AdapterVersion", "Conflict", "Conversation", "ConversationSummary", "Database", "FeedbackEvent", "FeedbackLogRow",
    "FeedbackStore", "InvalidInput", "Limits", "Message", "NotFound", "Registry", "RowFilter",
    "RunInProgress", "StoreError", "StoreUnavailable", "TrainingRun", "build_asked_prompts",
    "build_dpo_rows", "build_kto_rows", "default_sqlite_url", "split_of", "upgrade",
]
