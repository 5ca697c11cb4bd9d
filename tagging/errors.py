"""Typed errors of ``fashion tag``: the CLI prints their message as one line and exits 2."""

from __future__ import annotations

from fashion.errors import UserError


class TagError(UserError, RuntimeError):
    """The job cannot start or go on; the message says what to do."""


class EngineDown(TagError):
    """The server stayed busy or away past the patience of the job; what is written is kept (resumable)."""
