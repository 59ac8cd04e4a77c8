"""Errors users see. Every message says what went wrong and what to do."""

from __future__ import annotations


class FaceLabError(Exception):
    """Base class: the message is shown to the user as is."""


class NotFound(FaceLabError):
    pass


class InvalidRequest(FaceLabError):
    pass


class Conflict(FaceLabError):
    """Someone else changed the same thing first (optimistic locking)."""
