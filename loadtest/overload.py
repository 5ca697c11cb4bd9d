"""``fashion overload``: answers per second against offered load, from below capacity to far past it.

Closed-loop clients (threads, one keep-alive connection each) post JPEGs to ``/v1/predict`` of a running
gateway, at each client count in turn. The ``impatient`` clients resend at once after a 429 or 503, as many
real clients do — the case that turns backpressure into a retry storm; the ``polite`` ones wait
``Retry-After`` plus a jittered back-off (``gateway.retry.Backoff``). Per point: answers/s (200s), refusals/s,
the latency of the answered requests (p50/p99), what the clients and the whole machine used of the CPU
(the clients share the machine with the stack), and the load average. Writes ``overload.json``,
``overload.md`` (the table) and ``overload.png`` (the plot) into ``--out``.

The verdict checks what issue 27 asks of the stack: at the highest client count, answers/s at least
``--min-goodput-share`` (80 %) of the best point, and the p99 of answered requests within ``--slo-p99-ms``
at every point. Exit status 1 when it does not hold (as ``fashion loadtest``), 2 when the run could not be
made.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fashion.console import emit, table
from gateway.retry import RETRY_STATUSES, Backoff, retry_after_s
from loadtest.errors import LoadtestError
from loadtest.report import percentile

log = logging.getLogger(__name__)

MODES = ("impatient", "polite")
DEFAULT_CLIENTS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class OverloadOptions:
    """One ``fashion overload`` run; checked on construction."""

    host: str
    out: Path
    images: tuple[bytes, ...]
    clients: tuple[int, ...] = DEFAULT_CLIENTS
    duration_s: float = 20.0
    warmup_s: float = 3.0
    mode: str = "impatient"
    slo_p99_ms: float = 1000.0
    min_goodput_share: float = 0.8
    knee_clients: int = 8  # where the stack reaches its capacity: offered load is counted in these

    def __post_init__(self) -> None:
        parts = urlsplit(self.host)
        if parts.scheme != "http" or not parts.hostname:
            raise LoadtestError(f"--host is a URL such as http://127.0.0.1:8080, got {self.host!r}")
        if not self.clients or min(self.clients) < 1:
            raise LoadtestError(f"--clients are positive counts, got {self.clients}")
        if self.duration_s <= 0 or self.warmup_s < 0:
            raise LoadtestError("--duration must be positive and --warmup not negative")
        if self.mode not in MODES:
            raise LoadtestError(f"--mode is one of {MODES}, got {self.mode!r}")
        if not self.images:
            raise LoadtestError("no images to send")
        if self.knee_clients < 1:
            raise LoadtestError(f"--knee is a client count, got {self.knee_clients}")
        object.__setattr__(self, "out", Path(self.out))


@dataclass(frozen=True)
class Exchange:
    start: float
    end: float
    status: int  # 0: no HTTP answer


@dataclass(frozen=True)
class OverloadPoint:
    """What ``clients`` clients got over the measured window."""

    clients: int
    answers_per_s: float
    refusals_per_s: float
    errors_per_s: float
    p50_ms: float  # of the answered (200) requests
    p99_ms: float
    statuses: dict[str, int]
    client_cores: float  # CPU the client threads used (cores)
    machine_busy: float  # share of all cores busy, clients and stack together
    load_average: float
    share_of_best: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Window:
    """The exchanges of one point, collected by the client threads."""

    measure_from: float
    stop_at: float
    exchanges: list[Exchange] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, exchange: Exchange) -> None:
        if exchange.start >= self.measure_from and exchange.end <= self.stop_at:
            with self.lock:
                self.exchanges.append(exchange)


def _post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, str | None]:
    conn.request("POST", "/v1/predict", body, {"Content-Type": "image/jpeg"})
    response = conn.getresponse()
    response.read()
    return response.status, response.getheader("Retry-After")


def _client(opts: OverloadOptions, window: _Window, seed: int) -> None:
    """One closed-loop client: send, and after a refusal resend at once or politely."""
    parts = urlsplit(opts.host)
    rng, backoff, refusals = random.Random(seed), Backoff(), 0
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=60)
    while (start := time.monotonic()) < window.stop_at:
        try:
            status, retry_after = _post(conn, opts.images[rng.randrange(len(opts.images))])
        except (OSError, http.client.HTTPException):
            status, retry_after = 0, None
            conn.close()  # reconnects on the next request
        window.add(Exchange(start, time.monotonic(), status))
        refusals = refusals + 1 if status in RETRY_STATUSES else 0
        if refusals and opts.mode == "polite":
            time.sleep(backoff.delay_s(refusals, retry_after_s(retry_after), rng))
        elif status == 0:
            time.sleep(0.05)  # nothing answers: do not spin
    conn.close()


def _cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat (zeros elsewhere)."""
    try:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


def measure_point(opts: OverloadOptions, clients: int) -> OverloadPoint:
    """``clients`` clients for the warm-up then the measured window."""
    start = time.monotonic()
    window = _Window(start + opts.warmup_s, start + opts.warmup_s + opts.duration_s)
    threads = [
        threading.Thread(target=_client, args=(opts, window, seed), daemon=True) for seed in range(clients)
    ]
    for t in threads:
        t.start()
    time.sleep(max(0.0, window.measure_from - time.monotonic()))
    cpu0, busy0, load = time.process_time(), _cpu_busy(), os.getloadavg()[0]
    time.sleep(max(0.0, window.stop_at - time.monotonic()))
    cpu1, busy1 = time.process_time(), _cpu_busy()
    for t in threads:
        t.join(120)
    seconds = opts.duration_s
    statuses = Counter(e.status for e in window.exchanges)
    answered = [(e.end - e.start) * 1000 for e in window.exchanges if e.status == 200]
    refused = sum(n for s, n in statuses.items() if s in RETRY_STATUSES)
    jiffies = busy1[1] - busy0[1]
    return OverloadPoint(
        clients=clients,
        answers_per_s=round(len(answered) / seconds, 1),
        refusals_per_s=round(refused / seconds, 1),
        errors_per_s=round((sum(statuses.values()) - len(answered) - refused) / seconds, 1),
        p50_ms=percentile(answered, 50),
        p99_ms=percentile(answered, 99),
        statuses={str(s): n for s, n in sorted(statuses.items())},
        client_cores=round((cpu1 - cpu0) / seconds, 2),
        machine_busy=round((busy1[0] - busy0[0]) / jiffies, 2) if jiffies else float("nan"),
        load_average=round(load, 1),
    )


