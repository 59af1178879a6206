"""What every console handler works on, and the outcome types they return.

Handlers are plain functions of ``(ConsoleContext, inputs) -> result``: the page wires
them to Gradio components, and tests call them directly with a real store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from feedback_store import FeedbackStore

from ..settings import retrain_settings as settings_for_retrain

DEFAULT_PAGE_SIZE = 50


class ConsoleError(ValueError):
    """Operator input the console refuses; ``problems`` lists every one found at once."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class ActionResult:
    """The outcome of an operator action, as one line the page shows."""

    ok: bool
    message: str
    run_id: int | None = None
    version: str | None = None


@dataclass
class ConsoleContext:
    """The services an operator console reads and acts on.

    ``retrain_settings`` builds the settings mapping ``retrain.start_round`` takes; it is
    called at each "retrain now" (so the model is resolved only when needed).
    ``scheduler`` is the in-process ``RetrainScheduler`` or None when the schedule runs
    elsewhere (its state is then read and written in the store). ``default_schedule``
    is (interval minutes, minimum new feedback) for a store holding no schedule yet.
    """

    store: FeedbackStore
    retrain_settings: Callable[[], dict[str, Any]]
    export_dir: Path
    scheduler: Any | None = None
    engine: Any | None = None
    default_schedule: tuple[float, int] = (60.0, 20)
    page_size: int = DEFAULT_PAGE_SIZE
    export_max_age_seconds: float = 24 * 3600.0

    @property
    def registry(self):  # type: ignore[no-untyped-def]
        return self.store.registry


def context_from_services(
    services: Any,
    *,
    retrain_settings: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
    export_dir: Path | None = None,
) -> ConsoleContext:
    """A context over the served app's ``Services`` (see ``chat_app.server``).

    ``retrain_settings`` defaults to the settings the ``retrain`` command uses;
    ``export_dir`` to ``DATA_DIR/console-exports``.
    """
    settings = services.settings
    if retrain_settings is None:

        def provider() -> dict[str, Any]:
            return settings_for_retrain(settings)
    elif callable(retrain_settings):
        provider = retrain_settings
    else:
        fixed = dict(retrain_settings)

        def provider() -> dict[str, Any]:
            return dict(fixed)
    folder = export_dir or Path(settings.data_dir).resolve() / "console-exports"
    return ConsoleContext(
        store=services.store, retrain_settings=provider, export_dir=folder,
        scheduler=services.scheduler, engine=services.engine,
        default_schedule=(settings.retrain_interval_minutes, settings.retrain_min_feedback),
    )
