"""Logging helpers: every log line carries a request id, sits on one line, and holds no client data.

What the gateway logs is chosen so that no API key and no image byte reaches a log: the access log has the
method, the path (no query string), status, size, duration and request id; gateway warnings name the error
code and message (which never quote the image); gunicorn's own complaints about malformed requests name the
error class only (``gateway.gunicorn_conf.GatewayWorker``). Headers are never logged.
"""

from __future__ import annotations

import logging


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id``: the one given with ``extra=``, the current request's, or "-"."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None):
            return True
        request_id = "-"
        try:
            from flask import g, has_request_context

            if has_request_context():
                request_id = g.get("request_id", "-")
        except ImportError:  # the client library without Flask
            pass
        record.request_id = request_id
        return True


class OneLineFormatter(logging.Formatter):
    """One record, one line: CR and LF (in tracebacks, or in a path a client chose) are escaped.

    A line-oriented log collector then keeps a traceback with its request id, and a client cannot forge
    log lines with a newline in what it sends.
    """

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\r", "\\r").replace("\n", "\\n")
