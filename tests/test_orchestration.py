"""``orchestration.process.ManagedProcess``: the one launcher's typed failures and its stops."""

from __future__ import annotations

import os
import sys

import pytest

from orchestration.process import ROOT, ManagedProcess, ProcessError
from tests.test_serve import running


class Refused(ProcessError):
    """A caller's own error type (the launcher raises what it is given)."""


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_process_that_exits_before_it_is_ready_raises_the_callers_error_with_its_log(tmp_path):
    process = ManagedProcess(
        "server",
        python("import sys; print('bad model file'); sys.exit(3)"),
        log_path=tmp_path / "log",
        ready_url="http://127.0.0.1:9/never",
        error=Refused,
    ).start()
    with pytest.raises(Refused, match=r"(?s)server exited with status 3.*bad model file"):
        process.wait_ready(30)


def test_run_stops_the_whole_process_when_the_caller_is_interrupted(tmp_path):
    process = ManagedProcess("sleeper", python("import time; time.sleep(60)"), log_path=tmp_path / "log")
    process.start()
    assert process.process is not None
    popen, calls = process.process, []
    real_wait = popen.wait

    def interrupted_once(timeout=None):
        calls.append(timeout)
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C arrives while the caller waits for it to finish
        return real_wait(timeout)

    popen.wait = interrupted_once  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        process.run(timeout_s=60)
    assert popen.poll() is not None  # stopped, not left running in its own session
    with pytest.raises(ProcessLookupError):
        os.kill(popen.pid, 0)


def test_run_past_its_deadline_stops_it_and_says_so(tmp_path):
    process = ManagedProcess(
        "locust", python("import time; print('started'); time.sleep(60)"), log_path=tmp_path / "log"
    )
    with pytest.raises(ProcessError, match="locust did not finish in 1 s"):
        process.run(timeout_s=1)
    assert process.exit_code() is None and process.process is None  # stopped and forgotten


@pytest.mark.server
def test_a_killed_triton_starts_again_on_its_ports_with_a_fresh_log(colour_stack):
    import signal

    triton = colour_stack.triton()
    ports, old_log = (triton.http_port, triton.grpc_port), triton.log_path
    os.kill(triton.pid, signal.SIGKILL)
    triton._process.process.wait(10)  # type: ignore[union-attr]
    assert not triton.is_running()
    again = colour_stack.triton()  # start() reaps the killed one, ends its stubs, drops its work folder
    assert again.is_running() and again.ready() and (again.http_port, again.grpc_port) == ports
    assert again.log_path is not None and again.log_path != old_log and again.log_path.is_file()


def test_a_child_started_from_a_short_lived_thread_lives_on_and_dies_with_its_starter(tmp_path):
    """The parent-death signal fires when the forking *thread* ends: children are forked by the spawner
    thread, so a server started from a helper thread outlives that thread, and not the process that started
    it."""
    import signal
    import subprocess
    import time

    starter = f"""
import sys, threading, time
from pathlib import Path
from orchestration.process import ManagedProcess
started = []
def start():
    started.append(ManagedProcess("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"],
                                  log_path=Path({str(tmp_path / "log")!r})).start())
thread = threading.Thread(target=start)
thread.start(); thread.join()
time.sleep(1.0)  # the thread that asked for the start is gone by now
print(started[0].pid, started[0].is_running(), flush=True)
time.sleep(120)
"""
    parent = subprocess.Popen(python(starter), stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert parent.stdout is not None
        pid, alive = parent.stdout.readline().split()
        assert alive == "True"
        os.kill(parent.pid, signal.SIGKILL)  # no clean-up code runs in the starter
        deadline = time.monotonic() + 5
        while running(int(pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(int(pid)), "the child outlived the process that started it"
    finally:
        parent.kill()
        parent.wait()


FAKE_TRITON = r"""
import http.server, os, sys
marker, port = sys.argv[1], int(sys.argv[2])
if not os.path.exists(marker):  # the first start: the python backend's known abort, before ready
    open(marker, "w").close()
    print("terminate called after throwing an instance of 'boost::interprocess::lock_exception'", flush=True)
    os.abort()

class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", port), Ready).serve_forever()
"""


@pytest.mark.parametrize("message", ["boost::interprocess::lock_exception", "some other error"])
def test_triton_that_aborts_with_the_python_backends_known_startup_crash_is_started_once_more(
    tmp_path, monkeypatch, caplog, message
):
    """Upstream issue triton-inference-server/server#8882: the python backend sometimes aborts while it
    sets up a stub's shared memory. One more start, with a warning; any other exit is the caller's error."""
    from orchestration.triton import TritonServer, TritonStartError

    script = tmp_path / "fake_triton.py"
    script.write_text(FAKE_TRITON.replace("boost::interprocess::lock_exception", message))
    server = TritonServer(tmp_path, models=[])
    marker = tmp_path / "started-once"
    monkeypatch.setattr(
        TritonServer, "command", lambda self, backends: [sys.executable, str(script), str(marker),
                                                          str(self.http_port)]
    )
    if message != "boost::interprocess::lock_exception":
        with pytest.raises(TritonStartError, match=message):
            server.start()
        assert not server.is_running()
        return
    with caplog.at_level("WARNING", logger="orchestration.triton"), server:
        assert server.is_running() and server.ready()
    assert "starting it once more" in caplog.text and "8882" in caplog.text
