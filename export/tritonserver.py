"""Start and stop the pip-installed Triton server (``nvidia-pytriton``'s ``tritonserver``) on loopback.

Torch- and ONNX-free (standard library only), so tests, ``fashion serve`` and the gateway's integration
tests can use it::

    with TritonServer("model_repository", models=["fashion"], model_config_name="cpu") as server:
        client = tritonclient.http.InferenceServerClient(server.http_url)

The wheel carries Triton 2.51 with the python backend only. ``prepare_backends`` assembles a backend
folder from ``pytriton/tritonserver/backends/python`` plus the stub built for the running Python
(``python_backend_stubs/3.X/triton_python_backend_stub``); ``LD_LIBRARY_PATH`` gets the wheel's
``nvidia_pytriton.libs``. The stub embeds ``libpython3.X`` and finds its ``sys.path`` by looking up
``python3`` on ``PATH``: this interpreter's ``bin`` folder goes first so that the stub runs with this
virtual environment's site-packages (NumPy, ONNX Runtime for the models' ``model.py``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

from fashion.errors import UserError

log = logging.getLogger(__name__)


class TritonError(UserError, RuntimeError):
    """Base class of the launcher's errors."""


class TritonNotInstalled(TritonError):
    """The nvidia-pytriton wheel (which carries the tritonserver binary) is not installed."""


class TritonStartError(TritonError):
    """tritonserver exited or did not become ready in time; the message has the end of its log."""


def pytriton_dist() -> Path:
    """``site-packages/pytriton/tritonserver`` (found without importing pytriton)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotInstalled(
            "tritonserver is not installed: pip install 'nvidia-pytriton==0.7.0' (or `make install`; "
            "it is in the project's [serve] extra). It needs Linux x86-64 with glibc 2.35+"
        )
    dist = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (dist / "bin" / "tritonserver").is_file():
        raise TritonNotInstalled(f"{dist}/bin/tritonserver is missing: reinstall nvidia-pytriton")
    return dist


def prepare_backends(target: Path, python_version: str | None = None) -> Path:
    """A backend directory (``target/python/...``) with the stub for ``python_version`` (default: running)."""
    dist = pytriton_dist()
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonNotInstalled(f"nvidia-pytriton has no python backend stub for Python {version} ({stub})")
    python = target / "python"
    python.mkdir(parents=True, exist_ok=True)
    for item in (dist / "backends" / "python").iterdir():
        if item.is_file():
            shutil.copy2(item, python / item.name)
    shutil.copy2(stub, python / "triton_python_backend_stub")
    return target


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free TCP ports (bound to port 0 together, then released)."""
    with contextlib.ExitStack() as stack:
        sockets = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)
        ]
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]


