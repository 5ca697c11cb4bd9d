"""Supervision for ``fashion serve``: the processes of the local stack, kept running and always stopped.

``running_stack`` starts the pip Triton (``TritonServer``, ``--model-config-name cpu``) and the gateway
under gunicorn (``GatewayProcess``), each in its own process group with the parent-death signal
(``orchestration.process``: they stop by themselves if this process is killed), and yields a
``RunningStack`` once the gateway's ``/readyz`` answers 200. While it runs, a Triton that exits on its own
is restarted on the same ports with back-off (``RestartPolicy``; the gateway answers 503 with Retry-After
meanwhile); a crash loop or a gateway that exits ends it with ``ProcessExited``. Whatever ends it — a stop
signal, an error, a bug — is said first (a bug with its traceback), then the gateway is stopped (it drains:
accepted requests are answered, new ones get 503) and Triton after it.

Stop signals: ``stop_signals()`` turns SIGINT and SIGTERM into ``StopRequested`` (a ``KeyboardInterrupt``,
so a start in progress unwinds and cleans up); during the shutdown itself they are deferred.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from fashion.errors import UserError
from orchestration.config import (
    MODEL_CONFIG_NAME,
    TRITON_HOST,
    ProcessExited,
    ServeConfig,
    StartupTimeout,
)
from orchestration.gateway import GatewayProcess
from orchestration.ports import Ports
from orchestration.triton import TritonError, TritonServer

log = logging.getLogger(__name__)

Say = Callable[[str], None]


@dataclass(frozen=True)
class Endpoints:
    """Where the running stack answers, and its processes (Triton's pid changes when it is restarted)."""

    gateway: str  # http://host:port
    triton_http: str
    triton_grpc: str  # host:port
    triton_metrics: str
    triton_pid: int
    gateway_pid: int
    logs: tuple[Path, Path]  # triton, gateway

    def to_dict(self) -> dict[str, Any]:
        return {
            "gateway": self.gateway,
            "triton_http": self.triton_http,
            "triton_grpc": self.triton_grpc,
            "triton_metrics": self.triton_metrics,
            "triton_pid": self.triton_pid,
            "gateway_pid": self.gateway_pid,
            "logs": [str(p) for p in self.logs],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Endpoints:
        triton_log, gateway_log = (Path(p) for p in d["logs"])
        return cls(
            d["gateway"],
            d["triton_http"],
            d["triton_grpc"],
            d["triton_metrics"],
            int(d["triton_pid"]),
            int(d["gateway_pid"]),
            (triton_log, gateway_log),
        )


@dataclass(frozen=True)
class RestartPolicy:
    """How ``fashion serve`` brings Triton back when it exits on its own.

    The n-th restart within ``window_s`` waits ``backoff_s[n]`` (the last value beyond); the
    ``max_restarts + 1``-th exit within ``window_s`` (a crash loop: a broken model, no memory) stops the
    stack with a message instead. The gateway keeps running throughout and answers 503 with Retry-After.
    """

    backoff_s: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    window_s: float = 120.0
    max_restarts: int = 5


class RunningStack:
    """Handle on the started processes: where they answer, whether both still run, and Triton's restarts.

    ``on_restart`` is called with the new ``Endpoints`` once a restarted Triton is up.
    """

    def __init__(
        self,
        triton: Any,
        gateway: GatewayProcess,
        say: Say | None = None,
        policy: RestartPolicy = RestartPolicy(),
        on_restart: Callable[[Endpoints], None] | None = None,
    ) -> None:
        self._triton = triton
        self._gateway = gateway
        self._say = say or (lambda line: log.warning("%s", line))
        self._policy = policy
        self._on_restart = on_restart
        self._restarts: list[float] = []  # monotonic times of this window's restarts

    @property
    def endpoints(self) -> Endpoints:
        triton, gateway = self._triton, self._gateway
        return Endpoints(
            gateway=gateway.url,
            triton_http=f"http://{triton.http_url}",
            triton_grpc=triton.grpc_url,
            triton_metrics=triton.metrics_url,
            triton_pid=triton.pid or 0,
            gateway_pid=gateway.pid or 0,
            logs=(triton.log_path, gateway.log_path),
        )

    def check(self) -> None:
        """``ProcessExited`` (with the end of its log) if gunicorn is gone; Triton is restarted instead."""
        code = self._gateway.exit_code()
        if code is not None:
            raise ProcessExited(
                f"the gateway (gunicorn) exited with status {code}:\n{self._gateway.log_tail()}"
            )
        if not self._triton.is_running():
            self.restart_triton()

    @property
    def restarts(self) -> int:
        return len(self._restarts)

    def restart_triton(self) -> None:
        """Bring an exited Triton back on the same ports, after the policy's back-off; ``ProcessExited`` when
        it has exited too often (``RestartPolicy``). Blocks until it is ready or its start failed (the next
        ``check`` tries again)."""
        exited_at = time.monotonic()
        status = self._triton.exit_status()
        policy = self._policy
        self._restarts = [t for t in self._restarts if exited_at - t < policy.window_s]
        if len(self._restarts) >= policy.max_restarts:
            raise ProcessExited(
                f"tritonserver exited {len(self._restarts) + 1} times within {policy.window_s:.0f} s "
                f"(last status {status}); giving up. Its log ends:\n{self._triton.log_tail(3000)}"
            )
        delay = policy.backoff_s[min(len(self._restarts), len(policy.backoff_s) - 1)]
        self._restarts.append(exited_at)
        self._say(
            f"tritonserver exited (status {status}); the gateway answers 503 meanwhile. Restarting it in "
            f"{delay:g} s (restart {len(self._restarts)} of at most {policy.max_restarts} per "
            f"{policy.window_s:.0f} s)"
        )
        time.sleep(delay)
        self._triton.stop(timeout_s=10.0)  # reap it, end any python stub it left behind, free their memory
        try:
            self._triton.start()
        except TritonError as e:
            self._say(f"tritonserver did not come back: {str(e).splitlines()[0]}")
            return
        self._say(f"tritonserver is back, {time.monotonic() - exited_at:.1f} s after it exited")
        if self._on_restart is not None:
            self._on_restart(self.endpoints)

    def wait_ready(self, timeout_s: float) -> None:
        """Until the gateway's ``/readyz`` is 200 (Triton up, model ready, metadata matching), supervising
        both processes meanwhile (``check``)."""
        try:
            self._gateway.wait_ready(timeout_s, between=self.check)
        except StartupTimeout as e:
            triton_log = self._triton.log_tail(3000)
            raise StartupTimeout(f"the gateway: {e}\n--- triton log ---\n{triton_log}") from None

    def supervise(self, interval_s: float = 0.5) -> None:
        """Until a stop signal: Triton exiting on its own is healed (``restart_triton``); the gateway exiting,
        or Triton crash-looping, ends the wait with ``ProcessExited``."""
        while True:
            time.sleep(interval_s)
            self.check()


def _processes(config: ServeConfig, ports: Ports, workdir: Path) -> tuple[TritonServer, GatewayProcess]:
    metrics_dir = workdir / "prometheus"
    metrics_dir.mkdir()
    repository = config.repository.resolve()
    triton = TritonServer(
        repository,
        [config.model_name],
        model_config_name=MODEL_CONFIG_NAME,
        host=TRITON_HOST,
        http_port=ports.triton_http,
        grpc_port=ports.triton_grpc,
        metrics_port=ports.triton_metrics,
        startup_timeout_s=config.startup_timeout_s,
        log_file=workdir / "triton.log",
    )
    env = {
        "FASHION_TRITON_URL": triton.grpc_url,
        "FASHION_TRITON_PROTOCOL": "grpc",
        "FASHION_MODEL_NAME": config.model_name,
        "FASHION_MODEL_REPOSITORY": str(repository),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    gateway = GatewayProcess(
        env, workdir / "gateway.log", host=config.host, port=ports.gateway, error=StartupTimeout
    )
    return triton, gateway


@contextlib.contextmanager
def running_stack(
    config: ServeConfig,
    ports: Ports,
    workdir: Path,
    say: Say,
    on_restart: Callable[[Endpoints], None] | None = None,
) -> Iterator[RunningStack]:
    """Triton, then the gateway; ready when the ``with`` body starts. Whatever ends the body is said
    first (``said``), then the gateway is stopped (it drains) and Triton after it."""
    triton, gateway = _processes(config, ports, workdir)
    try:
        triton.start()
        gateway.start()
        stack = RunningStack(triton, gateway, say, on_restart=on_restart)
        stack.wait_ready(config.startup_timeout_s)
        yield stack
    except BaseException as e:
        said(e, say)
        raise
    finally:
        # A second Ctrl-C must not cut the shutdown short (it is bounded by the stop timeouts).
        with signals_deferred():
            gateway.stop(config.stop_timeout_s)
            triton.stop(config.stop_timeout_s)


def said(error: BaseException, say: Say) -> None:
    """Say why the stack stops, once, before anything is stopped: a stop signal by name, a user error by
    its message, anything else (a bug) with its traceback in the log."""
    if getattr(error, "_fashion_said", False):
        return
    if isinstance(error, StopRequested):
        say(f"{error.args[0]} received; stopping the gateway and Triton ...")
    elif isinstance(error, UserError):
        log.error("stopping the gateway and Triton: %s", error)
    elif isinstance(error, Exception):
        log.exception("fashion serve failed; stopping the gateway and Triton")
    with contextlib.suppress(AttributeError):
        error._fashion_said = True  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ signals
class StopRequested(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (a KeyboardInterrupt, so anything mid-start unwinds and cleans up)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_deferred = threading.local()


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    if getattr(_deferred, "active", False):
        log.info("%s received while stopping; still stopping", signal.Signals(signum).name)
        return
    raise StopRequested(signum)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Stop signals only log while the body runs (the shutdown itself)."""
    previous = getattr(_deferred, "active", False)
    _deferred.active = True
    try:
        yield
    finally:
        _deferred.active = previous


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``StopRequested`` (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.signal(s, _on_stop_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