def run_overload(opts: OverloadOptions) -> list[OverloadPoint]:
    """Every client count in turn; each point says its share of the best answers/s."""
    points = []
    for clients in opts.clients:
        point = measure_point(opts, clients)
        log.info(
            "%d clients: %.1f answers/s, %.1f refusals/s, p99 %.0f ms",
            clients,
            point.answers_per_s,
            point.refusals_per_s,
            point.p99_ms,
        )
        points.append(point)
    best = max(p.answers_per_s for p in points) or 1.0
    return [_with_share(p, best) for p in points]


def _with_share(point: OverloadPoint, best: float) -> OverloadPoint:
    return OverloadPoint(**{**asdict(point), "share_of_best": round(point.answers_per_s / best, 2)})


def verdict(opts: OverloadOptions, points: list[OverloadPoint]) -> list[str]:
    """What broke the objectives (empty: they hold)."""
    found = []
    last = points[-1]
    if last.share_of_best < opts.min_goodput_share:
        found.append(
            f"{last.clients} clients got {last.answers_per_s} answers/s, {last.share_of_best:.0%} of the "
            f"best (< {opts.min_goodput_share:.0%})"
        )
    for p in points:
        if not p.p99_ms <= opts.slo_p99_ms:
            found.append(
                f"{p.clients} clients: p99 of answered requests {p.p99_ms:g} ms > {opts.slo_p99_ms:g} ms"
            )
    return found


def markdown(opts: OverloadOptions, points: list[OverloadPoint]) -> str:
    best = max(points, key=lambda p: p.answers_per_s)
    headers = [
        "clients",
        f"x knee ({opts.knee_clients})",
        "answers/s",
        "% of best",
        "refusals/s",
        "errors/s",
        "p50 ms",
        "p99 ms",
        "client cores",
        "machine busy",
        "load avg",
    ]
    rows = [
        [
            p.clients,
            f"{p.clients / opts.knee_clients:g}",
            p.answers_per_s,
            f"{p.share_of_best:.0%}",
            p.refusals_per_s,
            p.errors_per_s,
            p.p50_ms,
            p.p99_ms,
            p.client_cores,
            f"{p.machine_busy:.0%}",
            p.load_average,
        ]
        for p in points
    ]
    retry = "resent at once" if opts.mode == "impatient" else "retried after Retry-After + jitter"
    return (
        f"{opts.mode} clients (a 429/503 is {retry}) against {opts.host}, {opts.duration_s:g} s per point "
        f"after {opts.warmup_s:g} s of warm-up; best: {best.answers_per_s} answers/s at {best.clients} "
        f"clients\n\n" + table(headers, rows)
    )


def plot(runs: dict[str, list[OverloadPoint]], png: Path, title: str) -> Path:
    """Answers/s (solid) and refusals/s (dashed) against clients (log 2), one colour per run, and the p99
    of answered requests (dotted, right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    latency = ax.twinx()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (label, points), colour in zip(runs.items(), colours, strict=False):
        clients = [p.clients for p in points]
        ax.plot(clients, [p.answers_per_s for p in points], "o-", color=colour, label=f"{label}: answers/s")
        ax.plot(
            clients, [p.refusals_per_s for p in points], "s--", color=colour, label=f"{label}: refusals/s"
        )
        latency.plot(
            clients, [p.p99_ms for p in points], "^:", color=colour, alpha=0.6, label=f"{label}: p99 ms"
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({p.clients for points in runs.values() for p in points}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("concurrent clients (offered load)")
    ax.set_ylabel("per second (answers: 200; refusals: 429/503)")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    latency.set_ylabel("p99 of answered requests (ms)")
    lines = ax.get_legend_handles_labels()
    more = latency.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def read_points(path: Path) -> list[OverloadPoint]:
    """The points of an ``overload.json``."""
    return [OverloadPoint(**p) for p in json.loads(Path(path).read_text())["points"]]


def overload_command(opts: OverloadOptions) -> int:
    opts.out.mkdir(parents=True, exist_ok=True)
    points = run_overload(opts)
    text = markdown(opts, points)
    breaches = verdict(opts, points)
    (opts.out / "overload.md").write_text(text + "\n")
    summary = {
        "options": {**asdict(opts), "images": len(opts.images), "out": str(opts.out)},
        "points": [p.to_dict() for p in points],
        "breaches": breaches,
    }
    (opts.out / "overload.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plot(
        {opts.mode: points},
        opts.out / "overload.png",
        f"fashion overload ({opts.mode} clients) against {opts.host}",
    )
    emit(text)
    emit(f"wrote {opts.out / 'overload.md'}, overload.json and overload.png")
    if breaches:
        emit("objectives broken: " + "; ".join(breaches))
        return 1
    emit(
        f"objectives met: >= {opts.min_goodput_share:.0%} of the best answers/s at {points[-1].clients} "
        f"clients, p99 of answered <= {opts.slo_p99_ms:g} ms everywhere"
    )
    return 0
