"""The one way this project starts a process: ``ManagedProcess``.

Every server the project runs on this machine (Triton, the gateway under gunicorn, the naive server) and
every tool it runs to the end under a deadline (Locust) is one of these: its own session (so a stop reaches
its children too), its output in a log file, an optional readiness URL polled until a deadline, and a
graceful stop (SIGTERM to the leader, SIGKILL to the whole group after a timeout and again for any child
that outlived it). Failures raise the caller's typed error with the end of the log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from fashion.errors import UserError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]


class ProcessError(UserError, RuntimeError):
    """A managed process exited early, was not ready in time, or overran its deadline."""


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free TCP ports (bound to port 0 together, then released)."""
    with contextlib.ExitStack() as stack:
        sockets = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)
        ]
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]


def http_status(url: str, timeout_s: float = 2.0) -> tuple[int | None, str]:
    """(HTTP status, the start of the body) of a GET; (None, why) when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.read(300).decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read(300).decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return None, str(e)


def tail(path: Path | None, chars: int = 3000) -> str:
    """The end of a log file, or a word saying there is none."""
    if path is None:
        return "(no log)"
    try:
        return path.read_text(errors="replace")[-chars:] or "(empty)"
    except OSError:
        return "(no log)"


def stop_process_group(process: subprocess.Popen[bytes], timeout_s: float, name: str) -> int:
    """Stop a process started in its own session and everything in its group.

    SIGTERM to the leader only (it shuts down its own children gracefully: Triton its python stubs,
    gunicorn its workers), SIGKILL to the group after ``timeout_s``, then SIGKILL to the group again for
    any child that outlived its leader. Returns the leader's exit status.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing its process group", name, timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    return process.returncode


class ManagedProcess:
    """One child process in its own session, with a log file, a readiness URL and a graceful stop.

    Args:
        name: what messages call it ("tritonserver", "gunicorn", ...).
        command: the argv.
        log_path: stdout and stderr go here (appended).
        env: the full environment (default: this process's).
        cwd: the working directory.
        ready_url: ``wait_ready`` polls it until it answers 200; ``None``: ready once started.
        error: the typed error raised when it exits early, is not ready in time or overruns ``run``.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        ready_url: str | None = None,
        error: Callable[[str], Exception] = ProcessError,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = Path(log_path)
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.ready_url = ready_url
        self.error = error
        self.process: subprocess.Popen[bytes] | None = None
        self.last_answer = "no answer yet"  # what the readiness URL said last (for timeout messages)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def exit_code(self) -> int | None:
        """The exit status once it has exited (negative: killed by that signal), else ``None``."""
        return None if self.process is None else self.process.poll()

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return tail(self.log_path, chars)

    def start(self) -> ManagedProcess:
        """Start it (not waiting for readiness; ``wait_ready`` does). A running process is left alone."""
        if self.is_running():
            return self
        log.info("starting %s: %s", self.name, " ".join(self.command))
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                self.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # its own process group: stop() also reaches its children
            )
        return self

    def ready(self, timeout_s: float = 2.0) -> bool:
        """Does the readiness URL answer 200 now (always true without one, while running)?"""
        if self.ready_url is None:
            return self.is_running()
        status, body = http_status(self.ready_url, timeout_s)
        self.last_answer = body if status is None else f"{status} {body}"
        return status == 200

    def wait_ready(self, timeout_s: float, between: Callable[[], None] | None = None) -> None:
        """Poll until ready; the typed error with the log's end when it exits first or ``timeout_s`` passes.

        ``between`` runs before every poll (a supervisor's own checks, which may raise).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if between is not None:
                between()
            code = self.exit_code()
            if self.process is None or code is not None:
                raise self.error(f"{self.name} exited with status {code}:\n{self.log_tail()}")
            if self.ready(timeout_s=min(2.0, max(0.1, deadline - time.monotonic()))):
                return
            if time.monotonic() >= deadline:
                raise self.error(
                    f"{self.name} was not ready after {timeout_s:.0f} s (last answer: "
                    f"{self.last_answer[:300]}); its log ({self.log_path}) ends:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def stop(self, timeout_s: float) -> int | None:
        """Graceful stop of the whole group (``stop_process_group``); the exit status (``None``: never
        started)."""
        process, self.process = self.process, None
        return None if process is None else stop_process_group(process, timeout_s, self.name)

    def run(self, timeout_s: float) -> int:
        """Start it and wait for it to end; the typed error (after stopping the group) past ``timeout_s``."""
        self.start()
        assert self.process is not None
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.stop(10.0)
            raise self.error(
                f"{self.name} did not finish in {timeout_s:.0f} s; its log ({self.log_path}) ends:\n"
                f"{self.log_tail()}"
            ) from None
        except BaseException:  # Ctrl-C or SIGTERM of the caller: its own session would keep it running
            self.stop(10.0)
            raise

    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop(30.0)


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
