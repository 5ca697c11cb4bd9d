"""``fashion serve`` survives Triton being killed under load: it restarts Triton, the gateway keeps answering
(200, or 503/504/429 while Triton is away, never slower than its deadline), and predictions work again
within 2 s of Triton being ready — with nobody restarting anything."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from orchestration.serve import ServedStack
from tests.test_serve import FREE_PORTS

CLIENTS = 4
GATEWAY_DEADLINE_S = 5.0  # FASHION_TIMEOUT_S given to the gateway below
ALLOWED = {200, 429, 503, 504}


def _triton_pid(serve_pid: int) -> int | None:
    import psutil

    for child in psutil.Process(serve_pid).children(recursive=True):
        try:
            if child.name() == "tritonserver":
                return child.pid
        except psutil.NoSuchProcess:  # a short-lived child (Triton's own helpers) gone since the listing
            continue
    return None


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/v2/health/ready", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.mark.server
@pytest.mark.slow
def test_serve_restarts_a_killed_triton_and_the_gateway_rides_it_out_under_load(exported, tmp_path):
    import io

    from PIL import Image

    from tests.test_export import images

    pytest.importorskip("psutil")
    repository = tmp_path / "repository"
    shutil.copytree(exported[0], repository)
    buffer = io.BytesIO()
    Image.fromarray(images(1, seed=3)[0]).save(buffer, "JPEG", quality=90)
    photo = buffer.getvalue()
    env = {**os.environ, "FASHION_TIMEOUT_S": str(GATEWAY_DEADLINE_S), "PYTHONUNBUFFERED": "1"}
    status_file = tmp_path / "serve-status.json"
    serve = subprocess.Popen(
        [sys.executable, "-m", "fashion.cli", "serve", "--repository", str(repository), *FREE_PORTS,
         "--status-file", str(status_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
        start_new_session=True,
    )
    output: list[str] = []
    stop = threading.Event()  # set in `finally` too: a failed assertion must not leave clients running
    reader = threading.Thread(target=lambda: output.extend(iter(serve.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any("serving; press Ctrl-C" in line for line in output):
            assert serve.poll() is None and time.monotonic() < deadline, "".join(output)
            time.sleep(0.2)
        started = ServedStack.read(status_file).endpoints  # what `fashion serve` started
        gateway_port, triton_url = int(started.gateway.rsplit(":", 1)[1]), started.triton_http

        answers: list[tuple[float, int, float]] = []  # (sent at, status, seconds)

        def client() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", gateway_port, timeout=GATEWAY_DEADLINE_S + 5)
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    conn.request("POST", "/v1/predict", photo, {"Content-Type": "image/jpeg"})
                    response = conn.getresponse()
                    response.read()
                    status = response.status
                except (OSError, http.client.HTTPException):
                    status = -1  # no answer at all: a lost request
                    conn.close()
                    conn = http.client.HTTPConnection(
                        "127.0.0.1", gateway_port, timeout=GATEWAY_DEADLINE_S + 5
                    )
                answers.append((sent, status, time.monotonic() - sent))
            conn.close()

        threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        old_pid = _triton_pid(serve.pid)
        assert old_pid is not None and old_pid == started.triton_pid
        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        ready_at = None
        while time.monotonic() - killed_at < 120 and ready_at is None:
            time.sleep(0.05)
            new_pid = _triton_pid(serve.pid)
            if new_pid not in (None, old_pid) and _ready(triton_url):
                ready_at = time.monotonic()
        assert ready_at is not None, "Triton was not restarted:\n" + "".join(output)
        time.sleep(3.0)
        stop.set()
        for t in threads:
            t.join()

        statuses = {status for _, status, _ in answers}
        assert statuses <= ALLOWED, sorted(statuses)
        assert max(seconds for _, _, seconds in answers) <= GATEWAY_DEADLINE_S + 1.0
        recovered = [
            sent + seconds for sent, status, seconds in answers if status == 200 and sent >= ready_at
        ]
        assert recovered and min(recovered) - ready_at <= 2.0, min(recovered or [0]) - ready_at
        assert sum(1 for sent, status, _ in answers if sent > killed_at and status == 200) > 0
        assert serve.poll() is None, "fashion serve stopped:\n" + "".join(output)
        assert any("Restarting it" in line for line in output) and any("is back" in line for line in output)
        assert ServedStack.read(status_file).endpoints.triton_pid == _triton_pid(serve.pid) != old_pid
    finally:
        stop.set()
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0, "".join(output)


def test_serve_gives_up_with_the_reason_when_triton_keeps_exiting(tmp_path):
    """The crash-loop bound: the restart policy's limit, then ``ProcessExited`` naming the count and log."""
    from orchestration.gateway import GatewayProcess
    from orchestration.serve import ProcessExited, RestartPolicy, RunningStack
    from orchestration.triton import TritonStartError

    class CrashingTriton:  # a Triton whose every start fails (a broken model): the policy's input only
        http_url, grpc_url, metrics_url, pid, log_path = (
            "h:1",
            "h:2",
            "http://h:3/metrics",
            1,
            tmp_path / "t.log",
        )
        starts = 0

        def is_running(self) -> bool:
            return False

        def exit_status(self) -> int:
            return -9

        def stop(self, timeout_s: float | None = None) -> None:
            pass

        def start(self) -> None:
            self.starts += 1
            raise TritonStartError("tritonserver exited with status 1: model failed to load")

        def log_tail(self, chars: int = 3000) -> str:
            return "E model failed to load"

    gateway = GatewayProcess({}, tmp_path / "g.log", port=1)
    gateway.exit_code = lambda: None  # type: ignore[method-assign]
    triton, said = CrashingTriton(), []
    stack = RunningStack(
        triton, gateway, said.append, RestartPolicy(backoff_s=(0.0,), window_s=60, max_restarts=3)
    )
    for _ in range(3):
        stack.check()
    expected = r"(?s)exited 4 times within 60 s .*giving up.*model failed to load"
    with pytest.raises(ProcessExited, match=expected):
        stack.check()
    assert triton.starts == 3 and sum("did not come back" in line for line in said) == 3
