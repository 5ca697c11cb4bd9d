"""``fashion serve``: the whole product on one machine — model repository, Triton, gateway — in one command.

What ``make serve`` runs on a fresh checkout:

1. **Model.** If ``--repository`` holds no servable version of the model, export the shipped default model
   (``models/default/model.pt``: EfficientNet-Lite0 fine-tuned on real catalogue photos, see its
   ``MODEL_CARD.md``) with ``--precision auto`` (``export.pipeline``: every CPU runtime × precision timed
   and gated, the fastest that passes served; FP32 only where no real photos can calibrate and check INT8
   and BF16); no training step. ``--checkpoint`` exports that
   checkpoint instead (once: a version exported from the same file is reused). ``--demo`` builds the
   synthetic demo instead: a synthetic catalogue (``training.synth``), a small model trained on it
   (``training.train``), exported FP32; each step is skipped when its output is already there and still
   matches the settings. torch is imported only here, so a machine with a built repository starts without it.
2. **Processes.** The pip-installed Triton (``orchestration.triton.TritonServer``, ``--model-config-name
   cpu``) and the gateway under gunicorn (``orchestration.gateway.GatewayProcess``), both on loopback by
   default, each in its own process group; ready when the gateway's ``/readyz`` answers 200 (Triton up,
   model ready, metadata matching the served model).
3. **Proof.** A banner with the URLs and a curl line, then one real request through the stack with its answer.
   Then it blocks until SIGINT/SIGTERM and stops gunicorn and Triton (process groups killed if they linger).
   Meanwhile, a Triton that exits on its own is restarted on the same ports with back-off
   (``RestartPolicy``; the gateway answers 503 with Retry-After until it is back); a crash loop or a gateway
   that exits stops the stack with the reason.

Library use::

    config = ServeConfig(repository=Path("model_repository"), port=0, smoke=True)
    serve(config)            # 0 once stopped

Ports: ``0`` picks a free one. A busy port is a ``PortInUse`` error before any work starts.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import json
import logging
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from fashion.console import emit
from fashion.errors import UserError
from fashion.metadata import FILENAME, MetadataError, file_sha256, read_document, version_folders
from fashion.upload import multipart_image
from orchestration.gateway import GatewayProcess
from orchestration.process import free_ports
from orchestration.triton import TritonError, TritonServer

log = logging.getLogger(__name__)

Say = Callable[[str], None]

DEMO_SEED = 1
TRITON_HOST = "127.0.0.1"  # Triton stays on loopback: clients go through the gateway
MODEL_CONFIG_NAME = "cpu"  # configs/cpu.pbtxt: the python-backend variant the pip Triton can run
SAMPLE_IMAGE_ID = 1
# The shipped default model (a product artifact with its card, not a build output) and its example photos.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "default"
DEFAULT_CHECKPOINT = DEFAULT_MODEL_DIR / "model.pt"


class StackError(UserError, RuntimeError):
    """The local stack cannot start or stopped working; the message says why and what to do."""


class PortInUse(StackError):
    """A port asked for is taken by another process."""


class StartupTimeout(StackError):
    """A process did not become ready in time; the message has the end of its log."""


class ProcessExited(StackError):
    """Triton or the gateway exited on its own; the message has the end of its log."""


# ------------------------------------------------------------------------------------------ configuration
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
    stop_timeout_s: float = 15.0  # per process, before its process group is killed
    smoke: bool = False  # start, send the sample request, stop

    def __post_init__(self) -> None:
        object.__setattr__(self, "repository", Path(self.repository))
        if self.checkpoint is not None and self.demo:
            raise StackError("--checkpoint and --demo exclude each other: serve your model or the demo")
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", Path(self.checkpoint))
            if not self.checkpoint.is_file():
                raise StackError(f"checkpoint {self.checkpoint} not found (a best.pt from `fashion train`)")
        if not self.model_name or "/" in self.model_name:
            raise StackError(f"model name must be a plain folder name, got {self.model_name!r}")
        ports = {
            "--port": self.port,
            "--triton-http-port": self.triton_http_port,
            "--triton-grpc-port": self.triton_grpc_port,
            "--triton-metrics-port": self.triton_metrics_port,
        }
        for flag, port in ports.items():
            if not 0 <= port < 65536:
                raise StackError(f"{flag} must be a TCP port (1-65535, or 0 for a free one), got {port}")
        given = [p for p in ports.values() if p]
        if len(given) != len(set(given)):
            raise StackError(f"the gateway and Triton need different ports, got {ports}")
        if self.startup_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise StackError("startup_timeout_s and stop_timeout_s must be positive")


# ------------------------------------------------------------------------------------------ the model
def servable_version(repository: Path, name: str = "fashion") -> int | None:
    """The version the pip Triton would serve (highest numeric folder), if it is complete; else ``None``."""
    model_dir = Path(repository) / name
    if not (model_dir / "configs" / f"{MODEL_CONFIG_NAME}.pbtxt").is_file():
        return None
    versions = version_folders(model_dir)
    if not versions:
        return None
    latest = model_dir / str(versions[-1])
    if all((latest / f).is_file() for f in ("model.onnx", "model.py", FILENAME)):
        return versions[-1]
    return None


def read_metadata(repository: Path, name: str, version: int) -> dict[str, Any]:
    try:
        return read_document(Path(repository) / name / str(version) / FILENAME)
    except MetadataError as e:
        raise StackError(f"{e}; re-export with `fashion serve --rebuild`") from e


def ensure_model(config: ServeConfig, say: Say) -> int:
    """Make sure the repository serves a model (building or exporting one if needed); returns its version."""
    version = servable_version(config.repository, config.model_name)
    checkpoint = config.checkpoint
    if checkpoint is not None:
        if version is not None and not config.rebuild:
            exported_from = read_metadata(config.repository, config.model_name, version).get("training", {})
            if exported_from.get("checkpoint_sha256") == file_sha256(checkpoint):
                say(f"model: {_where(config, version)} was exported from {checkpoint}")
                return version
        return _timed(say, f"export {checkpoint}", lambda: export_for_cpu(config, checkpoint))
    if version is not None and not config.rebuild:
        again = "retrains the demo model" if config.demo else "exports the default model again"
        say(f"model: {_where(config, version)} (existing; --rebuild {again})")
        return version
    if config.demo:
        return build_demo(config, say)
    if not DEFAULT_CHECKPOINT.is_file():
        raise StackError(f"the shipped default model {DEFAULT_CHECKPOINT} is missing (a partial checkout?); "
                         "serve your own with --checkpoint, or the synthetic demo with --demo")
    return _timed(say, f"export the default model {_shown(DEFAULT_CHECKPOINT)}",
                  lambda: export_for_cpu(config, DEFAULT_CHECKPOINT))


def _where(config: ServeConfig, version: int) -> str:
    return f"{config.repository}/{config.model_name}/{version}"


def build_demo(config: ServeConfig, say: Say) -> int:
    """Synthetic catalogue → trained model → FP32 export; each step printed with its time."""
    demo = config.demo_settings
    say(
        f"building the demo model ({demo.backbone}, {demo.image_size} px, {demo.epochs} epochs, "
        f"{demo.count} synthetic products) — a one-off; later runs reuse it"
    )
    started = time.perf_counter()
    fresh_catalogue = not _catalogue_matches(demo)
    if fresh_catalogue:
        _timed(
            say, f"[1/3] synthetic catalogue: {demo.count} images → {demo.synth_dir}", lambda: _synth(demo)
        )
    else:
        say(f"[1/3] synthetic catalogue: {demo.synth_dir} (present)")
    best = demo.run_dir / "best.pt"
    reason = "the catalogue was rewritten" if fresh_catalogue else _run_mismatch(demo)
    if reason is None and not config.rebuild:
        say(f"[2/3] train: {best} (present)")
    else:
        if reason and best.is_file():
            say(f"      retraining: {reason}")
        _timed(say, f"[2/3] train {demo.backbone} → {demo.run_dir}", lambda: _train(demo))
    version = _timed(say, f"[3/3] export fp32 → {config.repository}",
                     lambda: export_for_cpu(config, best, "fp32"))
    say(f"demo model ready in {time.perf_counter() - started:.1f} s")
    return version


def _timed(say: Say, what: str, work: Callable[[], Any]) -> Any:
    say(f"{what} ...")
    started = time.perf_counter()
    result = work()
    say(f"{what}: done in {time.perf_counter() - started:.1f} s")
    return result


def _catalogue_matches(demo: DemoSettings) -> bool:
    styles = demo.synth_dir / "styles.csv"
    if not styles.is_file() or not (demo.synth_dir / "images" / f"{SAMPLE_IMAGE_ID}.jpg").is_file():
        return False
    with styles.open(newline="", encoding="utf-8") as f:
        rows = sum(1 for _ in csv.reader(f)) - 1
    return rows == demo.count


def _synth(demo: DemoSettings) -> None:
    _stage("training.synth").generate(demo.synth_dir, demo.count, demo.seed)


def _run_mismatch(demo: DemoSettings) -> str | None:
    """Why ``run_dir/best.pt`` cannot be reused for these settings (``None``: it can)."""
    best, saved = demo.run_dir / "best.pt", demo.run_dir / "config.yaml"
    if not best.is_file():
        return "no best.pt"
    if not saved.is_file():
        return f"{saved} is missing"
    import yaml

    cfg = yaml.safe_load(saved.read_text()) or {}
    wanted = {"backbone": demo.backbone, "image_size": demo.image_size, "epochs": demo.epochs}
    changed = [f"{k} {cfg.get(k)!r} → {v!r}" for k, v in wanted.items() if cfg.get(k) != v]
    if Path(str(cfg.get("data", ""))).resolve() != demo.synth_dir.resolve():
        changed.append(f"data {cfg.get('data')!r} → {str(demo.synth_dir)!r}")
    return ", ".join(changed) or None


def _train(demo: DemoSettings) -> None:
    train, config = _stage("training.train"), _stage("training.config")
    train.train(
        config.TrainConfig(
            data=str(demo.synth_dir.resolve()),
            out=str(demo.run_dir),
            format="kaggle",
            backbone=demo.backbone,
            image_size=demo.image_size,
            epochs=demo.epochs,
            seed=demo.seed,
        )
    )


def export_for_cpu(config: ServeConfig, checkpoint: Path, precisions: str = "auto") -> int:
    """Export ``checkpoint``; ``auto`` gates and times every CPU runtime × precision (INT8 and BF16 only
    where real photos exist to calibrate and check them) and serves the fastest that passed."""
    pipeline = _stage("export.pipeline")
    result = pipeline.export_checkpoint(
        pipeline.ExportOptions(
            checkpoint=checkpoint,
            repository=config.repository,
            name=config.model_name,
            precisions=precisions,
        )
    )
    return int(result.version)


def _stage(name: str) -> Any:
    """A training/export module, imported when first needed (torch comes with most of them).

    Through importlib, so that the type checker, which covers the torch-free packages, stays out of them.
    """
    return importlib.import_module(name)


# ------------------------------------------------------------------------------------------ ports
def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now (SO_REUSEADDR, as gunicorn and Triton bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class Ports:
    gateway: int
    triton_http: int
    triton_grpc: int
    triton_metrics: int


def resolve_ports(config: ServeConfig) -> Ports:
    """The four ports, ``0`` replaced by free ones; ``PortInUse`` names the flag of a busy one."""

    flags = {
        "gateway": ("--port", config.port),
        "triton_http": ("--triton-http-port", config.triton_http_port),
        "triton_grpc": ("--triton-grpc-port", config.triton_grpc_port),
        "triton_metrics": ("--triton-metrics-port", config.triton_metrics_port),
    }
    for key, (flag, port) in flags.items():
        host = config.host if key == "gateway" else TRITON_HOST
        if port and not port_free(host, port):
            raise PortInUse(
                f"port {port} on {host} is already in use (another `fashion serve`, or another "
                f"server); stop it, or choose another with {flag} N ({flag} 0 picks a free one)"
            )
    taken = {port for _, port in flags.values() if port}
    # Bound on every address for a moment: a port free there is free on loopback and on --host.
    spare = iter(p for p in free_ports(8, "0.0.0.0") if p not in taken)
    return Ports(**{key: port or next(spare) for key, (_, port) in flags.items()})


# ------------------------------------------------------------------------------------------ processes
def _http(
    method: str,
    url: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 10.0,
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@dataclass(frozen=True)
class Endpoints:
    """Where the running stack answers."""

    gateway: str  # http://host:port
    triton_http: str
    triton_grpc: str
    triton_metrics: str
    triton_pid: int
    gateway_pid: int
    logs: tuple[Path, Path]  # triton, gateway


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
    """Handle on the started processes: where they answer, whether both still run, and Triton's restarts."""

    def __init__(
        self,
        triton: Any,
        gateway: GatewayProcess,
        say: Say | None = None,
        policy: RestartPolicy = RestartPolicy(),
    ) -> None:
        self._triton = triton
        self._gateway = gateway
        self._say = say or (lambda line: log.warning("%s", line))
        self._policy = policy
        self._restarts: list[float] = []  # monotonic times of this window's restarts
        self.endpoints = Endpoints(
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
        self._triton.stop(timeout_s=10.0)  # reap it and end any python stub it left behind
        try:
            self._triton.start()
        except TritonError as e:
            self._say(f"tritonserver did not come back: {str(e).splitlines()[0]}")
            return
        self._say(f"tritonserver is back, {time.monotonic() - exited_at:.1f} s after it exited")

    def wait_ready(self, timeout_s: float) -> None:
        """Until the gateway's ``/readyz`` is 200 (Triton up, model ready, metadata matching), supervising
        both processes meanwhile (``check``)."""
        try:
            self._gateway.wait_ready(timeout_s, between=self.check)
        except StartupTimeout as e:
            triton_log = self._triton.log_tail(3000)
            raise StartupTimeout(f"the gateway: {e}\n--- triton log ---\n{triton_log}") from None


@contextlib.contextmanager
def running_stack(
    config: ServeConfig, ports: Ports, workdir: Path, say: Say | None = None
) -> Iterator[RunningStack]:
    """Triton, then the gateway; ready when the ``with`` body starts; both always stopped on exit."""
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
    try:
        triton.start()
        gateway.start()
        stack = RunningStack(triton, gateway, say)
        stack.wait_ready(config.startup_timeout_s)
        yield stack
    finally:
        # A second Ctrl-C must not cut the shutdown short (it is bounded by the stop timeouts).
        with _signals_deferred():
            gateway.stop(config.stop_timeout_s)
            triton.stop(config.stop_timeout_s)


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
def _signals_deferred() -> Iterator[None]:
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


# ------------------------------------------------------------------------------------------ the request
def sample_image(config: ServeConfig) -> Path:
    """The photo of the first request: a real catalogue photo shipped with the default model; with
    ``--demo`` a demo catalogue photo; else (``--checkpoint``) one synthetic photo, drawn once."""
    demo = config.demo_settings
    examples = sorted((DEFAULT_MODEL_DIR / "examples").glob("*.jpg"))
    if not config.demo and examples:
        return examples[0]
    path = demo.synth_dir / "images" / f"{SAMPLE_IMAGE_ID}.jpg"
    if path.is_file():
        return path
    synth = _stage("training.synth")
    path = demo.directory / "sample.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    image, quality = synth.render(synth.sample_row(SAMPLE_IMAGE_ID, demo.seed), demo.seed)
    image.save(path, "JPEG", quality=quality)
    return path


def predict_file(url: str, image: Path, timeout_s: float = 30.0) -> dict[str, Any]:
    """``POST url/v1/predict`` with ``image`` as multipart field ``image`` (what the curl line sends)."""
    body, content_type = multipart_image(image.read_bytes(), image.name)
    status, data = _http(
        "POST",
        url + "/v1/predict",
        body,
        {"Content-Type": content_type},
        timeout_s,
    )
    try:
        answer = json.loads(data)
    except ValueError as e:
        raise StackError(f"the gateway answered {status} with a body that is not JSON: {data[:200]!r}") from e
    if status != 200:
        raise StackError(f"the sample request failed with {status}: {answer}")
    return answer


def describe_prediction(answer: dict[str, Any]) -> list[str]:
    rows = []
    for attribute, p in answer.get("predictions", {}).items():
        flag = "  (uncertain)" if p.get("uncertain") else ""
        rows.append(f"  {attribute:<16} {p['label']:<16} {p['confidence']:.2f}{flag}")
    return rows


# ------------------------------------------------------------------------------------------ serve
def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it (shorter curl lines)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path.resolve())


