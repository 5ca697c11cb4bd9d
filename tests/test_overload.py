"""Overload from the clients' side: a load test that cannot pass by failing (an error budget by default,
the latency of the successful requests, the goodput), the polite clients' back-off (``gateway.retry``, and
its copy in the locustfile), ``FashionClient``'s retries of Triton's "busy", and ``fashion overload``."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from fashion.cli import main
from gateway.client import FashionClient
from gateway.errors import ErrorCode, ModelUnavailable, UpstreamTimeout
from gateway.retry import Backoff, retry_after_s
from loadtest.errors import SLO_EXIT_CODE
from loadtest.report import EndpointStats, RequestRecord, Slo, percentile, with_successes
from tests.fixtures_gateway import FakeTriton, solid, write_metadata

ROOT = Path(__file__).resolve().parents[1]


# -- the polite back-off ----------------------------------------------------------------------------------
def test_backoff_waits_at_least_retry_after_plus_a_jitter_that_doubles_up_to_its_cap():
    backoff, rng = Backoff(base_s=0.1, cap_s=1.0), random.Random(0)
    for attempt, window in ((1, 0.1), (2, 0.2), (3, 0.4), (5, 1.0), (9, 1.0)):
        delays = [backoff.delay_s(attempt, 2.0, rng) for _ in range(200)]
        assert 2.0 <= min(delays) and max(delays) <= 2.0 + window
        assert max(delays) - min(delays) > window / 2  # jittered: refused clients do not return together
    assert retry_after_s("3") == 3.0 and retry_after_s(None) == 1.0 and retry_after_s("Wed, 21 Oct") == 1.0


def test_the_locustfile_backoff_is_the_gateway_retry_policy():
    source = (ROOT / "loadtest" / "locustfile.py").read_text()
    start = source.index("def backoff_s(")
    namespace: dict = {"random": random}
    exec(source[start : source.index("\n\n\n", start)], namespace)  # the function alone: no locust import
    for attempt in (1, 2, 3, 6, 12):
        for retry_after in (0.0, 1.0):
            ours = Backoff().delay_s(attempt, retry_after, random.Random(attempt))
            theirs = namespace["backoff_s"](attempt, retry_after, random.Random(attempt))
            assert math.isclose(ours, theirs), (attempt, retry_after)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    write_metadata(tmp_path)
    return tmp_path


class BusyTriton(FakeTriton):
    """Says "busy" ``busy_for`` times, then answers."""

    def __init__(self, busy_for: int, error: Exception) -> None:
        super().__init__()
        self.busy_for, self.failure = busy_for, error
        self.attempts = 0

    def infer(self, *args, **kwargs):
        self.attempts += 1
        if self.attempts <= self.busy_for:
            raise self.failure
        return super().infer(*args, **kwargs)


def client_for(repository: Path, triton: FakeTriton, retry: Backoff | None) -> FashionClient:
    from fashion.metadata import load_metadata

    return FashionClient(load_metadata(repository, "fashion"), triton, retry=retry)


def test_fashion_client_comes_back_after_tritons_busy_answers_with_a_backoff(repository):
    busy = BusyTriton(2, ModelUnavailable("Triton's queue is full", code=ErrorCode.TRITON_OVERLOADED))
    answer = client_for(repository, busy, Backoff(attempts=4, base_s=0.01, cap_s=0.02)).predict(
        solid((200, 0, 0))
    )
    assert busy.attempts == 3 and answer["predictions"]["colour"]["label"] == "red"


def test_fashion_client_gives_up_after_its_tries_and_never_retries_what_is_not_busy(repository):
    overloaded = ModelUnavailable("Triton's queue is full", code=ErrorCode.TRITON_OVERLOADED)
    busy = BusyTriton(9, overloaded)
    with pytest.raises(ModelUnavailable):
        client_for(repository, busy, Backoff(attempts=3, base_s=0.01, cap_s=0.02)).predict(solid((200, 0, 0)))
    assert busy.attempts == 3
    slow = BusyTriton(1, UpstreamTimeout("too slow"))
    with pytest.raises(UpstreamTimeout):
        client_for(repository, slow, Backoff()).predict(solid((200, 0, 0)))
    assert slow.attempts == 1  # a timeout is not "busy": trying again would double the wait
    unretried = BusyTriton(1, overloaded)
    with pytest.raises(ModelUnavailable):
        client_for(repository, unretried, None).predict(solid((200, 0, 0)))  # the gateway's own clients
    assert unretried.attempts == 1


# -- a load test that cannot pass by failing ----------------------------------------------------------------
def stats(p95_all: float, ok_p95: float, failures: int) -> list[EndpointStats]:
    row = EndpointStats(
        "POST", "/v1/predict", 100, failures, 50.0, 1, p95_all, p95_all, p95_all, 10.0, 1, ok_p95, ok_p95
    )
    return [
        row,
        EndpointStats(
            "", "Aggregated", 100, failures, 50.0, 1, p95_all, p95_all, p95_all, 10.0, 1, ok_p95, ok_p95
        ),
    ]


def test_latency_objectives_are_checked_on_the_successful_requests_and_errors_are_budgeted_by_default():
    # 96 % fast refusals: all requests look fast (p95 2 ms), the few answers took 900 ms.
    found = Slo(p95_ms=500).breaches(stats(p95_all=2, ok_p95=900, failures=96))
    assert found[0] == "POST /v1/predict: p95 900 ms > 500 ms"
    assert "error rate 96.00% (96/100) > 1.00%" in found[-1]  # the default budget, unasked
    assert Slo().max_error_rate == 0.01 and Slo(max_error_rate=None).breaches(stats(2, 2, 96)) == []


def test_goodput_and_percentiles_of_successful_requests_come_from_the_record():
    records = [
        RequestRecord(float(i), "POST", "/v1/predict", 100.0 + i, i % 4 == 0, "200") for i in range(40)
    ]
    records += [RequestRecord(50.0, "POST", "/v1/predict", 1.0, False, "429")] * 60
    base = EndpointStats("POST", "/v1/predict", 100, 90, 10.0, 2, 140, 140, 140)
    (row,) = with_successes([base], records, duration_s=10.0)
    ok = [100.0 + i for i in range(0, 40, 4)]
    assert row.ok_rps == 1.0 and row.ok_p50_ms == percentile(ok, 50) == 116.0 and row.ok_p99_ms == 136.0


# -- against a real stack ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tight_gateway(colour_stack) -> Iterator[str]:
    """One slot, refused at once beyond it: most of a crowd's requests get 429."""
    with colour_stack.gateway("tight", workers=1, threads=2, max_inflight=1, queue_wait_s=0) as gateway:
        yield gateway.url


