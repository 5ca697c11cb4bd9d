"""The naive server (``python -m loadtest.naive_server``: Flask + PyTorch, no Triton) as a managed process,
for the bench's baseline."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from orchestration.process import ROOT, ManagedProcess, ProcessError, free_ports


class NaiveServer(ManagedProcess):
    """The naive server for ``checkpoint`` on a free loopback port; as a context manager, ready on
    ``/healthz`` (model loaded) within two minutes, and always stopped."""

    def __init__(self, checkpoint: Path, log_path: Path, error: type[Exception] = ProcessError) -> None:
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "loadtest.naive_server", "--checkpoint", str(checkpoint)]
        super().__init__(
            "the naive server",
            [*command, "--port", str(self.port)],
            log_path=log_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
            ready_url=self.url + "/healthz",
            error=error,
        )

    def __enter__(self) -> NaiveServer:
        self.start()
        try:
            self.wait_ready(120.0)
        except BaseException:
            self.stop(20.0)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(20.0)
