"""Logging helpers: every gateway log line carries the request id (never image bytes or API keys)."""

from __future__ import annotations

import logging


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id``: the current request's id, or "-" outside a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = "-"
        try:
            from flask import g, has_request_context

            if has_request_context():
                request_id = g.get("request_id", "-")
        except ImportError:  # the client library without Flask
            pass
        record.request_id = request_id
        return True
