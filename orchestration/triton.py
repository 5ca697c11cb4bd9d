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
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

from fashion.errors import UserError
from orchestration.process import ManagedProcess, command_line, free_ports, group_members

log = logging.getLogger(__name__)

SHM = Path("/dev/shm")
STUB_REGION_PREFIX = "triton_python_backend_shm_region_"
# The python backend sometimes aborts while it sets up a stub's shared memory (an open upstream issue,
# triton-inference-server/server#8882; seen once in this project's CI, 2026-12-03): the server dies with this
# line in its log before it is ready. A second start is a fresh region and has always come up.
STARTUP_CRASH = "boost::interprocess::lock_exception"


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


def stub_regions(pgid: int) -> list[str]:
    """The shared-memory regions of the python-backend stubs in Triton's process group (a stub's third
    argument). A Triton that exits gracefully removes them; one that was killed leaves them in /dev/shm."""
    return [
        argv[2]
        for pid in group_members(pgid)
        if len(argv := command_line(pid)) > 2 and argv[2].startswith(STUB_REGION_PREFIX)
    ]


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
        self._process: ManagedProcess | None = None

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
        return self._process is not None and self._process.is_running()

    def exit_status(self) -> int | None:
        """The exit status once the process has exited (negative: killed by that signal), else None."""
        return None if self._process is None else self._process.exit_code()

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
        """Start the process and wait until ``/v2/health/ready``; raises ``TritonStartError`` otherwise.
        A start that dies of the python backend's known start-up crash (``STARTUP_CRASH``) is tried once
        more, with a warning."""
        if self.is_running():
            return self
        if self._process is not None:  # exited or killed: reap it, end its stubs, drop its work folder
            self.stop(timeout_s=10.0)
        try:
            return self._start_once()
        except TritonStartError as e:
            if STARTUP_CRASH not in str(e):
                raise
            log.warning("tritonserver aborted while starting its python backend (%s, upstream issue "
                        "triton-inference-server/server#8882); starting it once more", STARTUP_CRASH)
            return self._start_once()

    def _start_once(self) -> TritonServer:
        self._workdir = tempfile.TemporaryDirectory(prefix="fashion-triton-")
        work = Path(self._workdir.name)
        backends = prepare_backends(work / "backends")
        if self._log_path is None:
            self._log_path = work / "tritonserver.log"
        self._process = ManagedProcess(
            "tritonserver",
            self.command(backends),
            log_path=self._log_path,
            env=self.environment(),
            cwd=work,
            ready_url=f"http://{self.http_url}/v2/health/ready",
            error=TritonStartError,
        ).start()
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
        if self._process is None:
            raise TritonStartError("tritonserver was not started")
        self._process.wait_ready(timeout_s)

    def ready(self) -> bool:
        return self._process is not None and self._process.ready()

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
        regions = [] if process is None or process.pid is None else stub_regions(process.pid)
        code = None if process is None else process.stop(timeout_s)
        for region in regions:  # left behind when Triton did not stop gracefully (killed, crashed)
            (SHM / region).unlink(missing_ok=True)
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


@contextlib.contextmanager
def triton_server(
    repository: str | Path, models: Sequence[str] = ("fashion",), **kwargs: object
) -> Iterator[TritonServer]:
    """Context manager form of ``TritonServer(...)`` (same arguments)."""
    server = TritonServer(repository, models, **kwargs)  # type: ignore[arg-type]
    with server:
        yield server
