"""Locust's CSV output → a summary table, SLO checks and a PNG of latency and throughput over time.

Reads what ``locust --csv PREFIX --csv-full-history`` writes: ``PREFIX_stats.csv`` (one row per request
name plus ``Aggregated``) and ``PREFIX_stats_history.csv`` (one row per second and name), and the locustfile's
own record of every request (``requests.csv``, ``FASHION_LOADTEST_RECORD``).

A run cannot pass by failing: Locust's percentiles mix fast refusals (a 429 in 2 ms) with answers, so the
record gives the percentiles of the *successful* requests too, and the goodput (successful requests per
second); the latency objectives are checked against the successful requests, the error budget against all.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from loadtest.errors import LoadtestError

AGGREGATED = "Aggregated"


@dataclass(frozen=True)
class EndpointStats:
    """One row of ``*_stats.csv``: latencies in ms, throughput in requests per second."""

    type: str
    name: str
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    # from the per-request record: successful requests only (NaN without a record)
    ok_rps: float = math.nan  # goodput
    ok_p50_ms: float = math.nan
    ok_p95_ms: float = math.nan
    ok_p99_ms: float = math.nan

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    def latency_ms(self, percentile: int) -> float:
        """The p50/p95/p99 of the successful requests when recorded, else of all requests."""
        ok = getattr(self, f"ok_p{percentile}_ms")
        return ok if not math.isnan(ok) else getattr(self, f"p{percentile}_ms")

    @property
    def label(self) -> str:
        return f"{self.type} {self.name}".strip()


@dataclass(frozen=True)
class Slo:
    """Objectives checked per endpoint (latency of its successful requests) and over all requests (error
    rate); ``None`` = unchecked. The error budget is on by default: a run that fails cannot pass."""

    p95_ms: float | None = None
    p99_ms: float | None = None
    max_error_rate: float | None = 0.01

    def __post_init__(self) -> None:
        for name in ("p95_ms", "p99_ms"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise LoadtestError(f"--slo-{name.replace('_', '-')} must be positive, got {value}")
        if self.max_error_rate is not None and not 0 <= self.max_error_rate <= 1:
            raise LoadtestError(f"--max-error-rate is a fraction in [0, 1], got {self.max_error_rate}")

    def breaches(self, stats: list[EndpointStats]) -> list[str]:
        """What broke the objectives, one line each (empty when all hold)."""
        found = []
        endpoints = [s for s in stats if s.name != AGGREGATED]
        total = next((s for s in stats if s.name == AGGREGATED), None)
        if total is None or total.requests == 0:
            return ["no request completed"]
        for s in endpoints:
            for percentile, objective in ((95, self.p95_ms), (99, self.p99_ms)):
                measured = s.latency_ms(percentile)
                if objective is not None and not measured <= objective:  # NaN: nothing succeeded
                    found.append(f"{s.label}: p{percentile} {measured:g} ms > {objective:g} ms")
        if self.max_error_rate is not None and total.error_rate > self.max_error_rate:
            found.append(
                f"error rate {total.error_rate:.2%} ({total.failures}/{total.requests}) > "
                f"{self.max_error_rate:.2%}"
            )
        return found


def _float(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan  # Locust writes "N/A" before the first response


def read_stats(path: str | Path) -> list[EndpointStats]:
    """Rows of ``*_stats.csv``."""
    path = Path(path)
    if not path.is_file():
        raise LoadtestError(f"Locust wrote no {path.name}; see locust.log next to it")
    with path.open(newline="") as f:
        return [
            EndpointStats(
                type=row["Type"],
                name=row["Name"],
                requests=int(row["Request Count"]),
                failures=int(row["Failure Count"]),
                rps=_float(row["Requests/s"]),
                p50_ms=_float(row["50%"]),
                p95_ms=_float(row["95%"]),
                p99_ms=_float(row["99%"]),
                max_ms=_float(row["Max Response Time"]),
            )
            for row in csv.DictReader(f)
        ]


def summary_rows(stats: list[EndpointStats]) -> tuple[list[str], list[list[object]]]:
    """All requests (Locust's numbers) beside the successful ones (the record): goodput and their latency."""
    headers = [
        "endpoint",
        "requests",
        "failures",
        "req/s",
        "p50/p95/p99 ms (all)",
        "ok/s",
        "p50/p95/p99 ms (ok)",
        "max ms",
    ]
    rows = [
        [
            s.label,
            s.requests,
            s.failures,
            f"{s.rps:.1f}",
            f"{s.p50_ms:g} / {s.p95_ms:g} / {s.p99_ms:g}",
            f"{s.ok_rps:.1f}",
            f"{s.ok_p50_ms:g} / {s.ok_p95_ms:g} / {s.ok_p99_ms:g}",
            f"{s.max_ms:.0f}",
        ]
        for s in stats
    ]
    return headers, rows


@dataclass(frozen=True)
class RequestRecord:
    """One request as the locustfile recorded it (``FASHION_LOADTEST_RECORD``)."""

    time: float
    type: str
    name: str
    ms: float
    ok: bool
    status: str


def read_records(path: str | Path) -> list[RequestRecord]:
    path = Path(path)
    if not path.is_file():
        raise LoadtestError(f"the locustfile wrote no {path.name}; see locust.log next to it")
    with path.open(newline="") as f:
        return [
            RequestRecord(float(r["time"]), r["type"], r["name"], float(r["ms"]), r["ok"] == "1", r["status"])
            for r in csv.DictReader(f)
        ]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0-100) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))], 2)


