"""Prometheus metrics of the gateway (prometheus-client; multiprocess mode under gunicorn).

With ``PROMETHEUS_MULTIPROC_DIR`` set (``gateway.gunicorn_conf`` does it), each worker writes its values
to files in that folder and ``/metrics`` aggregates all workers. Without it (tests, ``flask run``) each app
has its own registry. Buckets are in seconds and fit a service that answers in milliseconds.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
STAGE_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.02,
    0.03,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
IMAGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class GatewayMetrics:
    """The gateway's metric families, registered in a per-app registry unless in multiprocess mode."""

    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir() is not None
        # In multiprocess mode values go to files; the registry is built per scrape in ``render``.
        self.registry: CollectorRegistry | None = None if self.multiprocess else CollectorRegistry()
        r = self.registry
        self.requests = Histogram(
            "fashion_gateway_request_duration_seconds",
            "Time to answer an HTTP request.",
            ["endpoint", "method", "status"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.stages = Histogram(
            "fashion_gateway_stage_duration_seconds",
            "Time per stage of a prediction request: decode, resize (per request, all images), triton "
            "(round trip), postprocess.",
            ["stage"],
            buckets=STAGE_BUCKETS_S,
            registry=r,
        )
        self.images = Histogram(
            "fashion_gateway_images_per_request",
            "Images in a prediction request.",
            ["endpoint"],
            buckets=IMAGE_BUCKETS,
            registry=r,
        )
        self.image_errors = Counter(
            "fashion_gateway_image_errors_total", "Images refused, by error code.", ["code"], registry=r
        )
        self.inflight = Gauge(
            "fashion_gateway_inflight_requests",
            "Prediction requests being served.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.triton_errors = Counter(
            "fashion_gateway_triton_errors_total", "Failed Triton calls, by kind.", ["kind"], registry=r
        )
        self.rejected = Counter(
            "fashion_gateway_rejected_total",
            "Requests refused before any work, by reason.",
            ["reason"],
            registry=r,
        )

    def render(self) -> bytes:
        """The exposition text for ``/metrics``."""
        if self.registry is not None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)
