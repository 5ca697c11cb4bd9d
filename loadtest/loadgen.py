"""A closed-loop load generator in threads: ``concurrency`` clients, each sending its next request when
the previous answer arrives, for ``duration_s`` after ``warmup_s``. Used by ``fashion bench``, where a
Locust master would cost CPU that the 2-core machine needs for the server under test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

# A client factory gives each thread its own connection; the client sends request ``i`` and returns the
# number of images it carried (it raises on a failed request).
ClientFactory = Callable[[], Callable[[int], int]]


@dataclass(frozen=True)
class Point:
    """One measurement: throughput in images/s, request latency percentiles in ms."""

    concurrency: int
    throughput_ips: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    requests: int
    errors: int
    batch_size: int = 1

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def percentiles(latencies_s: list[float]) -> tuple[float, float, float]:
    if not latencies_s:
        return (float("nan"),) * 3  # type: ignore[return-value]
    p = np.percentile(np.asarray(latencies_s) * 1000.0, [50, 95, 99])
    return round(float(p[0]), 2), round(float(p[1]), 2), round(float(p[2]), 2)


def closed_loop(factory: ClientFactory, concurrency: int, duration_s: float, warmup_s: float = 1.0) -> Point:
    """Run ``concurrency`` threads against the clients ``factory`` makes; measure after the warm-up."""
    clients = [factory() for _ in range(concurrency)]
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s
    lock = threading.Lock()
    latencies: list[float] = []
    counts = {"images": 0, "errors": 0}

    def work(index: int, send: Callable[[int], int]) -> None:
        i = index
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            try:
                n, ok = send(i), True
            except Exception:
                n, ok = 0, False
            t1 = time.perf_counter()
            i += concurrency
            if t0 >= measure_from and t1 <= stop_at:
                with lock:
                    if ok:
                        latencies.append(t1 - t0)
                        counts["images"] += n
                    else:
                        counts["errors"] += 1
            elif not ok:
                time.sleep(0.01)  # a failing server during warm-up: do not spin

    threads = [threading.Thread(target=work, args=(k, c), daemon=True) for k, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration_s + warmup_s + 60)
    p50, p95, p99 = percentiles(latencies)
    return Point(
        concurrency, round(counts["images"] / duration_s, 2), p50, p95, p99, len(latencies), counts["errors"]
    )


def best(points: list[Point], slo_p95_ms: float) -> tuple[Point, bool]:
    """The highest-throughput point whose p95 meets the SLO (else the highest overall) and whether it met."""
    meeting = [p for p in points if p.errors == 0 and p.p95_ms <= slo_p95_ms]
    if meeting:
        return max(meeting, key=lambda p: p.throughput_ips), True
    return max(points, key=lambda p: p.throughput_ips), False
