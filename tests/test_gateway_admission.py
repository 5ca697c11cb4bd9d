"""The gateway's admission (``gateway.admission``): a bounded wait for an in-flight slot instead of an instant
429, refusal before the body is read, the drain on SIGTERM; and its error codes, one enum shared by the error
handler and the metrics (``gateway.errors.ErrorCode``)."""

from __future__ import annotations

import ast
import io
import threading
import time
from pathlib import Path

import pytest

from gateway.admission import RECEIVED_AT, Admission
from gateway.errors import IMAGE_ERRORS, REFUSALS, TRITON_FAILURES, ErrorCode, GatewayError, Overloaded
from tests.fixtures_gateway import FakeTriton, prediction_in_flight, solid, write_metadata
from tests.test_gateway import RED, assert_error, make_app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    write_metadata(tmp_path)
    return tmp_path


# -- Admission alone ------------------------------------------------------------------------------------
def fixed(slots: int, wait_s: float) -> Admission:
    """An admission whose wait starts at ``wait_s`` (one holding time of ``wait_s``)."""
    return Admission(slots, wait_s, waits_per_hold=1.0, first_hold_s=max(wait_s, 1e-3))


def hold(admission: Admission, received_at: float, release: threading.Event) -> threading.Thread:
    """A request that takes a slot and keeps it until ``release`` is set."""
    taken = threading.Event()

    def run() -> None:
        with admission.slot(received_at):
            taken.set()
            release.wait(10)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert taken.wait(5)
    return thread


def test_a_request_that_finds_every_slot_busy_waits_and_gets_one_that_frees_within_its_wait():
    admission, release = fixed(1, 2.0), threading.Event()
    holder = hold(admission, time.monotonic(), release)
    threading.Timer(0.2, release.set).start()
    with admission.slot(time.monotonic()) as waited_s:
        assert 0.1 < waited_s < 2.0  # it waited for the slot instead of a 429
    holder.join(5)


def test_the_wait_is_counted_from_the_arrival_not_from_the_call():
    admission, release = fixed(1, 0.5), threading.Event()
    holder = hold(admission, time.monotonic(), release)
    arrived = time.monotonic() - 0.4  # 0.4 s of its 0.5 s went on waiting for a thread
    started = time.monotonic()
    with pytest.raises(Overloaded, match=r"stayed busy for 0\.5 s"):
        with admission.slot(arrived):
            pass
    assert time.monotonic() - started < 0.4
    release.set()
    holder.join(5)


def test_the_wait_is_a_few_recent_service_times_and_at_most_the_configured_longest():
    clock = [0.0]
    admission = Admission(slots=2, max_wait_s=1.0, clock=lambda: clock[0])
    assert admission.wait_s == pytest.approx(0.4)  # 4 x the first holding time assumed, 0.1 s

    def served(seconds: float, times: int) -> None:
        for _ in range(times):
            with admission.slot(clock[0]):
                clock[0] += seconds

    served(0.01, 60)  # a fast backend (or one that refuses at once): a short wait, and soon a 429
    assert admission.wait_s == pytest.approx(0.04, rel=0.05)
    served(0.6, 60)  # a slow one: waiting is worth it, up to the longest wait
    assert admission.wait_s == 1.0


def test_refusal_before_the_body_only_when_the_wait_is_over_and_no_slot_is_free():
    admission, release = fixed(1, 0.3), threading.Event()
    long_ago = time.monotonic() - 1.0
    assert admission.refusal(long_ago) is None  # a free slot: late or not, it goes on
    holder = hold(admission, time.monotonic(), release)
    assert admission.refusal(long_ago) is ErrorCode.OVERLOADED
    assert admission.refusal(time.monotonic()) is None  # still within its wait: it may wait for the slot
    assert admission.refusal(long_ago, prediction=False) is None  # only predictions take slots
    release.set()
    holder.join(5)


def test_a_draining_admission_serves_what_arrived_before_and_refuses_what_arrives_after():
    admission, release = fixed(2, 0.3), threading.Event()
    before = time.monotonic()
    holder = hold(admission, before, release)
    admission.begin_drain()
    assert admission.draining
    assert admission.refusal(before) is None
    assert admission.refusal(time.monotonic()) is ErrorCode.SHUTTING_DOWN
    assert admission.refusal(time.monotonic(), prediction=False) is ErrorCode.SHUTTING_DOWN
    assert not admission.wait_idle(0.1)  # a request still holds its slot
    threading.Timer(0.2, release.set).start()
    assert admission.wait_idle(5)
    holder.join(5)


