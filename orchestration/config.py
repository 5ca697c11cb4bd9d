"""What ``fashion serve`` is asked to do (``ServeConfig``, ``DemoSettings``, checked when built) and the typed
errors of the local stack. Read by provisioning (``orchestration.provision``), supervision
(``orchestration.supervise``) and ``orchestration.serve``, which sequences them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fashion.errors import UserError

DEMO_SEED = 1
TRITON_HOST = "127.0.0.1"  # Triton stays on loopback: clients go through the gateway
MODEL_CONFIG_NAME = "cpu"  # configs/cpu.pbtxt: the python-backend variant the pip Triton can run
# The shipped default model (a product artifact with its card, not a build output) and its example photos.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "default"
DEFAULT_CHECKPOINT = DEFAULT_MODEL_DIR / "model.pt"


class StackError(UserError, RuntimeError):
    """The local stack cannot start or stopped working; the message says why and what to do."""


class PortInUse(StackError):
    """A port asked for is taken by another process (the message names it when it can be seen)."""


class StartupTimeout(StackError):
    """A process did not become ready in time; the message has the end of its log."""


class ProcessExited(StackError):
    """Triton or the gateway exited on its own; the message has the end of its log."""


@dataclass(frozen=True)
class DemoSettings:
    """How the demo model is built when the repository has none (defaults: what ``make serve`` builds)."""

    directory: Path = Path("demo")  # synth/ and run/ go in here
    count: int = 800
    seed: int = DEMO_SEED
    backbone: str = "efficientnet_b0"
    image_size: int = 96
    epochs: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", Path(self.directory))
        if self.count < 20:
            raise StackError(f"the demo catalogue needs at least 20 images to train on, got {self.count}")
        if self.image_size < 32:
            raise StackError(f"the demo image size must be at least 32 px, got {self.image_size}")
        if self.epochs < 1:
            raise StackError(f"the demo needs at least 1 epoch, got {self.epochs}")

    @property
    def synth_dir(self) -> Path:
        return self.directory / "synth"

    @property
    def run_dir(self) -> Path:
        return self.directory / "run"


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``fashion serve`` does; checked on construction.

    Ports: ``0`` = a free port. ``triton_*_port`` are Triton's HTTP, gRPC and metrics ports.
    ``status_file``: where the started stack is described as JSON (``ServedStack``) while it runs.
    """

    repository: Path = Path("model_repository")
    model_name: str = "fashion"
    checkpoint: Path | None = None  # export this instead of the shipped default model
    demo: bool = False  # build the synthetic demo model instead of the shipped default model
    rebuild: bool = False  # re-export (or, with ``demo``, retrain) even if the repository has a version
    demo_settings: DemoSettings = field(default_factory=DemoSettings)
    host: str = "127.0.0.1"
    port: int = 8080
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    startup_timeout_s: float = 180.0
    # Per process, before its process group is killed. Above the gateway's drain (its in-flight requests,
    # each bounded by FASHION_TIMEOUT_S, 10 s) and Triton's exit timeout (5 s).
    stop_timeout_s: float = 15.0
    smoke: bool = False  # start, send the sample request, stop
    status_file: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "repository", Path(self.repository))
        if self.status_file is not None:
            object.__setattr__(self, "status_file", Path(self.status_file))
        if self.checkpoint is not None and self.demo:
            raise StackError("--checkpoint and --demo exclude each other: serve your model or the demo")
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", Path(self.checkpoint))
            if not self.checkpoint.is_file():
                raise StackError(f"checkpoint {self.checkpoint} not found (a best.pt from `fashion train`)")
        if not self.model_name or "/" in self.model_name:
            raise StackError(f"model name must be a plain folder name, got {self.model_name!r}")
        ports = self.port_flags()
        for flag, port in ports.items():
            if not 0 <= port < 65536:
                raise StackError(f"{flag} must be a TCP port (1-65535, or 0 for a free one), got {port}")
        given = [p for p in ports.values() if p]
        if len(given) != len(set(given)):
            raise StackError(f"the gateway and Triton need different ports, got {ports}")
        if self.startup_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise StackError("startup_timeout_s and stop_timeout_s must be positive")

    def port_flags(self) -> dict[str, int]:
        """Flag → port asked for (``0``: any free one)."""
        return {
            "--port": self.port,
            "--triton-http-port": self.triton_http_port,
            "--triton-grpc-port": self.triton_grpc_port,
            "--triton-metrics-port": self.triton_metrics_port,
        }

    def wanted_ports(self) -> dict[str, tuple[str, str, int]]:
        """``Ports`` field → (flag, host, port) for ``orchestration.ports.resolve_ports``."""
        flags = self.port_flags()
        return {
            "gateway": ("--port", self.host, flags["--port"]),
            "triton_http": ("--triton-http-port", TRITON_HOST, self.triton_http_port),
            "triton_grpc": ("--triton-grpc-port", TRITON_HOST, self.triton_grpc_port),
            "triton_metrics": ("--triton-metrics-port", TRITON_HOST, self.triton_metrics_port),
        }
