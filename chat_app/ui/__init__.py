"""The chat page: a Gradio ``Blocks`` where users chat with the model and give feedback.

``page.build_chat_page(store=..., engine=..., settings=ChatPageSettings(...))`` builds it;
``handlers.ChatHandlers`` holds the logic as plain functions (no Gradio), which is what
the tests drive. Importing this package does not import Gradio; ``build_chat_page`` does.
"""

from __future__ import annotations

from typing import Any

from .options import ChatPageSettings

__all__ = ["ChatPageSettings", "build_chat_page"]


def __getattr__(name: str) -> Any:
    if name == "build_chat_page":
        from .page import build_chat_page

        return build_chat_page
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
