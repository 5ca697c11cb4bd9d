"""``run_loadtest``: Locust headless in a subprocess against a deployed gateway, then the reports and SLOs.

Writes into ``out``: ``locust_stats.csv``, ``locust_stats_history.csv``, ``locust_failures.csv``,
``locust_exceptions.csv`` (Locust's), ``report.html`` (Locust's), ``requests.csv`` (every request, from the
locustfile), ``latency.png`` (ours), ``summary.json`` and ``locust.log``; and ``images/`` (the pool) unless
``images`` is given. The summary has the goodput and the latency of the successful requests beside Locust's
numbers for all of them, and the error budget (1 % by default) is checked: a run cannot pass by failing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fashion.console import table
from loadtest.errors import LoadtestError, SloViolation
from loadtest.report import (
    AGGREGATED,
    EndpointStats,
    Slo,
    plot_history,
    read_records,
    read_stats,
    summary_rows,
    with_successes,
)
from orchestration.process import ManagedProcess
from training.synth import generate

log = logging.getLogger(__name__)

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
SHAPES = ("users", "step", "constant")


@dataclass(frozen=True)
class LoadtestOptions:
    """One ``fashion loadtest`` run; checked on construction."""

    host: str
    out: Path
    users: int = 8
    spawn_rate: float = 4.0
    duration_s: int = 30
    slo: Slo = field(default_factory=Slo)
    triton_grpc: str = ""  # host:port: also run TritonGrpcUser against Triton directly
    images: Path | None = None  # pool folder; None = render a synthetic pool into out/images
    pool_size: int = 64
    shape: str = "users"
    rps: float | None = None  # constant shape: requests per second of all users together
    api_key: str = ""
    polite: bool = False  # users wait Retry-After plus a jittered back-off after a 429/503
    stop_timeout_s: int = 10
    locustfile: Path = LOCUSTFILE

    def __post_init__(self) -> None:
        if "://" not in self.host:
            raise LoadtestError(f"--host is a URL such as http://localhost:8080, got {self.host!r}")
        if self.users < 1 or self.spawn_rate <= 0 or self.duration_s < 1:
            raise LoadtestError("--users, --spawn-rate and --duration must be positive")
        if self.triton_grpc and "://" in self.triton_grpc:
            raise LoadtestError(f"--triton-grpc is host:port without a scheme, got {self.triton_grpc!r}")
        if self.shape not in SHAPES:
            raise LoadtestError(f"--shape must be one of {SHAPES}")
        if self.shape == "constant" and not self.rps:
            raise LoadtestError("--shape constant needs --rps")
        object.__setattr__(self, "out", Path(self.out))


@dataclass
class LoadtestResult:
    stats: list[EndpointStats]
    breaches: list[str]
    files: dict[str, Path]
    locust_exit_code: int


def prepare_pool(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` synthetic catalogue JPEGs (``training.synth``, real JPEG encodes of 512 px photos)."""

    images = folder / "images"
    if images.is_dir() and len(list(images.glob("*.jpg"))) >= count:
        return images
    generate(folder, count, seed=seed, start_id=200_000)
    return images


def locust_command(opts: LoadtestOptions) -> list[str]:
    locust = shutil.which("locust", path=str(Path(sys.executable).parent)) or shutil.which("locust")
    if locust is None:
        raise LoadtestError("locust is not installed: pip install -e '.[loadtest]'")
    classes = ["GatewayUser", *(["TritonGrpcUser"] if opts.triton_grpc else [])]
    return [
        locust,
        "-f",
        str(opts.locustfile),
        "--headless",
        "--host",
        opts.host,
        "--users",
        str(opts.users),
        "--spawn-rate",
        str(opts.spawn_rate),
        "--run-time",
        f"{opts.duration_s}s",
        "--stop-timeout",
        str(opts.stop_timeout_s),
        "--csv",
        str(opts.out / "locust"),
        "--csv-full-history",
        "--html",
        str(opts.out / "report.html"),
        "--only-summary",
        "--exit-code-on-error",
        "0",  # the SLOs decide the exit status, not any single failure
        "--loglevel",
        "WARNING",
        *classes,
    ]


