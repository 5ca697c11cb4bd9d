"""``fashion serve``'s lifetime against the real stack: nothing outlives it (SIGKILL included), a stop under
load loses nothing, a crash leaves a trace, and a port held by an orphan is named with its pid.

The model is ``SLEEPY_MODEL`` of ``test_faults`` published as ``fashion`` (the colour model's inputs, outputs
and metadata; it sleeps ``DELAY_S`` per image), so requests stay in flight long enough to be caught by a
signal, and no training or export is needed. What was started is read from ``--status-file`` (the
``ServedStack`` value), never from the banner.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestration.ports import port_free
from orchestration.process import free_ports
from orchestration.serve import ServeConfig, ServedStack, serve
from tests.fixtures_gateway import solid
from tests.test_serve import descendants, running

pytestmark = pytest.mark.server

DELAY_S = 0.4  # the model's sleep per image
STOP_WITHIN_S = 20.0  # docs/operations.md: a SIGTERM'd `fashion serve` has exited by then
GONE_WITHIN_S = 10.0  # docs/operations.md: after a SIGKILL of `fashion serve`, its children are gone by then
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    from orchestration.triton import TritonNotInstalled, pytriton_dist
    from tests.test_faults import publish_sleepy

    try:
        pytriton_dist()
    except TritonNotInstalled as e:
        pytest.skip(str(e))
    work = tmp_path_factory.mktemp("lifetime")
    publish_sleepy(work / "repository", work, "fashion", instances=2, queue=64, delay_s=DELAY_S)
    return work / "repository"


# -- the stack as a user runs it ---------------------------------------------------------------------------
class Serve:
    """``fashion serve`` on explicit ports in a subprocess; what it started comes from its status file."""

    def __init__(self, repository: Path, ports: list[int], work: Path) -> None:
        self.status_file = work / f"status-{time.monotonic_ns()}.json"
        self.ports = ports
        flags = ["--port", "--triton-http-port", "--triton-grpc-port", "--triton-metrics-port"]
        args = [a for flag, port in zip(flags, ports, strict=True) for a in (flag, str(port))]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fashion.cli", "serve", "--repository", str(repository), *args,
             "--status-file", str(self.status_file)],
            cwd=work,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_serving(self, timeout_s: float = 120.0) -> ServedStack:
        deadline = time.monotonic() + timeout_s
        while not any("press Ctrl-C" in line for line in self.lines):
            assert self.process.poll() is None and time.monotonic() < deadline, self.output[-4000:]
            time.sleep(0.2)
        return ServedStack.read(self.status_file)

    def wait_exit(self, timeout_s: float) -> int:
        code = self.process.wait(timeout_s)
        self._reader.join(5)
        return code

    def kill_everything(self, pids: set[int]) -> None:
        """Clean-up after a failed assertion: nothing is left running."""
        for pid in [*pids, self.process.pid]:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(30)


@dataclass(frozen=True)
class Outcome:
    """One request: its HTTP status (0: none), its error code, and where a failure happened."""

    start: float
    sent: float  # the request was written (inf: never)
    end: float
    status: int = 0
    code: str = ""
    failed: str = ""  # "connect" (refused: nothing listens) or "exchange" (after the request was written)
    received: bool = False  # some of the answer arrived before a failure

    @property
    def lost(self) -> bool:
        return self.failed == "exchange"


def predict_once(port: int, image: bytes) -> Outcome:
    """One prediction on a fresh connection; never raises."""
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.connect()
    except OSError:
        return Outcome(start, float("inf"), time.monotonic(), failed="connect")
    sent, received = float("inf"), False
    try:
        conn.request("POST", "/v1/predict", image, {"Content-Type": "image/jpeg"})
        sent = time.monotonic()
        response = conn.getresponse()
        received = True
        body = response.read()
        code = json.loads(body)["error"]["code"] if response.status != 200 else ""
        return Outcome(start, sent, time.monotonic(), response.status, code)
    except (OSError, http.client.HTTPException, ValueError, KeyError):
        return Outcome(start, sent, time.monotonic(), failed="exchange", received=received)
    finally:
        conn.close()


class Load:
    """``clients`` threads sending predictions back to back; after a 503 a client waits its Retry-After
    (as a polite client does), after a refused connection it stops (nothing listens any more)."""

    def __init__(self, port: int, clients: int) -> None:
        self.port, self.image = port, solid((30, 40, 220))
        self.outcomes: list[Outcome] = []
        self.sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self.sent += 1
            outcome = predict_once(self.port, self.image)
            with self._lock:
                self.outcomes.append(outcome)
            if outcome.failed == "connect":
                return
            if outcome.status == 503:
                self._stop.wait(1.0)

    def answered(self, status: int = 200) -> int:
        with self._lock:
            return sum(o.status == status for o in self.outcomes)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


# -- 1. nothing outlives `fashion serve` ------------------------------------------------------------------
def test_killing_fashion_serve_stops_every_child_frees_its_ports_and_it_starts_again_on_them(
    repository, tmp_path
):
    ports = free_ports(4)
    serve_ = Serve(repository, ports, tmp_path)
    children: set[int] = set()
    try:
        stack = serve_.wait_serving()
        assert stack.endpoints.gateway == f"http://127.0.0.1:{ports[0]}"
        with Load(ports[0], clients=4) as load:
            assert wait_until(lambda: load.answered() >= 4, 60), load.outcomes[-3:]
            children = descendants(serve_.process.pid)
            started = {stack.endpoints.triton_pid, stack.endpoints.gateway_pid}
            assert started <= children and len(children) >= 4, (started, children)  # + workers, stub
            os.kill(serve_.process.pid, signal.SIGKILL)  # the process only, not its group
            killed_at = time.monotonic()
            gone = wait_until(lambda: not any(running(pid) for pid in children), GONE_WITHIN_S)
            gone_s = time.monotonic() - killed_at
        left = {pid: open(f"/proc/{pid}/cmdline").read()[:80] for pid in children if running(pid)}
        assert gone, f"still running {GONE_WITHIN_S} s after the SIGKILL: {left}"
        hosts = ["127.0.0.1"] * 4
        assert all(port_free(host, port) for host, port in zip(hosts, ports, strict=True)), ports
        print(f"\nSIGKILL of fashion serve: its {len(children)} children were gone after {gone_s:.1f} s")
    finally:
        serve_.kill_everything(children)
    again = Serve(repository, ports, tmp_path)  # the same ports: nothing holds them
    try:
        assert again.wait_serving().endpoints.gateway == f"http://127.0.0.1:{ports[0]}"
        again.process.send_signal(signal.SIGTERM)
        assert again.wait_exit(STOP_WITHIN_S) == 0, again.output[-3000:]
    finally:
        again.kill_everything(descendants(again.process.pid))


# -- 2. a stop under load loses nothing -------------------------------------------------------------------
def test_a_sigterm_under_load_answers_what_was_accepted_refuses_the_rest_with_503_and_exits_0(
    repository, tmp_path
):
    ports = free_ports(4)
    serve_ = Serve(repository, ports, tmp_path)
    children: set[int] = set()
    try:
        serve_.wait_serving()
        children = descendants(serve_.process.pid)
        with Load(ports[0], clients=6) as load:
            assert wait_until(lambda: load.answered() >= 6, 60), load.outcomes[-3:]
            stopped_at = time.monotonic()
            serve_.process.send_signal(signal.SIGTERM)
            code = serve_.wait_exit(STOP_WITHIN_S)
            stop_s = time.monotonic() - stopped_at
            wait_until(lambda: load.sent == len(load.outcomes), 10)  # every client finished its request
        outcomes = list(load.outcomes)
    finally:
        serve_.kill_everything(children)
    assert code == 0, serve_.output[-3000:]
    assert "SIGTERM received" in serve_.output and serve_.lines[-1] == "stopped"
    assert load.sent == len(outcomes), "a request without an outcome"
    lost = [o for o in outcomes if o.lost]
    assert not lost, lost[:5]  # no reset, no cut answer: every request written got a whole HTTP answer
    assert {o.status for o in outcomes if not o.failed} <= {200, 503}, outcomes
    assert {o.code for o in outcomes if o.status == 503} <= {"shutting_down"}
    # Accepted before the signal (sent well before it: the model sleeps DELAY_S) -> answered 200.
    accepted = [o for o in outcomes if o.sent < stopped_at - 0.2]
    in_flight = [o for o in accepted if o.end > stopped_at]
    assert all(o.status == 200 for o in accepted), [(o.status, o.code) for o in accepted if o.status != 200]
    assert in_flight, "no request was in flight when the signal came: the test proves nothing"
    refused = [o for o in outcomes if o.failed == "connect"]
    assert all(o.start > stopped_at for o in refused)  # refused only once the gateway had closed
    assert stop_s < STOP_WITHIN_S
    assert not any(running(pid) for pid in children)
    counts = {s: sum(o.status == s for o in outcomes) for s in (200, 503)}
    print(
        f"\nSIGTERM under 6 clients: {len(in_flight)} in flight answered 200; {counts[200]} x 200, "
        f"{counts[503]} x 503 shutting_down, {len(refused)} refused connections after the close, 0 lost; "
        f"exit 0 after {stop_s:.1f} s"
    )


# -- 3. a crash leaves a trace ------------------------------------------------------------------------------
def test_a_crash_is_logged_with_its_traceback_while_the_children_still_run_then_they_stop(
    repository, caplog
):
    ports = free_ports(4)
    config = ServeConfig(
        repository=repository,
        port=ports[0],
        triton_http_port=ports[1],
        triton_grpc_port=ports[2],
        triton_metrics_port=ports[3],
    )
    started: list[ServedStack] = []
    alive_when_logged: list[bool] = []

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info and started:
                pids = (started[0].endpoints.triton_pid, started[0].endpoints.gateway_pid)
                alive_when_logged.append(all(running(pid) for pid in pids))

    def crash(stack: ServedStack) -> None:
        started.append(stack)
        raise RuntimeError("a bug in fashion serve")

    watch = Watch()
    logging.getLogger("orchestration").addHandler(watch)
    try:
        with caplog.at_level(logging.ERROR, logger="orchestration"), pytest.raises(RuntimeError):
            serve(config, say=lambda line: None, on_ready=crash)
    finally:
        logging.getLogger("orchestration").removeHandler(watch)
    records = [r for r in caplog.records if r.exc_info]
    assert records and "fashion serve failed; stopping the gateway and Triton" in records[0].getMessage()
    assert records[0].exc_info[0] is RuntimeError  # with its traceback
    assert alive_when_logged == [True]  # said before anything was stopped
    pids = (started[0].endpoints.triton_pid, started[0].endpoints.gateway_pid)
    assert not any(running(pid) for pid in pids)


# -- 4. a port held by an orphan is named -------------------------------------------------------------------
def test_a_busy_port_error_names_the_pid_and_command_line_that_hold_it(tmp_path, capsys):
    from fashion import cli

    holder = subprocess.Popen(
        [sys.executable, "-c", "# an-orphaned-server\nimport socket, time; s = socket.socket(); "
         "s.bind(('127.0.0.1', 0)); s.listen(); print(s.getsockname()[1], flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        port = int(holder.stdout.readline())
        status = cli.main(["serve", "--port", str(port), "--repository", str(tmp_path / "repo")])
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert status == 2
    assert f"port {port} on 127.0.0.1 is already in use by pid {holder.pid} (" in err
    assert "an-orphaned-server" in err and f"kill {holder.pid}" in err
