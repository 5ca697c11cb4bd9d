"""The one error type every stage shares: a mistake the user can fix.

A ``UserError``'s message says what was wrong and what to do. The ``fashion`` command prints it as one line
and exits with status 2, without a traceback; any other exception is a bug and keeps its traceback. Each
stage subclasses it for its own errors (``DatasetError``, ``ExportError``, ``StackError`` …), so that
callers can catch one stage's errors and the CLI can catch them all without knowing their names.
"""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can fix; the CLI prints it as one line and exits 2."""