def locust_environment(opts: LoadtestOptions, images: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "FASHION_LOADTEST_IMAGES": str(images),
        "FASHION_LOADTEST_SHAPE": opts.shape,
        "FASHION_LOADTEST_RECORD": str(opts.out / "requests.csv"),
    }
    if opts.polite:
        env["FASHION_LOADTEST_RETRY_AFTER"] = "1"
    if opts.triton_grpc:
        env["FASHION_TRITON_GRPC"] = opts.triton_grpc
    if opts.rps:
        env["FASHION_LOADTEST_RPS"] = str(opts.rps)
    if opts.api_key:
        env["FASHION_API_KEY"] = opts.api_key
    # The project root on the path: TritonGrpcUser imports fashion.contract.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def run_loadtest(opts: LoadtestOptions) -> LoadtestResult:
    """Run Locust, write the reports; raises ``SloViolation`` (after writing them) when an SLO broke."""
    opts.out.mkdir(parents=True, exist_ok=True)
    images = opts.images or prepare_pool(opts.out, opts.pool_size)
    if not Path(images).is_dir():
        raise LoadtestError(f"--images {images} is not a folder")
    cmd = locust_command(opts)
    log_path = opts.out / "locust.log"
    log.info(
        "locust: %d users for %d s against %s (log: %s)", opts.users, opts.duration_s, opts.host, log_path
    )
    log_path.unlink(missing_ok=True)
    code = ManagedProcess(
        "locust", cmd, log_path=log_path, env=locust_environment(opts, Path(images)), error=LoadtestError
    ).run(timeout_s=opts.duration_s + opts.stop_timeout_s + 120)
    stats_csv = opts.out / "locust_stats.csv"
    if code != 0 or not stats_csv.is_file():
        tail = log_path.read_text(errors="replace")[-2000:]
        raise LoadtestError(f"locust exited with status {code}:\n{tail}")
    records = read_records(opts.out / "requests.csv")
    stats = with_successes(read_stats(stats_csv), records, opts.duration_s)
    files = {
        "stats": stats_csv,
        "history": opts.out / "locust_stats_history.csv",
        "html": opts.out / "report.html",
        "png": plot_history(opts.out / "locust_stats_history.csv", opts.out / "latency.png"),
        "log": log_path,
        "requests": opts.out / "requests.csv",
    }
    breaches = opts.slo.breaches(stats)
    summary = {
        "host": opts.host,
        "users": opts.users,
        "duration_s": opts.duration_s,
        "shape": opts.shape,
        "slo": asdict(opts.slo),
        "passed": not breaches,
        "breaches": breaches,
        "endpoints": [_finite({**asdict(s), "error_rate": s.error_rate}) for s in stats],
    }
    files["summary"] = opts.out / "summary.json"
    files["summary"].write_text(json.dumps(summary, indent=2, allow_nan=False, default=str) + "\n")
    result = LoadtestResult(stats, breaches, files, code)
    return result


def _finite(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}


def summary_table(result: LoadtestResult) -> str:
    """The table, then the goodput: successful requests per second, and the share that failed."""
    total = next((s for s in result.stats if s.name == AGGREGATED), None)
    tail = ""
    if total is not None:
        tail = (
            f"\ngoodput: {total.ok_rps:.1f} successful requests/s of {total.rps:.1f} sent/s "
            f"({total.error_rate:.1%} failed)"
        )
    return table(*summary_rows(result.stats)) + tail


def check(result: LoadtestResult) -> None:
    """Raise ``SloViolation`` when the run broke an objective."""
    if result.breaches:
        raise SloViolation(result.breaches)
