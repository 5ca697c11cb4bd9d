"""The resources of one gateway app — settings, the model state (metadata + Triton), metrics, the in-flight
limit, API keys — and how a view reaches them (``gateway()``, ``json_response``). Below ``app`` (the factory,
hooks and error handlers) and the blueprints ``api`` and ``health``, which import from here, not from ``app``.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Response, current_app, jsonify

from gateway.config import GatewayConfig
from gateway.errors import Overloaded
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
        self._slots = threading.BoundedSemaphore(config.inflight_limit)
        self._keys = [k.encode("utf-8") for k in config.api_keys]

    @contextmanager
    def inflight(self) -> Iterator[None]:
        """Hold one of ``max_inflight`` slots, or refuse at once with 429: excess load must not queue."""
        if not self._slots.acquire(blocking=False):
            self.metrics.rejected.labels("inflight_limit").inc()
            raise Overloaded(
                f"this worker already serves {self.config.inflight_limit} requests; retry shortly"
            )
        self.metrics.inflight.inc()
        try:
            yield
        finally:
            self.metrics.inflight.dec()
            self._slots.release()

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


def json_response(body: dict[str, Any], status: int = 200) -> Response:
    response = jsonify(body)
    response.status_code = status
    return response
