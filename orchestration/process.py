"""The one way this project starts a process: ``ManagedProcess``.

Every server the project runs on this machine (Triton, the gateway under gunicorn, the naive server) and
every tool it runs to the end under a deadline (Locust) is one of these: its own session (so a stop reaches
its children too), its output in a log file, an optional readiness URL polled until a deadline, and a
graceful stop (SIGTERM to the leader, SIGKILL to the whole group after a timeout and again for any child
that outlived it). Failures raise the caller's typed error with the end of the log.

**Nothing outlives its starter.** A stop only runs while the starter lives; ``kill -9``, the OOM killer or a
container runtime's timeout end the starter without it. So every child is started with the kernel's
parent-death signal (``PR_SET_PDEATHSIG``, as pytriton starts ``tritonserver``): when the starter dies,
however, the child gets ``SIGTERM`` and runs its own graceful stop, which ends its children too and is
bounded by its own timeout: Triton unloads its models, ends its python-backend stubs and removes their
shared memory (``--exit-timeout-secs``); the gunicorn master stops its workers (``graceful_timeout``, then
SIGKILL); a gunicorn worker whose master vanished stops within a second by itself (gunicorn checks its
parent pid in its loop). SIGTERM rather than SIGKILL: a Triton killed outright leaves its stubs running
and their ``/dev/shm`` regions behind (measured: a stub still ran 20 s after its server's SIGKILL).

The kernel sends that signal when the *thread* that forked the child exits, not the process. So every child
is forked by one spawner thread that lives as long as the process (a daemon thread: it ends only with the
process), whichever thread asks for the start. A watchdog pipe (children that see EOF when the starter
dies) was the alternative: it reaches only code that reads the pipe, i.e. ours, and the only grandchildren
that run our code, gunicorn's workers, already stop with their master; Triton's stubs could not read it.
So the parent-death signal alone, set in the child between fork and exec and re-checked there against
the race of a parent that died during the fork (``os.getppid()``). Linux only; elsewhere children are
started without it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from fashion.errors import UserError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


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


# ------------------------------------------------------------------------------------------ HTTP probe
@dataclass(frozen=True)
class HttpReply:
    """What one HTTP exchange got: ``status`` ``None`` when nothing answered (``error`` says why)."""

    status: int | None
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    error: str = ""

    def text(self, chars: int = 300) -> str:
        """The start of the body, or why there is none (for messages)."""
        return self.error if self.status is None else self.body[:chars].decode(errors="replace")


def http_request(
    url: str,
    *,
    method: str = "GET",
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 2.0,
) -> HttpReply:
    """The one HTTP helper of orchestration (readiness polls, the first request): never raises for an
    HTTP status or an unreachable server; the reply says which."""
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            return HttpReply(r.status, r.read(), dict(r.headers))
    except urllib.error.HTTPError as e:
        return HttpReply(e.code, e.read(), dict(e.headers))
    except (urllib.error.URLError, OSError) as e:
        return HttpReply(None, error=str(e))


def tail(path: Path | None, chars: int = 3000) -> str:
    """The end of a log file, or a word saying there is none."""
    if path is None:
        return "(no log)"
    try:
        return path.read_text(errors="replace")[-chars:] or "(empty)"
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------------------------------ spawning
def _prctl() -> Callable[..., int] | None:
    """libc's ``prctl``, looked up before any fork (the child must not load libraries); ``None`` off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with(parent: int, signum: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks the kernel to send ``signum`` to the child when its parent dies."""
    prctl = _prctl()
    if prctl is None:
        return None

    def preexec() -> None:  # runs in the child, between fork and exec
        prctl(PR_SET_PDEATHSIG, signum)
        if os.getppid() != parent:  # the parent died during the fork: the signal will never come
            os.kill(os.getpid(), signum)

    return preexec


class _Spawner:
    """Forks every managed process from one thread that lives as long as this process.

    ``PR_SET_PDEATHSIG`` fires when the thread that forked the child ends: forked from a short-lived thread
    (a test's helper, a ``ThreadPoolExecutor``), a server would be killed when that thread returns.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while True:
            self._jobs.get()()

    def call(self, job: Callable[[], None]) -> threading.Event:
        """Run ``job`` on the spawner thread; the event is set once it has returned (or raised)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="fashion-spawner", daemon=True)
                self._thread.start()
        done = threading.Event()

        def run() -> None:
            try:
                job()
            finally:
                done.set()

        self._jobs.put(run)
        return done


_SPAWNER = _Spawner()


def spawn(
    command: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str],
    cwd: str | Path | None = None,
    parent_death_signal: int | None = signal.SIGTERM,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> subprocess.Popen[bytes]:
    """``Popen`` in a new session with output appended to ``log_path``, forked by the spawner thread, with
    the parent-death signal (``None``: none). ``on_start`` gets the child on the spawner thread as soon as
    it exists, so a caller interrupted meanwhile (a stop signal) still knows what to stop."""
    result: list[subprocess.Popen[bytes] | BaseException] = []

    def job() -> None:
        try:
            with log_path.open("ab") as out:
                process = subprocess.Popen(
                    list(command),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=dict(env),
                    cwd=cwd,
                    start_new_session=True,  # its own process group: stop() also reaches its children
                    preexec_fn=_die_with(os.getpid(), parent_death_signal) if parent_death_signal else None,
                )
        except BaseException as e:  # raised again in the caller's thread
            result.append(e)
            return
        if on_start is not None:
            on_start(process)
        result.append(process)

    done = _SPAWNER.call(job)
    try:
        done.wait()
    except BaseException:
        done.wait()  # the fork is under way: let it finish (on_start records it), then unwind
        raise
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


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
        parent_death_signal: what the kernel sends it when this process dies (module docstring);
            ``None``: nothing, it may outlive this process.
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
        parent_death_signal: int | None = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = Path(log_path)
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.ready_url = ready_url
        self.error = error
        self.parent_death_signal = parent_death_signal
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
        spawn(
            self.command,
            log_path=self.log_path,
            env=self.env,
            cwd=self.cwd,
            parent_death_signal=self.parent_death_signal,
            on_start=self._started,
        )
        return self

    def _started(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    def ready(self, timeout_s: float = 2.0) -> bool:
        """Does the readiness URL answer 200 now (always true without one, while running)?"""
        if self.ready_url is None:
            return self.is_running()
        reply = http_request(self.ready_url, timeout_s=timeout_s)
        self.last_answer = reply.text() if reply.status is None else f"{reply.status} {reply.text()}"
        return reply.status == 200

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


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, pgrp, ...)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    return [child for child in _pids() if (_stat(child) or ["", "0"])[1] == str(pid)]


def group_members(pgid: int) -> list[int]:
    """Live processes (zombies excluded) of process group ``pgid``: a leader's children stay in its group
    after it died, reparented to init."""
    found = []
    for pid in _pids():
        fields = _stat(pid)
        if fields is not None and fields[2] == str(pgid) and fields[0] != "Z":
            found.append(pid)
    return found


def command_line(pid: int) -> list[str]:
    """The argv of ``pid`` (empty when it is gone or unreadable)."""
    try:
        raw = (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


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
