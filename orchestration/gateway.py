"""The gateway under gunicorn as a managed process: ``gunicorn -c python:gateway.gunicorn_conf
'gateway:create_app()'`` with ``FASHION_*`` settings, ready when ``/readyz`` answers 200 (Triton up, the
model ready, its metadata matching). ``fashion serve``, the bench and the tests all start it this way."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from orchestration.process import ROOT, ManagedProcess, ProcessError, children, free_ports

GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "python:gateway.gunicorn_conf", "gateway:create_app()"]


class GatewayProcess(ManagedProcess):
    """gunicorn serving the gateway on ``host:port`` (a free loopback port by default).

    ``settings`` are ``FASHION_*`` (and other) variables on top of this process's environment. As a context
    manager it waits for ``/readyz`` (``ready_timeout_s``) and always stops the whole group, workers included.
    """

    def __init__(
        self,
        settings: Mapping[str, str],
        log_path: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        ready_timeout_s: float = 60.0,
        error: Callable[[str], Exception] = ProcessError,
    ) -> None:
        self.host = host
        self.port = port or free_ports(1)[0]
        self.ready_timeout_s = ready_timeout_s
        env = {**os.environ, **settings}
        env.update(FASHION_PORT=str(self.port), FASHION_BIND=f"{host}:{self.port}")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        ready = self.url + "/readyz"
        super().__init__("gunicorn", GUNICORN, log_path=log_path, env=env, ready_url=ready, error=error)

    @property
    def url(self) -> str:
        """Where a client on this machine reaches it (loopback when it listens on every address)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def worker_pids(self) -> list[int]:
        return children(self.pid) if self.pid else []

    def __enter__(self) -> GatewayProcess:
        self.start()
        try:
            self.wait_ready(self.ready_timeout_s)
        except BaseException:
            self.stop(30.0)
            raise
        return self
