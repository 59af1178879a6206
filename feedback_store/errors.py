"""Typed errors raised by the store. Every one carries a message fit to show a user."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the store raises on purpose."""


class InvalidInput(StoreError, ValueError):
    """The caller passed something the store refuses (empty text, a bad label...).

    Nothing was written.
    """


class NotFound(StoreError, LookupError):
    """An id (conversation, message, reply, version, run) that does not exist."""


class Conflict(StoreError):
    """The request is well formed but clashes with the stored state."""


class RunInProgress(Conflict):
    """A training run is already queued or running somewhere in the cluster."""


class StoreUnavailable(StoreError):
    """The database cannot be reached, is locked for too long, or is gone."""