def with_successes(
    stats: list[EndpointStats], records: list[RequestRecord], duration_s: float
) -> list[EndpointStats]:
    """``stats`` with the goodput and the percentiles of the successful requests from ``records``."""
    out = []
    for s in stats:
        mine = [r for r in records if s.name == AGGREGATED or (r.name == s.name and r.type == s.type)]
        ok = [r.ms for r in mine if r.ok]
        out.append(
            replace(
                s,
                ok_rps=round(len(ok) / duration_s, 2) if duration_s > 0 else math.nan,
                ok_p50_ms=percentile(ok, 50),
                ok_p95_ms=percentile(ok, 95),
                ok_p99_ms=percentile(ok, 99),
            )
        )
    return out


def plot_history(history_csv: str | Path, png: str | Path) -> Path:
    """Latency percentiles (p50/p95/p99 per endpoint) and throughput + users over time, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history_csv, png = Path(history_csv), Path(png)
    if not history_csv.is_file():
        raise LoadtestError(f"Locust wrote no {history_csv.name}; see locust.log next to it")
    series: dict[str, dict[str, list[float]]] = {}
    with history_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            label = f"{row['Type']} {row['Name']}".strip() if row["Name"] != AGGREGATED else AGGREGATED
            s = series.setdefault(label, {k: [] for k in ("t", "users", "rps", "fps", "p50", "p95", "p99")})
            s["t"].append(float(row["Timestamp"]))
            s["users"].append(_float(row["User Count"]))
            s["rps"].append(_float(row["Requests/s"]))
            s["fps"].append(_float(row["Failures/s"]))
            for p, col in (("p50", "50%"), ("p95", "95%"), ("p99", "99%")):
                s[p].append(_float(row[col]))
    if not series:
        raise LoadtestError(f"{history_csv} is empty: the run was too short for one sample (use >= 3 s)")
    t0 = min(min(s["t"]) for s in series.values())
    fig, (ax_lat, ax_rps) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for label, s in series.items():
        if label == AGGREGATED and len(series) > 1:
            continue
        t = [x - t0 for x in s["t"]]
        for p, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
            ax_lat.plot(t, s[p], style, label=f"{label} {p}")
    ax_lat.set_ylabel("latency (ms, rolling 10 s window)")
    ax_lat.set_yscale("log")
    ax_lat.legend(fontsize=7, loc="upper left")
    ax_lat.grid(True, alpha=0.3)
    total = series.get(AGGREGATED) or next(iter(series.values()))
    t = [x - t0 for x in total["t"]]
    ax_rps.plot(t, total["rps"], label="requests/s")
    ax_rps.plot(t, total["fps"], label="failures/s", color="tab:red")
    ax_rps.set_ylabel("requests / s")
    ax_rps.set_xlabel("seconds since start")
    users = ax_rps.twinx()
    users.plot(t, total["users"], color="tab:gray", alpha=0.6, label="users")
    users.set_ylabel("users")
    ax_rps.legend(loc="upper left", fontsize=8)
    ax_rps.grid(True, alpha=0.3)
    fig.suptitle("fashion loadtest: latency and throughput over time")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
