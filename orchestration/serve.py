"""``fashion serve``: the whole product on one machine — model repository, Triton, gateway — in one command.

A short sequence of two typed steps (what ``make serve`` runs on a fresh checkout):

1. **Provisioning** (``orchestration.provision.provision`` → ``ServedModel``): which version serves; the
   shipped default model (or ``--checkpoint``, or the ``--demo``) is exported first when the repository
   has none.
2. **Supervision** (``orchestration.supervise.running_stack`` → ``RunningStack``): the pip Triton and the
   gateway under gunicorn, ready when the gateway's ``/readyz`` answers 200, Triton restarted when it
   exits on its own, both stopped at the end — and by the kernel if this process is killed.

``served()`` gives back what it started as a ``ServedStack`` (model, URLs, PIDs, logs); ``serve()`` also
proves one real request, hands the value to ``on_ready`` (the CLI prints it and ``--status-file`` writes it
as JSON), and blocks until SIGINT/SIGTERM (or returns at once with ``smoke``). Library use::

    with served(ServeConfig(repository=Path("model_repository"), port=0)) as stack:
        predict_file(stack.endpoints.gateway, photo)

Ports: ``0`` picks a free one. A busy port is a ``PortInUse`` error, naming the process that holds it,
before any work starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fashion.console import emit
from fashion.metadata import MetadataError, load_metadata
from fashion.upload import multipart_image
from orchestration.config import (
    DEFAULT_CHECKPOINT,
    DEFAULT_MODEL_DIR,
    DemoSettings,
    PortInUse,
    ProcessExited,
    ServeConfig,
    StackError,
    StartupTimeout,
)
from orchestration.ports import resolve_ports
from orchestration.process import http_request
from orchestration.provision import (
    ServedModel,
    ensure_model,
    provision,
    read_metadata,
    sample_image,
    sample_title,
    servable_version,
    shown,
)
from orchestration.supervise import (
    Endpoints,
    RestartPolicy,
    RunningStack,
    StopRequested,
    running_stack,
    said,
    stop_signals,
)

__all__ = [
    "DEFAULT_CHECKPOINT",
    "DEFAULT_MODEL_DIR",
    "DemoSettings",
    "Endpoints",
    "PortInUse",
    "ProcessExited",
    "RestartPolicy",
    "RunningStack",
    "ServeConfig",
    "ServedModel",
    "ServedStack",
    "StackError",
    "StartupTimeout",
    "banner",
    "ensure_model",
    "predict_file",
    "provision",
    "read_metadata",
    "sample_image",
    "sample_title",
    "servable_version",
    "serve",
    "served",
]

log = logging.getLogger(__name__)

Say = Callable[[str], None]


@dataclass(frozen=True)
class ServedStack:
    """What ``fashion serve`` started: the model it serves and where and as which processes."""

    model: ServedModel
    endpoints: Endpoints

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "endpoints": self.endpoints.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServedStack:
        return cls(ServedModel.from_dict(d["model"]), Endpoints.from_dict(d["endpoints"]))

    @classmethod
    def read(cls, path: Path) -> ServedStack:
        """From a ``--status-file``."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def write(self, path: Path) -> None:
        """Atomically (a reader never sees half a file)."""
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(partial, path)


@contextlib.contextmanager
def _started(config: ServeConfig, say: Say) -> Iterator[tuple[ServedStack, RunningStack]]:
    resolve_ports(config.wanted_ports(), PortInUse)  # a busy port fails now, not after minutes of building
    model = provision(config, say)
    ports = resolve_ports(config.wanted_ports(), PortInUse)  # again: the build may have taken minutes
    workdir = Path(tempfile.mkdtemp(prefix="fashion-serve-"))
    status_file = config.status_file

    def describe(endpoints: Endpoints) -> None:  # at start, and again when Triton was restarted
        if status_file is not None:
            ServedStack(model, endpoints).write(status_file)

    try:
        say("starting Triton and the gateway ...")
        started = time.perf_counter()
        with running_stack(config, ports, workdir, say, on_restart=describe) as stack:
            say(f"ready in {time.perf_counter() - started:.1f} s")
            value = ServedStack(model, stack.endpoints)
            describe(value.endpoints)
            yield value, stack
    finally:
        if status_file is not None:
            status_file.unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def served(config: ServeConfig, say: Say | None = None) -> Iterator[ServedStack]:
    """Provision the model, start Triton and the gateway; yields what was started once the gateway is
    ready; stops both on exit. Nobody restarts Triton while the body runs (``serve`` does)."""
    with _started(config, say or emit) as (value, _):
        yield value


