"""Which model to serve: the one the operator named, or the built-in demo model."""

from __future__ import annotations

from .settings import Settings


def resolve_model(settings: Settings, *, progress: bool = True) -> str:
    """Return a model id or path; builds the demo model on first use (cached)."""
    if settings.model:
        return settings.model
    from .demo_model.build import ensure_demo_model

    return str(ensure_demo_model(settings.data_dir, progress=progress))