# -- in the app ---------------------------------------------------------------------------------------------
def test_a_prediction_whose_wait_ran_out_in_the_thread_queue_is_refused_without_reading_its_body(repository):
    fake = FakeTriton()
    app = make_app(repository, fake, max_inflight=1, queue_wait_s=0.3)

    class Unreadable(io.BytesIO):
        def read(self, *args: object) -> bytes:
            raise AssertionError("the body of a refused request was read")

        readline = read

    body = solid(RED)
    with prediction_in_flight(app, fake, body) as first:
        response = app.test_client().post(
            "/v1/predict",
            input_stream=Unreadable(body),
            content_type="image/jpeg",
            headers={"Content-Length": str(len(body))},
            environ_overrides={RECEIVED_AT: time.monotonic() - 5.0},
        )
        assert_error(response, 429, "overloaded")
        assert response.headers["Retry-After"] == "1"
    assert first["response"].status_code == 200


def test_while_draining_new_requests_get_a_json_503_and_readiness_says_draining(repository):
    fake = FakeTriton()
    app = make_app(repository, fake)
    client = app.test_client()
    assert client.post("/v1/predict", data=solid(RED), content_type="image/jpeg").status_code == 200
    app.extensions["fashion_gateway"].admission.begin_drain()
    response = client.post("/v1/predict", data=solid(RED), content_type="image/jpeg")
    assert_error(response, 503, "shutting_down")
    assert response.headers["Retry-After"] == "1"
    assert_error(client.get("/v1/models"), 503, "shutting_down")
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json() == {"status": "draining"}
    assert client.get("/healthz").status_code == 200  # alive: nothing restarts a draining pod
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'fashion_gateway_rejected_total{reason="shutting_down"} 2.0' in metrics


# -- error codes: one enum for the handler and the metrics -------------------------------------------------
def metric_lines(client) -> list[str]:
    return client.get("/metrics").get_data(as_text=True).splitlines()


def test_every_code_of_a_metric_family_has_its_series_from_the_start(repository):
    lines = metric_lines(make_app(repository, FakeTriton()).test_client())
    families = {
        "fashion_gateway_triton_errors_total{kind": TRITON_FAILURES,
        "fashion_gateway_rejected_total{reason": REFUSALS,
        "fashion_gateway_image_errors_total{code": IMAGE_ERRORS,
    }
    for series, codes in families.items():
        for code in codes:
            assert f'{series}="{code.value}"}} 0.0' in lines, (series, code)


@pytest.mark.parametrize("code", sorted(TRITON_FAILURES), ids=str)
def test_each_triton_failure_the_handler_answers_is_counted_under_its_own_code(repository, code):
    fake = FakeTriton()
    client = make_app(repository, fake).test_client()
    error = GatewayError("injected", code=code)
    error.status = 503
    fake.error = error
    assert_error(client.post("/v1/predict", data=solid(RED), content_type="image/jpeg"), 503, code.value)
    assert f'fashion_gateway_triton_errors_total{{kind="{code.value}"}} 1.0' in metric_lines(client)


def test_codes_are_enum_members_everywhere_never_string_literals():
    """A literal would be a second spelling of a code that a rename leaves behind (its metric then stops)."""
    literals = []
    for path in sorted((ROOT / "gateway").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            value = None
            if isinstance(node, ast.keyword) and node.arg == "code":
                value = node.value
            elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "code" for t in node.targets):
                value = node.value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                literals.append(f"{path.name}:{node.lineno} {value.value!r}")
    assert not literals, literals


def test_every_image_error_of_the_contract_and_every_gateway_error_has_an_enum_code():
    import fashion.contract as contract
    import gateway.errors as errors

    types = [c for c in vars(contract).values() if isinstance(c, type)]
    image_codes = {c.code for c in types if issubclass(c, contract.ImageError)}
    assert {ErrorCode(c) for c in image_codes} == IMAGE_ERRORS
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, GatewayError):
            assert isinstance(cls.code, ErrorCode), cls
    with pytest.raises(ValueError, match="not counted in this metric family"):
        make_app_metrics().triton_error(ErrorCode.OVERLOADED)


def make_app_metrics():
    from gateway.metrics import GatewayMetrics

    return GatewayMetrics()
