"""The resources of one gateway app — settings, the model state (metadata + Triton), metrics, admission (the
in-flight slots, the bounded wait, the drain), API keys — and how a view reaches them (``gateway()``,
``json_response``, ``received_at``). Below ``app`` (the factory, hooks and error handlers) and the blueprints
``api`` and ``health``, which import from here, not from ``app``.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Response, current_app, jsonify, request

from gateway.admission import RECEIVED_AT, Admission
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.state import ModelState
from gateway.triton import TritonBackend

EXTENSION = "fashion_gateway"


class Gateway:
    """The resources of one app: settings, the model state (metadata + Triton), metrics, in-flight limit."""

    def __init__(self, config: GatewayConfig, triton: TritonBackend) -> None:
        self.config = config
        self.triton = triton
        self.state = ModelState(config, triton)
        self.metrics = GatewayMetrics()
        self.admission = Admission(config.inflight_limit, config.queue_wait_s)
        self._keys = [k.encode("utf-8") for k in config.api_keys]

    @contextmanager
    def inflight(self) -> Iterator[None]:
        """Hold one of ``max_inflight`` slots, waiting for one until ``queue_wait_s`` after the request
        arrived, then 429 (``gateway.admission``)."""
        self.metrics.waiting.inc()
        waiting = True
        try:
            with self.admission.slot(received_at()) as waited_s:
                self.metrics.waiting.dec()
                waiting = False
                self.metrics.slot_wait.observe(waited_s)
                self.metrics.inflight.inc()
                try:
                    yield
                finally:
                    self.metrics.inflight.dec()
        finally:
            if waiting:
                self.metrics.waiting.dec()

    def authorized(self, key: str | None) -> bool:
        """Constant-time comparison against every configured key (no early exit on a match)."""
        if not self._keys:
            return True
        if not key:
            return False
        given = key.encode("utf-8", "surrogateescape")
        found = False
        for known in self._keys:
            found |= hmac.compare_digest(given, known)
        return found


def gateway() -> Gateway:
    """The ``Gateway`` of the current app."""
    return current_app.extensions[EXTENSION]


def received_at() -> float:
    """When the current request arrived (``time.monotonic``): when gunicorn queued it for a thread, or, in
    any other server, when the app first asked."""
    return float(request.environ.setdefault(RECEIVED_AT, time.monotonic()))


def json_response(body: dict[str, Any], status: int = 200) -> Response:
    response = jsonify(body)
    response.status_code = status
    return response
