"""``fashion serve``: the local stack as a user runs it — a real demo build, real Triton, real gunicorn.

The server tests share one tiny demo build (test_efficientnet, 64 px, 1 epoch, 60 products): the ``--smoke``
run builds it, the long-running ``serve`` reuses it. What the command started (URLs, PIDs) is read from its
``--status-file`` (the ``ServedStack`` value), not from its banner. Every process the command starts is found
by walking ``/proc`` from its pid while it runs, and must be gone once it has exited.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fashion import cli
from orchestration.serve import DemoSettings, ServeConfig, ServedStack, StackError, servable_version

ROOT = Path(__file__).resolve().parents[1]
FREE_PORTS = [
    "--port",
    "0",
    "--triton-http-port",
    "0",
    "--triton-grpc-port",
    "0",
    "--triton-metrics-port",
    "0",
]
TINY_DEMO = [
    "--demo", "--backbone", "test_efficientnet", "--image-size", "64", "--epochs", "1", "--demo-count", "60"
]


# ------------------------------------------------------------------------------------------ helpers
def descendants(root: int) -> set[int]:
    """Pids of every live process below ``root`` (from ``/proc/<pid>/stat``'s parent pid)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {root}
    while frontier:
        children = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= children
        frontier = children
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Command:
    """``fashion serve ...`` in a subprocess: its output collected line by line, its process tree watched."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.status_file = cwd / f"serve-status-{time.monotonic_ns()}.json"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fashion.cli", "serve", *args, "--status-file", str(self.status_file)],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.children: set[int] = set()
        self.stack: ServedStack | None = None  # what it started, from its status file
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if self.stack is None and "upload page" in line:
                # The file is written before the banner is printed and removed after the stack stopped.
                self.stack = ServedStack.read(self.status_file)
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.lines):
            self.children |= descendants(self.process.pid)
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the output of `fashion serve`:\n{self.output[-5000:]}")
            time.sleep(0.2)

    def wait_exit(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None:
            self.children |= descendants(self.process.pid)
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"`fashion serve` still runs after {timeout_s} s:\n{self.output[-5000:]}"
                )
            time.sleep(0.2)
        self._reader.join(5)
        return self.process.returncode

    def kill(self) -> None:
        """Test clean-up when an assertion failed midway: nothing is left running."""
        for pid in [*self.children, self.process.pid]:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()

    def started_pids(self) -> set[int]:
        assert self.stack is not None, self.output[-3000:]
        return {self.stack.endpoints.triton_pid, self.stack.endpoints.gateway_pid}

    def gateway_url(self) -> str:
        assert self.stack is not None, self.output[-3000:]
        return self.stack.endpoints.gateway


def post_image(url: str, image: Path) -> tuple[int, dict]:
    boundary = "fashion-serve-test"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{image.name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url + "/v1/predict",
        data=body,
        method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def fake_servable_version(repository: Path, version: int = 1) -> None:
    model = repository / "fashion"
    (model / "configs").mkdir(parents=True)
    (model / "configs" / "cpu.pbtxt").write_text('backend: "python"\n')
    (model / str(version)).mkdir()
    for name in ("model.onnx", "model.py"):
        (model / str(version) / name).write_bytes(b"")
    (model / str(version) / "metadata.json").write_text('{"model": {"backbone": "test"}}')


# ------------------------------------------------------------------------------------------ fast checks
def test_serve_refuses_a_busy_port_before_building_anything(tmp_path, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        status = cli.main(
            [
                "serve",
                "--port",
                str(port),
                "--repository",
                str(tmp_path / "repo"),
                "--demo-dir",
                str(tmp_path / "d"),
            ]
        )
    err = capsys.readouterr().err
    assert status == 2
    assert f"port {port} on 127.0.0.1 is already in use" in err and "--port 0" in err
    assert not (tmp_path / "d").exists() and not (tmp_path / "repo").exists()


def test_servable_version_needs_the_cpu_config_and_a_complete_latest_version(tmp_path):
    assert servable_version(tmp_path / "missing") is None
    fake_servable_version(tmp_path)
    assert servable_version(tmp_path) == 1
    (tmp_path / "fashion" / "2").mkdir()  # a newer, incomplete version is what Triton would pick
    assert servable_version(tmp_path) is None


def test_serve_config_rejects_clashing_ports_and_tiny_demos():
    with pytest.raises(StackError, match="different ports"):
        ServeConfig(port=8000)
    with pytest.raises(StackError, match="TCP port"):
        ServeConfig(port=70000)
    with pytest.raises(StackError, match="at least 20"):
        DemoSettings(count=5)


def test_an_existing_repository_is_served_without_importing_torch(tmp_path):
    fake_servable_version(tmp_path / "repo")
    code = (
        "import sys; from pathlib import Path; from orchestration.serve import ServeConfig, provision; "
        f"m = provision(ServeConfig(repository=Path({str(tmp_path / 'repo')!r})), print); "
        "print(m.version, m.origin, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.splitlines()[-1] == "1 existing False"


def write_export_record(
    repository: Path, sha256: str, *, path: str | None, keep_from: str | None = None
) -> None:
    """Version 1 of ``fake_servable_version`` with a real export record naming a checkpoint."""
    import dataclasses

    from tests.test_metadata_record import record

    rec = record()
    rec = dataclasses.replace(
        rec,
        training=dataclasses.replace(rec.training, checkpoint_sha256=sha256, checkpoint_path=path),
        variants=tuple(
            dataclasses.replace(v, quantisation=dataclasses.replace(v.quantisation, keep_from=keep_from))
            for v in rec.variants if v.quantisation is not None
        ),
    )
    (repository / "fashion" / "1" / "metadata.json").write_text(json.dumps(rec.to_dict()))


@pytest.mark.parametrize(
    "how",
    ["names the default model", "older record, INT8 settings from the default model's folder"],
)
def test_serve_exports_the_shipped_model_again_when_the_repository_holds_an_earlier_one(
    tmp_path, monkeypatch, how
):
    from orchestration import provision as provision_module
    from orchestration.config import DEFAULT_CHECKPOINT, DEFAULT_MODEL_DIR
    from orchestration.serve import ServeConfig, provision

    fake_servable_version(tmp_path / "repo")
    if how == "names the default model":
        write_export_record(tmp_path / "repo", "0" * 64, path=str(DEFAULT_CHECKPOINT))
    else:
        settings = str(DEFAULT_MODEL_DIR / "export.yaml")
        write_export_record(tmp_path / "repo", "0" * 64, path=None, keep_from=settings)
    exported: list[Path] = []

    def export(config, checkpoint):
        exported.append(checkpoint)
        return 2

    monkeypatch.setattr(provision_module, "export_for_cpu", export)
    said: list[str] = []
    served = provision(ServeConfig(repository=tmp_path / "repo"), said.append)
    assert exported == [DEFAULT_CHECKPOINT] and (served.version, served.origin) == (2, "exported")
    assert any("fashion/1 was exported from an earlier" in line and "model.pt" in line for line in said), said


def test_serve_keeps_serving_an_existing_model_of_the_users_own_or_the_current_default(tmp_path, monkeypatch):
    from fashion.metadata import file_sha256
    from orchestration import provision as provision_module
    from orchestration.config import DEFAULT_CHECKPOINT
    from orchestration.serve import ServeConfig, provision

    monkeypatch.setattr(provision_module, "export_for_cpu", lambda *a: pytest.fail("nothing to export"))
    current = file_sha256(DEFAULT_CHECKPOINT)
    for sha, path in (("0" * 64, str(tmp_path / "mine.pt")), (current, str(DEFAULT_CHECKPOINT))):
        repository = tmp_path / sha[:8] / "repo"
        fake_servable_version(repository)
        write_export_record(repository, sha, path=path)
        served = provision(ServeConfig(repository=repository), print)
        assert (served.version, served.origin) == (1, "existing")


# ------------------------------------------------------------------------------------------ real stack
@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Iterator[tuple[Command, Path]]:
    """``fashion serve --smoke`` on a fresh folder: builds the tiny demo model, serves, asks, stops."""
    from orchestration.triton import TritonNotInstalled, pytriton_dist

    try:
        pytriton_dist()
    except TritonNotInstalled as e:
        pytest.skip(str(e))
    work = tmp_path_factory.mktemp("serve")
    command = Command(["--smoke", *FREE_PORTS, *TINY_DEMO], cwd=work)
    try:
        command.wait_exit(timeout_s=240)
    finally:
        if command.process.poll() is None:
            command.kill()
    yield command, work
    for pid in command.children:  # only after a failed test: leave nothing behind
        if running(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.server
def test_serve_smoke_builds_the_demo_answers_one_request_and_leaves_no_process(smoke):
    command, work = smoke
    assert command.process.returncode == 0, command.output[-5000:]
    for step in ("[1/3] synthetic catalogue", "[2/3] train test_efficientnet", "[3/3] export fp32"):
        assert any(line.startswith(step) and "done in" in line for line in command.lines), step
    assert any(line.startswith("ready in") for line in command.lines)
    assert servable_version(work / "model_repository") == 1
    assert "curl -F image=@demo/synth/images/1.jpg http://127.0.0.1:" in command.output
    predicted = command.output.split("prediction for demo/synth/images/1.jpg", 1)[1].splitlines()[1:10]
    assert {line.split()[0] for line in predicted} >= {"articleType", "baseColour", "pattern"}
    assert all(0 <= float(line.split()[-1]) <= 1 for line in predicted if "uncertain" not in line)
    assert "smoke test passed" in command.output and command.lines[-1] == "stopped"
    assert command.started_pids() <= command.children
    assert len(command.children) >= 4  # tritonserver, its python stub, gunicorn master and workers
    left = [pid for pid in command.children if running(pid)]
    assert not left, f"processes left running: {left}"


@pytest.mark.server
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_answers_until_a_stop_signal_then_stops_everything_and_exits_0(smoke, stop_signal):
    _, work = smoke
    command = Command(FREE_PORTS, cwd=work)
    try:
        command.wait_for("press Ctrl-C to stop", timeout_s=120)
        assert "model: model_repository/fashion/1 (existing" in command.output  # no second build
        status, answer = post_image(command.gateway_url(), work / "demo" / "synth" / "images" / "2.jpg")
        assert status == 200, answer
        assert answer["model"] == {"name": "fashion", "version": 1}
        assert "articleType" in answer["predictions"]
        children = descendants(command.process.pid)
        assert command.started_pids() <= children
        started = time.monotonic()
        command.process.send_signal(stop_signal)
        assert command.wait_exit(timeout_s=20) == 0, command.output[-3000:]
        stop_s = time.monotonic() - started
    finally:
        if command.process.poll() is None:
            command.kill()
    assert f"{stop_signal.name} received" in command.output and command.lines[-1] == "stopped"
    assert stop_s < 20
    left = [pid for pid in children | command.children if running(pid)]
    assert not left, f"processes left running: {left}"
