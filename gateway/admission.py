"""Which requests a gateway worker takes on: its in-flight slots, a bounded wait for one, and the drain.

**Slots.** A worker runs at most ``max_inflight`` predictions at once; that bounds what reaches Triton.

**A bounded wait, not an instant 429.** A request that finds every slot busy waits for one, until its wait
is over, counted from when it *arrived* — when gunicorn queued its connection for a thread (``RECEIVED_AT``),
so time spent waiting for a thread counts too. Only then is it refused (429). Measured reason
(docs/operations.md, "Overload"): clients that resend at once on 429 — as many do — turned an instant
refusal into a storm (1,422 refusals/s from 64 clients, served throughput down to 35/s on 2 cores: the CPU
went to saying no). Waiting costs no CPU; a client that waits is not resending.

**How long: a few slot turnovers.** The wait is ``WAITS_PER_HOLD`` (4) times how long a request has lately
held its slot (a moving average), and at most ``max_wait_s`` (``FASHION_QUEUE_WAIT_S``, 1 s): long enough
that a crowd of impatient clients is paced instead of spinning, short enough that a request which could
not get a slot within a few service times — the backend is saturated — hears so soon. One fixed number cannot
be both on a quiet CPU (a slot turns over in 0.1 s), a loaded one (0.6 s) and a GPU (10 ms); measured on
this project's machines, a fixed 0.25 s kept 60 % of the best throughput under 64 impatient clients, 0.5 s
and 1 s 98-100 % (docs/operations.md). The latency of an answered request stays bounded by its wait plus its
own service time.

**Refusal is cheap.** ``refusal()`` runs before the body is read or parsed: a request that has already used
up its wait while queued for a thread is refused at once, for the price of its headers.

**The drain.** On SIGTERM (``gateway.gunicorn_conf``) the worker keeps answering: requests it received
before are served, requests received after get 503 ``shutting_down``; it closes its listening socket once
no admitted request is left (``wait_idle``).

Flask-free (the gunicorn worker uses it too); thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from gateway.errors import ErrorCode, Overloaded, ShuttingDown

# WSGI environ key: time.monotonic() when gunicorn queued the request's connection for a worker thread.
RECEIVED_AT = "fashion.received_at"


WAITS_PER_HOLD = 4.0  # the wait for a slot, in recent slot-holding times
HOLD_SMOOTHING = 0.1  # weight of the newest holding time in its moving average
FIRST_HOLD_S = 0.1  # the holding time assumed before any request has held a slot


class Admission:
    """The slots of one worker, the bounded wait for one, and the drain (see the module docstring)."""

    def __init__(
        self,
        slots: int,
        max_wait_s: float,
        *,
        waits_per_hold: float = WAITS_PER_HOLD,
        first_hold_s: float = FIRST_HOLD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if slots < 1 or max_wait_s < 0 or waits_per_hold <= 0 or first_hold_s <= 0:
            raise ValueError(
                f"need slots >= 1, a wait >= 0 and positive holding factors, got {slots}, {max_wait_s}"
            )
        self.slots = slots
        self.max_wait_s = max_wait_s
        self.waits_per_hold = waits_per_hold
        self._hold_s = first_hold_s  # moving average of how long a request held its slot
        self._clock = clock
        self._semaphore = threading.Semaphore(slots)
        self._lock = threading.Condition()
        self._holding = 0  # requests in a slot
        self._admitted = 0  # requests waiting for a slot or in one
        self._drain_from: float | None = None

    # -- state -------------------------------------------------------------------------------------
    @property
    def holding(self) -> int:
        return self._holding

    @property
    def waiting(self) -> int:
        return self._admitted - self._holding

    @property
    def draining(self) -> bool:
        return self._drain_from is not None

    @property
    def hold_s(self) -> float:
        """How long a request has lately held its slot (moving average, seconds)."""
        return self._hold_s

    @property
    def wait_s(self) -> float:
        """How long a request may wait for a slot now, from its arrival: a few recent holding times."""
        return min(self.max_wait_s, self.waits_per_hold * self._hold_s)

    # -- admission ---------------------------------------------------------------------------------
    def refusal(self, received_at: float, *, prediction: bool = True) -> ErrorCode | None:
        """Why a request received at ``received_at`` is refused before its body is read (``None``: it may
        go on): the worker is draining and received it after the drain began, or (a prediction) every
        slot is busy and its wait is already over."""
        if self._drain_from is not None and received_at >= self._drain_from:
            return ErrorCode.SHUTTING_DOWN
        if prediction and self._holding >= self.slots and self._clock() >= received_at + self.wait_s:
            return ErrorCode.OVERLOADED
        return None

    def check(self, received_at: float, *, prediction: bool = True) -> None:
        """``refusal`` as the typed error to raise."""
        code = self.refusal(received_at, prediction=prediction)
        if code is ErrorCode.SHUTTING_DOWN:
            raise ShuttingDown("the gateway is shutting down; send the request again")
        if code is ErrorCode.OVERLOADED:
            raise self._overloaded()

    @contextmanager
    def slot(self, received_at: float) -> Iterator[float]:
        """Hold a slot for the body; waits until ``received_at + wait_s`` for one, then ``Overloaded``.
        Yields how long it waited (seconds)."""
        with self._lock:
            self._admitted += 1
        started = self._clock()
        try:
            if not self._semaphore.acquire(timeout=max(0.0, received_at + self.wait_s - started)):
                raise self._overloaded()
            with self._lock:
                self._holding += 1
            taken = self._clock()
            try:
                yield taken - started
            finally:
                held = self._clock() - taken
                with self._lock:
                    self._holding -= 1
                    self._hold_s += HOLD_SMOOTHING * (held - self._hold_s)
                self._semaphore.release()
        finally:
            with self._lock:
                self._admitted -= 1
                self._lock.notify_all()

    def _overloaded(self) -> Overloaded:
        return Overloaded(
            f"all {self.slots} prediction slots of this worker stayed busy for {self.wait_s:.2g} s (a few "
            "service times); retry after the Retry-After seconds"
        )

    # -- the drain ---------------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """From now on, new requests are refused (503 ``shutting_down``); those received before go on."""
        with self._lock:
            if self._drain_from is None:
                self._drain_from = self._clock()
            self._lock.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no request waits for or holds a slot (``False`` after ``timeout_s``)."""
        with self._lock:
            return self._lock.wait_for(lambda: self._admitted == 0, timeout=timeout_s)
