"""Typed errors of the loadtest stage, and the exit codes ``fashion loadtest`` / ``fashion bench`` use.

- ``LoadtestError`` (a ``UserError``): the run could not be made (Locust missing or crashed, bad
  options, a server that does not start) → exit status **2**, like every other usage error of ``fashion``.
- ``SloViolation``: the run was made and the service broke an objective → exit status **1**, so that CI
  can tell "slow" from "broken".
"""

from __future__ import annotations

from fashion.errors import UserError

SLO_EXIT_CODE = 1


class LoadtestError(UserError):
    """A load test or benchmark could not run; the message says what to fix (exit status 2)."""


class SloViolation(Exception):
    """Measured latency or error rate broke an objective (exit status 1); ``breaches`` lists them."""

    def __init__(self, breaches: list[str]) -> None:
        super().__init__("SLO broken: " + "; ".join(breaches))
        self.breaches = breaches
