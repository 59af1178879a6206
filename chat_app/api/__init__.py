"""The HTTP API: OpenAI-compatible chat completions and the feedback endpoints."""

from .routes import install

__all__ = ["install"]
