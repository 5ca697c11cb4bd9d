"""The gateway worker's stop resets no connection the kernel accepted (issue 27, "stopping under load loses
nothing"; ``gateway/gunicorn_conf.py``, module docstring).

Two races, each made deterministic here instead of waiting for the load test to hit it:

- a client that connected before the stop but writes its request late (a loaded machine, a slow network):
  gunicorn's stopping worker used to close such a connection unanswered;
- a handshake that completes between the last ``accept`` and the close of the listening socket: the close
  resets it. The last holder of the socket now stops new handshakes first.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from gateway.listener import HANDSHAKE_SETTLE_S, held_elsewhere, refuse_new_connections
from orchestration.process import free_ports

ROOT = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="socket filters, /proc: Linux")


# -- 1. a late request on a connection queued before the stop -----------------------------------------------
@contextmanager
def gunicorn_without_triton(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The gateway under gunicorn (1 worker) with no Triton behind it: enough to drain and stop."""
    port = free_ports(1)[0]
    (tmp_path / "prometheus").mkdir()
    env = {
        **os.environ,
        "FASHION_PORT": str(port),
        "FASHION_BIND": f"127.0.0.1:{port}",
        "FASHION_WORKERS": "1",
        "FASHION_TRITON_URL": "127.0.0.1:9",  # nothing listens there
        "FASHION_MODEL_REPOSITORY": str(tmp_path / "repository"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus"),
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "gunicorn", "-c", "python:gateway.gunicorn_conf", "gateway:create_app()"]
    with open(tmp_path / "gunicorn.log", "wb") as log:
        master = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
                    answer.read()
                break
            except OSError:
                log_tail = (tmp_path / "gunicorn.log").read_text()[-3000:]
                assert master.poll() is None and time.monotonic() < deadline, log_tail
                time.sleep(0.2)
        yield master, port
    finally:
        for pid in _children(master.pid):
            _signal(pid, signal.SIGCONT)
        master.kill()
        master.wait(30)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _exchange(sock: socket.socket, request: bytes) -> bytes:
    """Send ``request`` and read until the server closes; raises ``OSError`` on a reset."""
    sock.sendall(request)
    sock.settimeout(10)
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


@pytest.mark.server
@linux_only
def test_a_connection_queued_before_the_stop_whose_client_writes_late_still_gets_its_503(tmp_path):
    request = (
        b"POST /v1/predict HTTP/1.1\r\nHost: gateway\r\nContent-Type: image/jpeg\r\n"
        b"Content-Length: 4\r\n\r\nabcd"
    )
    with gunicorn_without_triton(tmp_path) as (master, port):
        workers = _children(master.pid)
        assert len(workers) == 1, workers
        # The worker is stopped, so these connections wait in the kernel's backlog, their requests unsent.
        os.kill(workers[0], signal.SIGSTOP)
        clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
        try:
            master.send_signal(signal.SIGTERM)
            time.sleep(0.2)  # the master has passed SIGTERM on to the (stopped) worker
            os.kill(workers[0], signal.SIGCONT)
            # It drains at once (nothing in flight), accepts the four and stops; their requests come later
            # than a thread waits for first bytes (FIRST_BYTES_WAIT_S).
            time.sleep(0.3)
            answers = []
            for client in clients:  # one after the other, each closed once answered (as HTTP clients do)
                try:
                    answers.append(_exchange(client, request))
                except OSError as e:
                    answers.append(f"{type(e).__name__}: {e}".encode())
                client.close()
        finally:
            for client in clients:
                client.close()
        assert master.wait(30) == 0
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), answer[:200]  # not b"" (closed) nor a reset
        assert b"connection: close" in head.lower()
        assert json.loads(body)["error"]["code"] == "shutting_down"


# -- 2. a handshake completing at the close of the listening socket ----------------------------------------
def _listener() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    return listener


def _accept_all(listener: socket.socket) -> list[socket.socket]:
    accepted = []
    while True:
        try:
            accepted.append(listener.accept()[0])
        except BlockingIOError:
            return accepted


@linux_only
def test_a_handshake_completing_after_the_last_accept_is_reset_when_the_listener_closes():
    """The hazard itself, on plain sockets: what the stop sequence must never let happen."""
    with closing(_listener()) as listener:
        _accept_all(listener)  # the backlog is empty: a naive stop would close now
        with socket.create_connection(listener.getsockname(), timeout=5) as late:  # completes meanwhile
            listener.close()
            with pytest.raises(ConnectionResetError):
                _exchange(late, b"GET / HTTP/1.1\r\n\r\n")


@linux_only
def test_once_new_connections_are_refused_a_queued_one_is_served_and_a_late_one_refused_never_reset():
    with closing(_listener()) as listener:
        port = listener.getsockname()[1]
        queued = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert refuse_new_connections(listener)
        late = socket.socket()
        late.setblocking(False)
        assert late.connect_ex(("127.0.0.1", port)) == errno.EINPROGRESS
        time.sleep(HANDSHAKE_SETTLE_S)
        with closing(queued), closing(late):
            accepted = _accept_all(listener)
            assert len(accepted) == 1  # the queued one only: the late SYN was dropped, not queued
            with closing(accepted[0]) as server_side:
                queued.sendall(b"ping")
                assert server_side.recv(4) == b"ping"
            listener.close()
            # The late client retransmits its SYN (after about 1 s) and is refused: nothing was accepted
            # for it, so nothing of its request is lost.
            _, writable, _ = select.select([], [late], [], 5.0)
            assert writable, "the late connection neither completed nor failed"
            assert late.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED


@linux_only
def test_the_last_holder_of_a_listening_socket_is_told_apart_from_one_another_process_shares(tmp_path):
    with closing(_listener()) as listener:
        assert held_elsewhere(listener) is False
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys, time; sys.stdin.read()"],
            stdin=subprocess.PIPE,
            pass_fds=(listener.fileno(),),
        )
        try:
            assert held_elsewhere(listener) is True  # closing ours now would reset nothing
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(10)
        assert held_elsewhere(listener) is False
