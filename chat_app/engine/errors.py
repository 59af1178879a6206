"""The engine's typed errors and the name of the bare base version."""

from __future__ import annotations

BASE_VERSION = "base"
"""Version name meaning "no adapter": requests on it run on the base model alone."""


class ModelLoadError(RuntimeError):
    """The model or its tokenizer cannot be served (missing path, no chat template, ...)."""


class AdapterError(RuntimeError):
    """An adapter version cannot be loaded, activated or unloaded as asked."""


class EngineBusy(RuntimeError):
    """Every running slot and every queue place is taken: try again later."""


class EngineUnavailable(EngineBusy):
    """No engine server answers (a remote engine is down or unreachable): try again later.

    A kind of ``EngineBusy``, so the chat page shows the same "try again" notice; the HTTP
    API answers 503 for it (429 for a full engine)."""


class InputTooLong(ValueError):
    """Even with every old turn dropped, the newest message does not fit the prompt budget.

    ``tokens`` is the size of the smallest prompt the engine could build (system prompt and
    newest turn); ``limit`` is the budget it had to fit.
    """

    def __init__(self, tokens: int, limit: int, message: str | None = None) -> None:
        super().__init__(
            message
            or f"input too long: the system prompt and the newest turn need {tokens} tokens, "
            f"the limit is {limit}"
        )
        self.tokens = tokens
        self.limit = limit
