"""README screenshots, taken by the browser tests from the real app."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ENV = "FEEDBACK_CHAT_SCREENSHOTS"


def readme_screenshot(page: Any, name: str) -> None:
    """With FEEDBACK_CHAT_SCREENSHOTS=DIR set, save the page as DIR/name; otherwise do
    nothing (the README's pictures come from a browser-test run with it set)."""
    folder = os.environ.get(ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name))
