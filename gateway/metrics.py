"""Prometheus metrics of the gateway (prometheus-client; multiprocess mode under gunicorn).

With ``PROMETHEUS_MULTIPROC_DIR`` set (``gateway.gunicorn_conf`` does it), each worker writes its values
to files in that folder and ``/metrics`` aggregates all workers. Without it (tests, ``flask run``) each app
has its own registry. Buckets are in seconds and fit a service that answers in milliseconds.

The label values of the error families are ``gateway.errors.ErrorCode`` members, never literals, and every
member of a family has its series from the start (at 0): a dashboard or an alert finds each code before it
first happens, and a renamed code renames its series.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.errors import IMAGE_ERRORS, REFUSALS, TITLE_ERRORS, TRITON_FAILURES, ErrorCode

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
INPUTS = ("image", "image+title")  # the label values of fashion_gateway_answers_total


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
        self.title_errors = Counter(
            "fashion_gateway_title_errors_total", "Titles refused, by error code.", ["code"], registry=r
        )
        self.answered = Counter(
            "fashion_gateway_answers_total",
            "Images answered, by the inputs the model read: image, or image+title.",
            ["inputs"],
            registry=r,
        )
        self.inflight = Gauge(
            "fashion_gateway_inflight_requests",
            "Prediction requests being served.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.waiting = Gauge(
            "fashion_gateway_waiting_requests",
            "Prediction requests waiting for an in-flight slot (at most FASHION_QUEUE_WAIT_S each).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.slot_wait = Histogram(
            "fashion_gateway_slot_wait_seconds",
            "How long an admitted prediction waited for its in-flight slot (0 when one was free).",
            buckets=STAGE_BUCKETS_S,
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
        for family, codes in (
            (self.triton_errors, TRITON_FAILURES),
            (self.rejected, REFUSALS),
            (self.image_errors, IMAGE_ERRORS),
            (self.title_errors, TITLE_ERRORS),
        ):
            for code in sorted(codes):
                family.labels(code.value)
        for inputs in INPUTS:
            self.answered.labels(inputs)

    def triton_error(self, code: ErrorCode) -> None:
        """A failed Triton call (counted even when a retry then answers)."""
        self.triton_errors.labels(_member(code, TRITON_FAILURES).value).inc()

    def refused(self, code: ErrorCode) -> None:
        """A request refused before any work (authentication, overload, shutdown)."""
        self.rejected.labels(_member(code, REFUSALS).value).inc()

    def image_error(self, code: ErrorCode) -> None:
        """An image refused inside a request."""
        self.image_errors.labels(_member(code, IMAGE_ERRORS).value).inc()

    def input_error(self, code: ErrorCode) -> None:
        """An image of a request refused for its image or for its title."""
        if code in TITLE_ERRORS:
            self.title_errors.labels(code.value).inc()
        else:
            self.image_error(code)

    def answer(self, inputs: list[str]) -> None:
        """An image answered, reading ``inputs`` (the answer's ``inputs``)."""
        self.answered.labels(_member_of("+".join(inputs), INPUTS)).inc()

    def render(self) -> bytes:
        """The exposition text for ``/metrics``."""
        if self.registry is not None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)


def _member_of(value: str, family: tuple[str, ...]) -> str:
    if value not in family:
        raise ValueError(f"{value!r} is not a label value of this metric ({family})")
    return value


def _member(code: ErrorCode, family: frozenset[ErrorCode]) -> ErrorCode:
    if code not in family:
        raise ValueError(f"{code!r} is not counted in this metric family ({sorted(family)})")
    return code
