"""What ``fashion bench`` and its sweep (``loadtest.sweep``) both use to measure a running stack: the bench
model, its name in the bench repository, the gateway's environment, an HTTP client factory and a
concurrency sweep."""

from __future__ import annotations

import http.client
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from export.sessions import SessionSpec
from fashion.metadata import ExportRecord
from loadtest.loadgen import Point, closed_loop

log = logging.getLogger(__name__)

MODEL_NAME = "fashion"


@dataclass
class BenchModel:
    """The exported model (its served CPU candidate and every other one), its checkpoint for the naive
    server, and the image pool."""

    repository: Path
    version_dir: Path
    checkpoint: Path
    jpegs: list[bytes]
    arrays: np.ndarray  # contract-preprocessed uint8 NHWC
    heads: int
    preprocessing: Any
    schema: Any
    description: str
    image_source: str
    chosen: SessionSpec  # the session configs/cpu.pbtxt serves, read back from that config
    record: ExportRecord | None = None  # what the export measured: every candidate, its gate, the ranking


class Timing(Protocol):
    """How long and at which concurrencies to measure (``BenchOptions`` is one)."""

    @property
    def concurrencies(self) -> tuple[int, ...]: ...

    @property
    def duration_s(self) -> float: ...

    @property
    def warmup_s(self) -> float: ...


def http_client_factory(url: str, path: str, jpegs: list[bytes]) -> Callable[[], Callable[[int], int]]:
    """Raw ``image/jpeg`` POSTs on a keep-alive connection per thread."""
    host, port = url.removeprefix("http://").split(":")

    def factory() -> Callable[[int], int]:
        conn = {"c": http.client.HTTPConnection(host, int(port), timeout=30)}

        def send(i: int) -> int:
            body = jpegs[i % len(jpegs)]
            try:
                conn["c"].request("POST", path, body, {"Content-Type": "image/jpeg"})
                response = conn["c"].getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                conn["c"].close()
                conn["c"] = http.client.HTTPConnection(host, int(port), timeout=30)
                raise
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")
            return 1

        return send

    return factory


def sweep_points(
    factory: Callable[[], Callable[[int], int]],
    opts: Timing,
    name: str,
    concurrencies: tuple[int, ...] | None = None,
) -> list[Point]:
    points = []
    for c in concurrencies or opts.concurrencies:
        point = closed_loop(factory, c, opts.duration_s, opts.warmup_s)
        log.info(
            "%s c=%d: %.1f img/s, p50 %.1f p95 %.1f p99 %.1f ms, %d errors",
            name,
            c,
            point.throughput_ips,
            point.p50_ms,
            point.p95_ms,
            point.p99_ms,
            point.errors,
        )
        points.append(point)
    return points


def gateway_env(triton_grpc: str, repository: Path, workers: int, threads: int, work: Path) -> dict[str, str]:
    prom = work / f"prometheus-{time.monotonic_ns()}"
    prom.mkdir(parents=True)
    return {
        "FASHION_TRITON_URL": triton_grpc,
        "FASHION_TRITON_PROTOCOL": "grpc",
        "FASHION_MODEL_REPOSITORY": str(repository),
        "FASHION_MODEL_NAME": MODEL_NAME,
        "FASHION_WORKERS": str(workers),
        "FASHION_THREADS": str(threads),
        "PROMETHEUS_MULTIPROC_DIR": str(prom),
    }
