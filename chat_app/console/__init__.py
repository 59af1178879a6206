"""The operator console: feedback review, exports, training runs, adapter versions.

``mount_console(app, services)`` mounts it at ``/console`` behind the operator login;
``build_console`` builds the ``gr.Blocks``; the handlers (``queries``, ``actions``,
``runs``, ``plots``, ``conversation``) are plain functions over a ``ConsoleContext``.
"""

from .context import ActionResult, ConsoleContext, ConsoleError, context_from_services
from .mount import CONSOLE_PATH, mount_console
from .page import build_console

__all__ = ["CONSOLE_PATH", "ActionResult", "ConsoleContext", "ConsoleError", "build_console",
           "context_from_services", "mount_console"]