def serve(
    config: ServeConfig, say: Say | None = None, on_ready: Callable[[ServedStack], None] | None = None
) -> ServedStack | None:
    """Provision, start, hand what was started to ``on_ready`` (default: ``say`` its banner), prove one
    request, then supervise until a stop signal (``smoke``: stop at once); stops everything. Returns what
    was started (``None`` when a stop signal came before it was ready); raises ``StackError`` subclasses."""
    say = say or emit
    value: ServedStack | None = None
    with stop_signals():
        try:
            with _started(config, say) as (value, stack):
                image = sample_image(config)
                if on_ready is None:
                    for line in banner(value, image):
                        say(line)
                else:
                    on_ready(value)
                prove(value, image, say)
                if config.smoke:
                    say("smoke test passed; stopping the gateway and Triton ...")
                else:
                    say("serving; press Ctrl-C to stop")
                    stack.supervise()
        except StopRequested as stop:  # said before the stop, unless it came before the stack was up
            said(stop, say)
    say("stopped")
    return value


# ------------------------------------------------------------------------------------------ the request
def predict_file(url: str, image: Path, timeout_s: float = 30.0, title: str | None = None) -> dict[str, Any]:
    """``POST url/v1/predict`` with ``image`` as multipart field ``image`` (what the curl line sends), and the
    listing's ``title`` as field ``title`` when given."""
    fields = {} if title is None else {"title": title}
    body, content_type = multipart_image(image.read_bytes(), image.name, **fields)
    reply = http_request(
        url + "/v1/predict",
        method="POST",
        data=body,
        headers={"Content-Type": content_type},
        timeout_s=timeout_s,
    )
    if reply.status is None:
        raise StackError(f"the sample request got no answer from {url}: {reply.error}")
    try:
        answer = json.loads(reply.body)
    except ValueError as e:
        raise StackError(
            f"the gateway answered {reply.status} with a body that is not JSON: {reply.body[:200]!r}"
        ) from e
    if reply.status != 200:
        raise StackError(f"the sample request failed with {reply.status}: {answer}")
    return answer


def prove(stack: ServedStack, image: Path, say: Say) -> None:
    """One real request through the stack, its answer said; for a model that reads titles, a second one with
    the photo's listing title (from ``labels.json`` beside it), so that both ways of asking are seen."""
    answer = predict_file(stack.endpoints.gateway, image)
    total_ms = answer.get("timing_ms", {}).get("total", float("nan"))
    say(f"prediction for {shown(image)} ({total_ms:.1f} ms in the gateway):")
    for line in describe_prediction(answer):
        say(line)
    title = sample_title(image)
    if title is None or not _reads_titles(stack):
        return
    answer = predict_file(stack.endpoints.gateway, image, title=title)
    total_ms = answer.get("timing_ms", {}).get("total", float("nan"))
    say(f"with its title {title!r} ({total_ms:.1f} ms):")
    for line in describe_prediction(answer):
        say(line)


def _reads_titles(stack: ServedStack) -> bool:
    model = stack.model
    try:
        return load_metadata(model.repository, model.name, model.version).title is not None
    except MetadataError:
        return False


def describe_prediction(answer: dict[str, Any]) -> list[str]:
    rows = []
    for attribute, p in answer.get("predictions", {}).items():
        flags = [name for name in ("uncertain", "conflict") if p.get(name)]
        flag = f"  ({', '.join(flags)})" if flags else ""
        rows.append(f"  {attribute:<16} {p['label']:<16} {p['confidence']:.2f}{flag}")
    return rows


# ------------------------------------------------------------------------------------------ the banner
def _model_line(model: ServedModel) -> str:
    where = f"{model.name} version {model.version}"
    try:
        meta = load_metadata(model.repository, model.name, model.version)
    except MetadataError:
        return f"serving {where} from {shown(model.repository)}"
    size = meta.preprocessing.image_size
    return (
        f"serving {where} ({meta.backbone}, {size} px, {len(meta.outputs)} attributes) from "
        f"{shown(model.repository)}"
    )


def banner(stack: ServedStack, image: Path) -> list[str]:
    """What the CLI prints about a started stack: the model, the URLs, the processes, a curl line."""
    e = stack.endpoints
    url = e.gateway
    return [
        "",
        _model_line(stack.model),
        f"  upload page     {url}/",
        f"  API             POST {url}/v1/predict   POST {url}/v1/predict/batch   GET {url}/v1/models",
        f"  health/metrics  {url}/healthz   {url}/readyz   {url}/metrics",
        f"  Triton          HTTP {e.triton_http}   gRPC {e.triton_grpc}   metrics {e.triton_metrics}",
        f"  processes       tritonserver pid {e.triton_pid}, gunicorn pid {e.gateway_pid}",
        f"  logs            {e.logs[0]}   {e.logs[1]}   (removed on exit)",
        "try it:",
        f"  curl -F image=@{shown(image)} {url}/v1/predict",
    ]