class TritonServer:
    """One tritonserver process on loopback, in explicit model-control mode, loading ``models``.

    Args:
        repository: the model repository.
        models: models to load at start (``--load-model``); empty = none.
        model_config_name: ``--model-config-name``: read ``<model>/configs/NAME.pbtxt`` (``cpu`` for the
            python-backend variant that the pip server can run); ``None`` = ``config.pbtxt``.
        host: address to listen on (loopback by default).
        http_port, grpc_port, metrics_port: ``None`` picks free ports.
        startup_timeout_s: how long to wait for ``/v2/health/ready``.
        exit_timeout_s: ``--exit-timeout-secs``: how long Triton waits for in-flight requests (and open
            client connections) when stopping.
        log_file: where the server's output goes (default: a temporary file, removed on ``stop``).
        extra_args: more tritonserver flags.
    """

    def __init__(
        self,
        repository: str | Path,
        models: Sequence[str] = ("fashion",),
        *,
        model_config_name: str | None = "cpu",
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        startup_timeout_s: float = 120.0,
        exit_timeout_s: int = 5,
        log_file: str | Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise TritonStartError(
                f"model repository {self.repository} does not exist (run `fashion export`)"
            )
        self.models = list(models)
        self.model_config_name = model_config_name
        self.host = host
        ports = free_ports(3, host)
        self.http_port = http_port or ports[0]
        self.grpc_port = grpc_port or ports[1]
        self.metrics_port = metrics_port or ports[2]
        self.startup_timeout_s = startup_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self.extra_args = list(extra_args)
        self._log_path = Path(log_file) if log_file else None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------------------------- addresses
    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint (what ``tritonclient.http`` takes)."""
        return f"{self.host}:{self.http_port}"

    url = http_url

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def exit_status(self) -> int | None:
        """The exit status once the process has exited (negative: killed by that signal), else None."""
        return None if self._process is None else self._process.poll()

    # ------------------------------------------------------------------------------------- lifecycle
    def command(self, backend_dir: Path) -> list[str]:
        dist = pytriton_dist()
        cmd = [
            str(dist / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_dir}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--model-control-mode=explicit",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--log-verbose=0",
            f"--exit-timeout-secs={self.exit_timeout_s}",
        ]
        if (dist / "caches").is_dir():
            cmd.append(f"--cache-directory={dist / 'caches'}")
        cmd += [f"--load-model={m}" for m in self.models]
        if self.model_config_name:
            cmd.append(f"--model-config-name={self.model_config_name}")
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = pytriton_dist().parent.parent / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        # The stub embeds libpython and derives sys.path from the `python3` it finds on PATH.
        env["PATH"] = ":".join(p for p in (str(Path(sys.executable).parent), env.get("PATH", "")) if p)
        return env

    def start(self) -> TritonServer:
        """Start the process and wait until ``/v2/health/ready``; raises ``TritonStartError`` otherwise."""
        if self.is_running():
            return self
        self._workdir = tempfile.TemporaryDirectory(prefix="fashion-triton-")
        work = Path(self._workdir.name)
        backends = prepare_backends(work / "backends")
        if self._log_path is None:
            self._log_path = work / "tritonserver.log"
        cmd = self.command(backends)
        log.info("starting tritonserver: %s", " ".join(cmd))
        with open(self._log_path, "ab") as out:
            self._process = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                cwd=work,
                start_new_session=True,  # its own process group: stop() also ends the python stubs
            )
        try:
            self.wait_ready(self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        log.info(
            "tritonserver ready: http %s, grpc %s, metrics %s", self.http_url, self.grpc_url, self.metrics_url
        )
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                code = None if self._process is None else self._process.returncode
                raise TritonStartError(f"tritonserver exited with status {code}:\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.2)
        raise TritonStartError(f"tritonserver was not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, chars: int = 4000) -> str:
        if self._log_path is None or not self._log_path.is_file():
            return "(no log)"
        return self._log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM (Triton unloads models and exits), SIGKILL after ``timeout_s`` (default: the exit
        timeout + 10 s); returns the exit status."""
        timeout_s = self.exit_timeout_s + 10.0 if timeout_s is None else timeout_s
        process, self._process = self._process, None
        # The server only gets SIGTERM: it stops its python stubs itself while unloading (signalling the
        # whole group would kill the stubs first and leave Triton waiting for them).
        code = None if process is None else stop_process_group(process, timeout_s, "tritonserver")
        if self._workdir is not None:
            if self._log_path is not None and self._log_path.parent == Path(self._workdir.name):
                self._log_path = None
            self._workdir.cleanup()
            self._workdir = None
        return code

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def stop_process_group(process: subprocess.Popen[bytes], timeout_s: float, name: str) -> int:
    """Stop a process started with ``start_new_session=True`` and everything in its group.

    SIGTERM to the leader only (it shuts down its own children gracefully), SIGKILL to the group after
    ``timeout_s``, then SIGKILL to the group again for any child that outlived its leader. Returns the
    leader's exit status.
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


@contextlib.contextmanager
def triton_server(
    repository: str | Path, models: Sequence[str] = ("fashion",), **kwargs: object
) -> Iterator[TritonServer]:
    """Context manager form of ``TritonServer(...)`` (same arguments)."""
    server = TritonServer(repository, models, **kwargs)  # type: ignore[arg-type]
    with server:
        yield server
