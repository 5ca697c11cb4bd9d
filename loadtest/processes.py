"""The local stack for benchmarks and tests: a model repository, Triton and the gateway under gunicorn.

``Gunicorn`` starts ``gunicorn -c python:gateway.gunicorn_conf 'gateway:create_app()'`` on a free loopback
port with ``FASHION_*`` settings and always stops it; ``peak_rss_mb`` reads a process's high-water mark.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from loadtest.errors import LoadtestError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_for_http(
    url: str, timeout_s: float, exit_code: Callable[[], int | None], log_path: Path, what: str
) -> None:
    """Until ``url`` answers 200; ``LoadtestError`` with the log's tail when the process exits first, or
    naming the log when ``timeout_s`` runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if exit_code() is not None:
            raise LoadtestError(f"{what} exited: {log_path.read_text(errors='replace')[-3000:]}")
        if http_ok(url, 1.0):
            return
        time.sleep(0.2)
    raise LoadtestError(f"{what} was not ready in {timeout_s:.0f} s; see {log_path}")


class Gunicorn:
    """The gateway on a free loopback port; ``start`` waits for ``/readyz`` (model loaded) or fails.

    Process handling (own process group, graceful stop, no worker left behind) is
    ``fashion.stack.GatewayProcess``'s, the launcher ``fashion serve`` uses.
    """

    def __init__(
        self, env: dict[str, str], log_path: Path, *, port: int | None = None, ready_timeout_s: float = 60.0
    ) -> None:
        from export.tritonserver import free_ports
        from fashion.stack import GatewayProcess

        port = port or free_ports(1)[0]
        full_env = {**os.environ, **env, "FASHION_PORT": str(port), "FASHION_BIND": f"127.0.0.1:{port}"}
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), full_env.get("PYTHONPATH", "")) if p)
        self.gateway = GatewayProcess(full_env, log_path, "127.0.0.1", port)
        self.port, self.url, self.log_path = port, self.gateway.url, log_path
        self.ready_timeout_s = ready_timeout_s

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.gateway.process

    def start(self) -> Gunicorn:
        self.gateway.start()
        try:
            wait_for_http(
                self.url + "/readyz", self.ready_timeout_s, self.gateway.exit_code, self.log_path, "gunicorn"
            )
        except LoadtestError:
            self.stop()
            raise
        return self

    def worker_pids(self) -> list[int]:
        return children(self.gateway.pid) if self.gateway.pid else []

    def stop(self) -> None:
        self.gateway.stop(30.0)

    def __enter__(self) -> Gunicorn:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (psutil when installed, else /proc)."""
    try:
        import psutil

        with contextlib.suppress(psutil.Error):
            return [c.pid for c in psutil.Process(pid).children()]
        return []
    except ImportError:
        found = []
        for status in Path("/proc").glob("[0-9]*/status"):
            with contextlib.suppress(OSError):
                fields = dict(
                    line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
                )
                if int(fields.get("PPid", "0").strip()) == pid:
                    found.append(int(status.parent.name))
        return found


def peak_rss_mb(pid: int) -> float | None:
    """Peak resident set size (``VmHWM``) of ``pid`` in MiB; ``None`` when the process is gone.

    psutil has no peak on Linux (``memory_info().rss`` is the current value), so this reads /proc, and
    falls back to psutil's current RSS elsewhere.
    """
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    try:
        import psutil

        return round(psutil.Process(pid).memory_info().rss / 2**20, 1)
    except Exception:
        return None