def banner(config: ServeConfig, version: int, endpoints: Endpoints, image: Path) -> list[str]:
    meta = read_metadata(config.repository, config.model_name, version)
    model = meta.get("model", {})
    size = meta.get("preprocessing", {}).get("image_size", "?")
    url = endpoints.gateway
    return [
        "",
        f"serving {config.model_name} version {version} ({model.get('backbone', '?')}, {size} px, "
        f"{len(meta.get('outputs', []))} attributes) from {_shown(config.repository)}",
        f"  upload page     {url}/",
        f"  API             POST {url}/v1/predict   POST {url}/v1/predict/batch   GET {url}/v1/models",
        f"  health/metrics  {url}/healthz   {url}/readyz   {url}/metrics",
        f"  Triton          HTTP {endpoints.triton_http}   gRPC {endpoints.triton_grpc}   "
        f"metrics {endpoints.triton_metrics}",
        f"  processes       tritonserver pid {endpoints.triton_pid}, gunicorn pid {endpoints.gateway_pid}",
        f"  logs            {endpoints.logs[0]}   {endpoints.logs[1]}   (removed on exit)",
        "try it:",
        f"  curl -F image=@{_shown(image)} {url}/v1/predict",
    ]


def serve(config: ServeConfig, say: Say | None = None) -> int:
    """Build the model if needed, run Triton and the gateway, prove a request works, block until a stop
    signal (or return at once with ``smoke``), stop both. Returns 0; raises ``StackError`` subclasses."""

    say = say or emit
    with stop_signals():
        resolve_ports(config)  # a busy port fails now, not after minutes of building
        version = ensure_model(config, say)
        ports = resolve_ports(config)  # again: the build may have taken minutes
        image = sample_image(config)
        workdir = Path(tempfile.mkdtemp(prefix="fashion-serve-"))
        try:
            say("starting Triton and the gateway ...")
            started = time.perf_counter()
            with running_stack(config, ports, workdir, say) as stack:
                endpoints = stack.endpoints
                say(f"ready in {time.perf_counter() - started:.1f} s")
                for line in banner(config, version, endpoints, image):
                    say(line)
                answer = predict_file(endpoints.gateway, image)
                timing = answer.get("timing_ms", {})
                total_ms = timing.get("total", float("nan"))
                say(f"prediction for {_shown(image)} ({total_ms:.1f} ms in the gateway):")
                for line in describe_prediction(answer):
                    say(line)
                if config.smoke:
                    say("smoke test passed; stopping the gateway and Triton ...")
                else:
                    say("serving; press Ctrl-C to stop")
                    try:
                        _block_until_stopped(stack)
                    except StopRequested as stop:
                        say(f"{stop.args[0]} received; stopping the gateway and Triton ...")
            say("stopped")
            return 0
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def _block_until_stopped(stack: RunningStack) -> None:
    """Sleep until a stop signal. Triton exiting on its own is healed (``RunningStack.restart_triton``); the
    gateway exiting, or Triton crash-looping, ends the wait with ``ProcessExited``."""
    while True:
        time.sleep(0.5)
        stack.check()


# ------------------------------------------------------------------------------------------ CLI