@pytest.mark.server
def test_a_loadtest_that_mostly_fails_exits_1_even_without_an_slo(tight_gateway, tmp_path, capsys):
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed (pip install -e '.[loadtest]')")
    out = tmp_path / "report"
    args = ["loadtest", "--host", tight_gateway, "--users", "24", "--spawn-rate", "24", "--duration", "5"]
    code = main([*args, "--out", str(out)])
    assert code == SLO_EXIT_CODE, (out / "locust.log").read_text()[-2000:]
    printed = capsys.readouterr()
    assert "error rate" in printed.err and "goodput:" in printed.out
    summary = json.loads((out / "summary.json").read_text())
    total = next(e for e in summary["endpoints"] if e["name"] == "Aggregated")
    assert not summary["passed"] and total["ok_rps"] < total["rps"]
    assert total["ok_p50_ms"] >= total["p50_ms"]  # the refusals were the fast ones


@pytest.mark.server
def test_overload_prints_answers_per_second_against_clients_and_writes_the_table_and_plot(
    colour_stack, tmp_path, capsys
):
    with colour_stack.gateway("overload-bench", workers=1, threads=4) as gateway:
        out = tmp_path / "overload"
        args = ["overload", "--host", gateway.url, "--clients", "1,4", "--duration", "2", "--warmup", "0.5"]
        code = main([*args, "--slo-p99-ms", "60000", "--min-goodput-share", "0", "--out", str(out)])
    assert code == 0, capsys.readouterr().out
    result = json.loads((out / "overload.json").read_text())
    assert [p["clients"] for p in result["points"]] == [1, 4]
    assert all(p["answers_per_s"] > 0 for p in result["points"]) and result["breaches"] == []
    assert max(p["share_of_best"] for p in result["points"]) == 1.0
    assert (out / "overload.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "answers/s" in (out / "overload.md").read_text() and "answers/s" in capsys.readouterr().out
