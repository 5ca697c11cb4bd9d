"""Faults against the real stack: Triton killed under load, Triton slow, overload, a gateway worker killed.

Each test starts the pip-installed Triton and the gateway under gunicorn on loopback, injects one fault and
accounts for every request it sent: counts by status, and nothing lost (every request got an HTTP answer;
a connection error or a client-side timeout counts as lost). Bounds on time are generous on purpose (a
busy 2-core CI machine); what must not happen is a hang, a 500 or a dropped request.

Models: ``fashion`` is the colour ONNX of ``test_gateway_stack`` run by the export's own python-backend
model. ``slow`` and ``busy`` are test-only python-backend models (``SLEEPY_MODEL`` below) with the same
inputs, outputs and metadata, which sleep on purpose: ``slow`` sleeps on red images only (four instances,
so other images keep being served), ``busy`` sleeps on every image with one instance and a Triton queue of
one, so that overload reaches Triton's own queue bound too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fashion.contract import Preprocessing
from gateway.config import PROTOCOLS
from orchestration.gateway import GatewayProcess
from tests.fixtures_gateway import solid
from tests.test_gateway_stack import BLUE, RED, SCHEMA, SIZE, colour_model, publish

pytestmark = pytest.mark.server

JPEG = {"Content-Type": "image/jpeg"}
SLOW_RED_S = 4.0  # how long ``slow`` sleeps on a red image
BUSY_S = 0.1  # how long ``busy`` sleeps on every image
ERROR_CODES = {
    429: {"overloaded"},
    503: {"triton_unreachable", "model_unavailable", "model_not_ready", "triton_overloaded"},
    504: {"upstream_timeout"},
}

SLEEPY_MODEL = '''
"""Test-only python-backend model: the colour model's answers, after a sleep set in the config."""
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.delay_s = float(params.get("delay_s") or 0)
        self.red_delay_s = float(params.get("red_delay_s") or 0)
        self.outputs = [(o["name"], int(o["dims"][-1])) for o in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            image = pb_utils.get_input_tensor_by_name(request, "image").as_numpy()
            mean = image.reshape(len(image), -1, 3).astype(np.float64).mean(axis=1)
            red = bool((mean[:, 0] > mean[:, 1:].max(axis=1)).any())
            time.sleep(self.red_delay_s if red else self.delay_s)
            tensors = []
            for name, n in self.outputs:
                logits = np.zeros((len(image), n))
                k = min(n, 3)
                logits[:, :k] = mean[:, :k] / 10.0
                e = np.exp(logits - logits.max(axis=1, keepdims=True))
                tensors.append(pb_utils.Tensor(name, (e / e.sum(axis=1, keepdims=True)).astype(np.float32)))
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
'''


def publish_sleepy(
    repository: Path, work: Path, name: str, *, instances: int, queue: int, **delays: float
) -> None:
    """A ``SLEEPY_MODEL`` version of ``name`` with the colour model's metadata; batch size 1 (no batch
    mixes a sleeping image with a fast one), ``instances`` CPU instances, a Triton queue of ``queue``."""
    from export.repository import ServingConfig, model_config, write_model_version
    from fashion.metadata import build_metadata

    onnx_path = work / f"{name}.onnx"
    colour_model(onnx_path)  # required by the writer; never loaded by SLEEPY_MODEL
    metadata = build_metadata(
        schema=SCHEMA,
        preprocessing=Preprocessing(image_size=SIZE),
        backbone="test",
        temperatures={},
        thresholds={},
        training={},
        export={},
    )
    serving = ServingConfig(
        max_batch_size=1,
        max_queue_delay_us=0,
        queue_timeout_us=30_000_000,
        max_queue_size=queue,
        cpu_instances=instances,
    )
    folder = write_model_version(
        repository,
        name,
        schema=SCHEMA,
        image_size=SIZE,
        model_files={"fp32": onnx_path},
        metadata=metadata,
        warmup_image=np.zeros((SIZE, SIZE, 3), np.uint8),
        serving=serving,
    )
    (folder / "model.py").write_text(SLEEPY_MODEL)
    config = model_config(name, SCHEMA, SIZE, serving, backend="python", warmup=False)
    config += "".join(
        f'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
        for key, value in delays.items()
    )
    (repository / name / "configs" / "cpu.pbtxt").write_text(config)


@pytest.fixture(scope="module")
def stack(stack_factory, tmp_path_factory) -> Iterator[dict]:
    """One Triton for the module (three models, its own: the tests kill it); each test starts its own
    gateway."""
    work = tmp_path_factory.mktemp("faults")
    repository = work / "model_repository"
    publish(repository, work)
    # One instance per concurrent prediction of the slow test: with every instance busy, Triton's dynamic
    # batcher may hold a new request for its 500 ms scheduler wait (seen here as 0.5 s blue predictions).
    publish_sleepy(repository, work, "slow", instances=4, queue=16, red_delay_s=SLOW_RED_S)
    publish_sleepy(repository, work, "busy", instances=1, queue=1, delay_s=BUSY_S)
    served = stack_factory(
        repository, work, ("fashion", "slow", "busy"), exit_timeout_s=2, log_file=work / "triton.log"
    )
    try:
        yield {"triton": served.triton(), "repository": repository, "work": work, "stack": served}
    finally:
        served.stop()


@contextlib.contextmanager
def gateway(
    stack: dict, name: str, model: str = "fashion", protocol: str = "grpc", **settings: object
) -> Iterator[GatewayProcess]:
    """gunicorn serving ``model`` over ``protocol`` with ``FASHION_<SETTING>`` overrides; ready (``/readyz``
    200) on entry."""
    with stack["stack"].gateway(f"{name}-{protocol}", protocol, model_name=model, **settings) as server:
        yield server


# -- requests and their outcomes ------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """What one request got. ``status`` 0 = no HTTP answer (connection error or client timeout): lost."""

    path: str
    status: int
    headers: dict
    body: bytes
    start: float  # time.monotonic()
    end: float
    error: str = ""

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def json(self) -> dict:
        return json.loads(self.body)

    def error_code(self) -> str:
        return self.json()["error"]["code"]


def send(
    url: str, path: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 30
) -> Outcome:
    """One request on a fresh connection (urllib); never raises."""
    method = "POST" if data is not None else "GET"
    request = urllib.request.Request(url + path, data=data, method=method, headers=headers or {})
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Outcome(
                path, response.status, dict(response.headers), response.read(), start, time.monotonic()
            )
    except urllib.error.HTTPError as e:
        return Outcome(path, e.code, dict(e.headers), e.read(), start, time.monotonic())
    except OSError as e:  # refused, reset, timed out: the request got no answer
        return Outcome(path, 0, {}, b"", start, time.monotonic(), error=repr(e))


def predict(url: str, colour: tuple[int, int, int] = BLUE, timeout: float = 30) -> Outcome:
    return send(url, "/v1/predict", solid(colour), JPEG, timeout)


class Load:
    """``clients`` threads sending predictions back to back until stopped; every outcome is kept."""

    def __init__(self, url: str, clients: int, request: Callable[[str], Outcome] = predict) -> None:
        self.url, self.request = url, request
        self.outcomes: list[Outcome] = []
        self.sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self.sent += 1
            outcome = self.request(self.url)
            with self._lock:
                self.outcomes.append(outcome)

    def since(self, t: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.start >= t]

    def wait_for(self, ok: Callable[[list[Outcome]], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                done = ok(list(self.outcomes))
            if done:
                return True
            time.sleep(0.05)
        return False

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def counts(outcomes: list[Outcome]) -> dict[int, int]:
    return dict(sorted(Counter(o.status for o in outcomes).items()))


def assert_error_shape(outcome: Outcome) -> None:
    """A refusal the client can act on: the JSON error shape, the expected code, Retry-After when 429/503."""
    body = outcome.json()
    assert set(body["error"]) >= {"code", "message"}, body
    assert body["error"]["code"] in ERROR_CODES[outcome.status], body
    if outcome.status in (429, 503):
        assert int(outcome.headers["Retry-After"]) >= 1, outcome.headers


# -- 1. Triton killed under load ------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_triton_killed_under_load_gets_503_within_the_timeout_then_recovers_without_restart(stack, protocol):
    """A Triton crash must cost clients fast 503s only, and its return must need no gateway restart."""
    triton = stack["triton"]
    timeout_s = 3.0
    with (
        gateway(stack, "kill-triton", protocol=protocol, workers=2, timeout_s=timeout_s) as gw,
        Load(gw.url, clients=3) as load,
    ):
        assert load.wait_for(lambda done: sum(o.status == 200 for o in done) >= 15, 30), counts(load.outcomes)
        killed_at = time.monotonic()
        try:
            os.kill(triton.pid, signal.SIGKILL)  # a crash: no graceful unload, connections cut
            triton.stop()  # reaps it and its python stubs
            assert load.wait_for(lambda done: sum(o.start > killed_at + 0.5 for o in done) >= 10, 30)
            down, alive = send(gw.url, "/readyz"), send(gw.url, "/healthz")
            time.sleep(1.5)  # down for a while under load: every answer must be a fast 503
        finally:
            restart_at = time.monotonic()
            triton.start()  # the same ports: the gateway's gRPC channel must find it again by itself
        triton_ready_at = time.monotonic()
        recovered = load.wait_for(
            lambda done: sum(o.status == 200 and o.start > triton_ready_at for o in done) >= 10, 30
        )
        # Each worker has its own gRPC channel (and reconnect backoff): poll until /readyz agrees.
        ready = send(gw.url, "/readyz")
        while ready.status != 200 and ready.start < triton_ready_at + 10:
            time.sleep(0.1)
            ready = send(gw.url, "/readyz")
        time.sleep(1.0)
    outcomes = load.outcomes
    assert load.sent == len(outcomes), "requests without an answer"
    assert recovered, counts(load.since(triton_ready_at))
    lost = [o for o in outcomes if o.status == 0]
    assert not lost, lost[:3]
    assert set(counts(outcomes)) <= {200, 503}, counts(outcomes)
    for o in outcomes:
        assert o.seconds < timeout_s + 3, (o.status, o.seconds)  # never a hang
        if o.status != 200:
            assert_error_shape(o)
    assert all(o.status == 200 for o in outcomes if o.end < killed_at)
    while_down = [o for o in outcomes if killed_at + 0.2 < o.start and o.end < restart_at]
    assert while_down and all(o.status == 503 for o in while_down), counts(while_down)
    assert down.status == 503 and down.json()["status"] == "not_ready"
    assert alive.status == 200  # liveness is the process, not Triton: no restart loop while Triton is down
    assert ready.status == 200 and ready.json()["status"] == "ready", ready.body
    # Recovered: from some request on, every request got 200; measured from Triton's readiness.
    last_failure = max(o.start for o in outcomes if o.status != 200)
    first_good = min(o.start for o in outcomes if o.status == 200 and o.start > last_failure)
    recovery_s = max(0.0, first_good - triton_ready_at)
    after = [o for o in outcomes if o.start > last_failure]
    print(
        f"\ntriton killed: {counts(outcomes)}; down {restart_at - killed_at:.1f} s before the restart, "
        f"503 latency max {max(o.seconds for o in while_down):.3f} s; Triton restart "
        f"{triton_ready_at - restart_at:.1f} s; gateway recovered {recovery_s:.2f} s after Triton was ready "
        f"(/readyz 200 after {ready.end - triton_ready_at:.2f} s); {len(after)} answers 200 since"
    )
    assert recovery_s < 10, recovery_s
    assert len(after) >= 10


# -- 2. Triton slow -------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_slow_triton_gets_504_at_the_deadline_while_other_requests_stay_fast(stack, protocol):
    """A slow model holds only the threads of its own requests: no head-of-line blocking of the pool."""
    timeout_s = 2.0
    settings = {"workers": 1, "threads": 6, "max_inflight": 4, "timeout_s": timeout_s}
    with gateway(stack, "slow", model="slow", protocol=protocol, **settings) as gw:
        with ThreadPoolExecutor(8) as pool:
            slow = [pool.submit(predict, gw.url, RED) for _ in range(2)]
            time.sleep(0.5)  # both are sleeping in Triton now, each holding a gunicorn thread
            others = [
                pool.submit(send, gw.url, path) for path in ("/healthz", "/v1/models", "/readyz", "/metrics")
            ]
            others += [pool.submit(predict, gw.url, BLUE) for _ in range(2)]
            slow_outcomes = [f.result() for f in slow]
            other_outcomes = [f.result() for f in others]
    for o in slow_outcomes:
        assert o.status == 504, (o.status, o.body[:300])
        assert_error_shape(o)
        assert timeout_s - 0.2 < o.seconds < timeout_s + 3, o.seconds  # at the deadline, not at the sleep
    first_slow_answer = min(o.end for o in slow_outcomes)
    for o in other_outcomes:
        assert o.status == 200, (o.path, o.status, o.body[:300])
        assert o.seconds < 1.5 and o.end < first_slow_answer, (o.path, o.seconds)
    print(
        f"\nslow Triton: 504 after {[round(o.seconds, 2) for o in slow_outcomes]} s "
        f"(deadline {timeout_s} s); "
        f"meanwhile {[(o.path, round(o.seconds, 3)) for o in other_outcomes]}"
    )


# -- 3. Overload ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_overload_gets_fast_429_or_503_with_retry_after_and_no_request_is_lost(stack, protocol):
    """Far more concurrent requests than slots: the excess is refused at once at either bound, not queued."""
    clients, per_client = 40, 6
    settings = {"workers": 2, "threads": 6, "max_inflight": 3, "timeout_s": 10}
    with gateway(stack, "overload", model="busy", protocol=protocol, **settings) as gw:
        barrier = threading.Barrier(clients)

        def client(_: int) -> list[Outcome]:
            barrier.wait(30)
            return [predict(gw.url) for _ in range(per_client)]

        with ThreadPoolExecutor(clients) as pool:
            outcomes = [o for batch in pool.map(client, range(clients)) for o in batch]
        health = send(gw.url, "/healthz")
    by_status = counts(outcomes)
    assert len(outcomes) == clients * per_client and 0 not in by_status, by_status
    assert set(by_status) <= {200, 429, 503}, by_status
    refused = [o for o in outcomes if o.status != 200]
    for o in refused:
        assert_error_shape(o)
    codes = Counter(o.error_code() for o in refused)
    # Both halves of the bounded queue refused work: the gateway's slots (429) and Triton's queue (503).
    assert by_status.get(200, 0) > 0 and codes["overloaded"] > 0 and codes["triton_overloaded"] > 0, codes
    fast = sorted(o.seconds for o in refused)
    served = sorted(o.seconds for o in outcomes if o.status == 200)
    assert statistics.median(fast) < 0.5 and fast[-1] < 3.0, fast[-5:]
    assert health.status == 200
    print(
        f"\noverload ({clients} clients x {per_client}, 6 slots, Triton queue 1): {by_status} {dict(codes)}; "
        f"refusals median {statistics.median(fast) * 1000:.0f} ms, max {fast[-1] * 1000:.0f} ms; "
        f"200s median {statistics.median(served) * 1000:.0f} ms"
    )


# -- 4. A gateway worker killed -------------------------------------------------------------------------
def test_a_killed_gateway_worker_is_replaced_and_the_next_requests_succeed(stack):
    """gunicorn's master replaces a dead worker; requests waiting in the listen socket are not lost."""
    with gateway(stack, "kill-worker", workers=1, threads=4) as gw:
        (old,) = gw.worker_pids()
        assert predict(gw.url).status == 200
        os.kill(old, signal.SIGKILL)
        killed_at = time.monotonic()
        # With one worker, requests sent now wait in the listen backlog for the replacement.
        outcomes = [predict(gw.url) for _ in range(20)]
        pids = gw.worker_pids()
    assert old not in pids and len(pids) == 1, (old, pids)
    assert [o.status for o in outcomes] == [200] * 20, [(o.status, o.error) for o in outcomes]
    print(
        f"\nworker killed: first answer after {outcomes[0].end - killed_at:.2f} s, then 20 of 20 answers 200"
    )
