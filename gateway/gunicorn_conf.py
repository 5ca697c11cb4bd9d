"""gunicorn settings of the gateway: ``gunicorn -c python:gateway.gunicorn_conf 'gateway:create_app()'``.

Read from the same ``FASHION_*`` variables as the app (bad values stop the master at start-up). Prometheus
multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` (a private temporary folder when unset) is emptied at start
and a dead worker's live gauges are dropped.

Workers are threaded (``gthread``): a worker's threads wait on Triton while others decode, and the gRPC
client of Triton works with threads (gevent would need gRPC's own gevent mode). gthread gives each request a
thread from the moment its first bytes arrive until its response is written, and gunicorn's reader has no
deadline: a client that sends one byte per second holds a thread for as long as it likes, and a new
connection that sends nothing holds one for 5 s. ``GatewayWorker`` closes those gaps:

- a new connection gets a thread only once it has sent something (it waits in the worker's poller, not in a
  thread; a connection silent for ``keepalive`` seconds is closed, as is an idle kept-alive one);
- a client has ``FASHION_CLIENT_TIMEOUT_S`` seconds [20] to send a whole request (line, headers and body);
  after that its connection is shut for reading, and it gets a 400 or a closed connection;
- what gunicorn's HTTP parser refuses (bad ``Content-Length``, bad chunk sizes, oversized headers) is
  answered in the gateway's JSON error shape with a request id, and logged without the offending bytes.

It also tells the app when a request arrived (``gateway.admission.RECEIVED_AT``: when its connection was
queued for a thread, so that the bounded wait for a slot counts the time spent waiting for a thread), and
stops without losing a request: on SIGTERM it first **drains** — it keeps accepting, answers what it received
before with the app as usual and what arrives after with 503 ``shutting_down``, every answer with
``Connection: close`` — then, once no admitted prediction is left, accepts what is still in the listen
backlog (those get their 503 too), closes its listening socket and stops as gunicorn does (kept-alive
connections are answered for ``STOP_KEEPALIVE_LINGER`` more seconds, then closed). A new connection after that
is refused by the kernel instead of being reset mid-request. The drain is bounded by the requests in flight
(each by ``FASHION_TIMEOUT_S``) and by ``graceful_timeout``, after which the master kills the worker.

Two races of that stop reset connections the kernel had already accepted (issue 27: 1 lost request in 8 runs
of the lifetime test on a loaded 2-core machine, 0 in 8 after) and are closed here:

- Closing the *last* descriptor of a listening socket resets every connection still in its backlog, and the
  kernel keeps completing handshakes until that close: one that completes between the final ``accept`` and
  the close is reset. So the worker that holds the socket last (no other process has it open: not the
  master, which closed its copy on SIGTERM, nor a sibling still draining; never during a reload, where the
  master keeps it) first makes the kernel drop new SYNs (a socket filter, ``refuse_new_connections``), keeps
  accepting for ``HANDSHAKE_SETTLE_S`` so that handshakes already under way complete and get their 503, and
  only then empties the backlog and closes. A client whose SYN was dropped retransmits it and is refused
  (``ECONNREFUSED``: nothing was sent, safe to retry). Workers decide this one at a time (a lock file), so
  two that finish together cannot both think the other one closes last.
- A connection accepted just before the worker stops whose client has not sent its request within
  ``FIRST_BYTES_WAIT_S`` is parked in the poller like any silent connection (``keepalive`` seconds at most)
  and answered when its request arrives; gunicorn's own worker closes it unanswered once it is stopping, and
  the client, writing its request a moment later, saw a reset or an empty answer.

A worker thread is still held for up to ``FASHION_CLIENT_TIMEOUT_S`` per slow client, so many slow clients
at once can still occupy every thread for that long: in production a buffering reverse proxy (the
ingress) belongs in front of the gateway; see the README's "Security and hostile input".
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import selectors
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from functools import partial
from pathlib import Path
from ssl import SSLError
from typing import Any

from gunicorn import util
from gunicorn.http import errors as http_errors
from gunicorn.http.wsgi import Response, default_environ
from gunicorn.workers import gthread

from gateway.admission import RECEIVED_AT
from gateway.config import GatewayConfig
from gateway.errors import ErrorCode
from gateway.listener import HANDSHAKE_SETTLE_S, held_elsewhere, refuse_new_connections

_config = GatewayConfig.from_env()
CLIENT_TIMEOUT_S = _config.client_timeout_s
# How long a thread waits for a new connection's first bytes before parking it in the poller (gunicorn
# waits 5 s): short, so that a flood of silent connections cannot occupy the threads.
FIRST_BYTES_WAIT_S = 0.05
# The drain ends this long before graceful_timeout at the latest, leaving time for gunicorn's own stop.
STOP_MARGIN_S = 5.0

if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # Must be set before a worker imports prometheus_client; workers inherit the master's environment.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="fashion-gateway-metrics-")

bind = os.environ.get("FASHION_BIND", f"0.0.0.0:{_config.port}")
workers = _config.workers
threads = _config.threads
# A worker silent for this long is killed and replaced; well above one Triton deadline.
timeout = int(max(30, 3 * _config.timeout_s))
# The drain (accepted requests answered, each within FASHION_TIMEOUT_S) must fit in it, and it in the chart's
# terminationGracePeriodSeconds (with the preStop delay before it).
graceful_timeout = math.ceil(max(25, _config.timeout_s + _config.queue_wait_s + 10))
keepalive = 5  # seconds an idle kept-alive (or silent new) connection stays open, without a thread
worker_connections = 1000  # open connections per worker (idle ones included) before it stops accepting
# gunicorn 25+ opens a management socket (reload, scale, stop) in $HOME or $XDG_RUNTIME_DIR by default: the
# gateway needs none, several gateways on one machine would share its path, and the pod's root is read-only.
control_socket_disable = True
# Slow or lying clients: bounded request line and headers (gunicorn's defaults, stated here on purpose).
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190

# Logging: everything through ``logconfig_dict``, one line per record, each with ``rid=``. gunicorn's own
# handlers are off (None) so that its lines do not appear twice in another format.
accesslog = None
errorlog = None
# No query string (a client could put anything there) and no headers: no keys, no image bytes.
access_log_format = 'rid=%({x-request-id}o)s %(h)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms'
_LINE = "%(asctime)s %(levelname)s %(name)s [%(process)d] rid=%(request_id)s %(message)s"
logconfig_dict: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "gateway.logs.RequestIdFilter"}},
    "formatters": {
        "gateway": {"()": "gateway.logs.OneLineFormatter", "format": _LINE},
        # the access message starts with rid=... (from the X-Request-ID response header)
        "access": {
            "()": "gateway.logs.OneLineFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
        },
    },
    "handlers": {
        "gateway": {
            "class": "logging.StreamHandler",
            "formatter": "gateway",
            "filters": ["request_id"],
            "stream": "ext://sys.stderr",
        },
        "access": {"class": "logging.StreamHandler", "formatter": "access", "stream": "ext://sys.stdout"},
    },
    "root": {"level": "INFO", "handlers": ["gateway"]},
    "loggers": {
        "gateway": {"handlers": ["gateway"], "level": "INFO", "propagate": False},
        "gunicorn.error": {"handlers": ["gateway"], "level": "INFO", "propagate": False},
        "gunicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
    },
}


# -- the worker ---------------------------------------------------------------------------------------
# gunicorn's parser errors that are the client's fault: (status, reason, code); the rest is 400.
_CLIENT_ERRORS: dict[type[BaseException], tuple[int, str, ErrorCode]] = {
    http_errors.LimitRequestLine: (414, "URI Too Long", ErrorCode.URI_TOO_LONG),
    http_errors.LimitRequestHeaders: (431, "Request Header Fields Too Large", ErrorCode.HEADERS_TOO_LARGE),
    http_errors.ExpectationFailed: (417, "Expectation Failed", ErrorCode.EXPECTATION_FAILED),
    http_errors.ForbiddenProxyRequest: (403, "Forbidden", ErrorCode.FORBIDDEN),
    SSLError: (403, "Forbidden", ErrorCode.FORBIDDEN),
}
# Server-side problems among gunicorn's errors (a response header the app made, a proxy misconfiguration).
_SERVER_ERRORS = (
    http_errors.ConfigurationProblem,
    http_errors.InvalidResponseHeader,
    http_errors.InvalidResponseHeaderName,
)


def classify(exc: BaseException) -> tuple[int, str, ErrorCode]:
    """(status, reason, code) of the answer to a request gunicorn could not hand to the app.

    An unsupported ``Transfer-Encoding`` is answered 400, not gunicorn's 501: it is the client's input.
    """
    if isinstance(exc, _SERVER_ERRORS) or not isinstance(exc, (http_errors.ParseException, SSLError)):
        return 500, "Internal Server Error", ErrorCode.INTERNAL_ERROR
    for cls, answer in _CLIENT_ERRORS.items():
        if isinstance(exc, cls):
            return answer
    return 400, "Bad Request", ErrorCode.BAD_REQUEST


class MalformedBody(ValueError):
    """gunicorn could not read the request body (a bad chunk size, a missing terminator).

    A ``ValueError``: Werkzeug's input stream turns it into ``ClientDisconnected``, a 400.
    """


class _Input:
    """``wsgi.input`` that raises ``MalformedBody`` where gunicorn's reader raises its parse errors."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def _call(self, method: Callable[..., Any], *args: Any) -> Any:
        try:
            return method(*args)
        except http_errors.ParseException as e:
            raise MalformedBody(f"the request body is malformed ({type(e).__name__})") from e

    def read(self, size: int | None = None) -> bytes:
        return self._call(self._stream.read, size)

    def readline(self, size: int | None = None) -> bytes:
        return self._call(self._stream.readline, size)

    def readlines(self, hint: int | None = None) -> list[bytes]:
        return self._call(self._stream.readlines, hint)

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line


# The request each worker thread is answering: gunicorn's request object (to close its connection during a
# drain) and when its connection was queued for a thread.
_current = threading.local()


def _wrap_app(
    app: Callable[..., Iterable[bytes]], draining: Callable[[], bool]
) -> Callable[..., Iterable[bytes]]:
    """The app as the worker runs it: body parse errors as 400s, the arrival time in the environ, and every
    answer given while ``draining`` announcing ``Connection: close``."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ["wsgi.input"] = _Input(environ["wsgi.input"])
        received = getattr(_current, "received_at", None)
        if received is not None:
            environ[RECEIVED_AT] = received

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            request = getattr(_current, "request", None)
            if request is not None and draining():
                request.force_close()  # before the headers are written: the client will not reuse it
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return wrapped


class GatewayWorker(gthread.ThreadWorker):
    """gunicorn's gthread worker, hardened against slow, silent and malformed clients, telling the app when
    each request arrived, and draining on SIGTERM (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading: dict[int, tuple[float, Any]] = {}  # id(conn) -> (deadline, conn)
        self._reading_lock = threading.Lock()
        self._admission: Any = None  # the app's gateway.admission.Admission

    def load_wsgi(self) -> None:
        super().load_wsgi()
        resources = getattr(self.wsgi, "extensions", {}).get("fashion_gateway")
        self._admission = getattr(resources, "admission", None)
        self.wsgi: Callable[..., Iterable[bytes]] = _wrap_app(self.wsgi, self.draining)

    def draining(self) -> bool:
        return self._admission is not None and self._admission.draining

    def enqueue_req(self, conn: Any) -> None:
        conn.fashion_received_at = time.monotonic()  # new, kept-alive or deferred: its request is ready now
        super().enqueue_req(conn)

    def handle(self, conn: Any) -> Any:
        if not conn.initialized and not conn.data_ready and not conn.wait_for_data(FIRST_BYTES_WAIT_S):
            return gthread._DEFER  # parked in the poller until it sends something (or keepalive ends)
        # The deadline covers the whole HTTP/1 exchange (the gateway does not enable HTTP/2, whose streams
        # would share one connection and one handle() call).
        key = id(conn)
        with self._reading_lock:
            self._reading[key] = (time.monotonic() + CLIENT_TIMEOUT_S, conn)
        _current.received_at = getattr(conn, "fashion_received_at", None)
        try:
            return super().handle(conn)
        finally:
            _current.received_at = None
            with self._reading_lock:
                self._reading.pop(key, None)

    def handle_request(self, req: Any, conn: Any) -> Any:
        _current.request = req
        try:
            return super().handle_request(req, conn)
        finally:
            _current.request = None

    # -- the drain ---------------------------------------------------------------------------------
    def handle_exit(self, sig: Any, frame: Any) -> None:
        """SIGTERM: drain first (module docstring), then stop as gunicorn does."""
        if self._admission is None or not self.alive:
            super().handle_exit(sig, frame)
            return
        if self._admission.draining:
            return
        self._admission.begin_drain()
        self.log.info("SIGTERM: draining (new requests get 503 shutting_down)")
        threading.Thread(target=self._end_drain, name="drain", daemon=True).start()

    def _end_drain(self) -> None:
        idle = self._admission.wait_idle(max(1.0, self.cfg.graceful_timeout - STOP_MARGIN_S))
        self.log.info("drained%s; closing the listening socket", "" if idle else " (timed out)")
        self.method_queue.defer(self._stop_accepting)  # on the worker's main loop

    def _stop_accepting(self) -> None:
        """Close the listening sockets without resetting a connection the kernel accepted (module
        docstring): a socket another process still holds is closed at once (its backlog stays theirs);
        the last holder first stops new handshakes and closes ``HANDSHAKE_SETTLE_S`` later."""
        settling = []
        with _stop_lock():  # one worker at a time: "someone else holds it" must not be mutual
            for listener in self.sockets:
                if held_elsewhere(listener) is False and refuse_new_connections(listener):
                    settling.append(listener)
                else:
                    self._close_listener(listener)
        if settling:
            self.log.info("new connections refused; closing in %.2f s", HANDSHAKE_SETTLE_S)
            timer = threading.Timer(HANDSHAKE_SETTLE_S, self.method_queue.defer, (self._close_and_stop,))
            timer.daemon = True
            timer.start()
        else:
            self._close_and_stop()

    def _close_and_stop(self) -> None:
        for listener in list(self.sockets):
            self._close_listener(listener)
        super().handle_exit(signal.SIGTERM, None)

    def _close_listener(self, listener: Any) -> None:
        """Answer (503) what the kernel queued on ``listener``, then close it (main loop only)."""
        if listener not in self.sockets:
            return
        # Unregisters every listener; while the worker is alive, its loop registers those left again.
        self.set_accept_enabled(False)
        while True:
            before = self.nr_conns
            self.accept(listener)
            if self.nr_conns == before:
                break
        listener.close()
        self.sockets.remove(listener)

    def finish_request(self, conn: Any, fs: Any) -> None:
        # gunicorn parks a connection whose request has not arrived yet (handle() returned _DEFER) only
        # while the worker is alive; once it is stopping it closes it unanswered, and the client, which was
        # about to send its request, sees a reset. Park it as well, as gunicorn would (``keepalive`` seconds
        # at most, the order of ``pending_conns``): a stopping worker serves its parked connections until
        # each is answered or its wait is over (bounded by graceful_timeout).
        if not self.alive and not fs.cancelled() and fs.exception() is None and fs.result() is gthread._DEFER:
            conn.sock.setblocking(False)
            conn.timeout = time.monotonic() + self.cfg.keepalive
            self.pending_conns.append(conn)
            self.poller.register(
                conn.sock, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn)
            )
            return
        super().finish_request(conn, fs)

    def murder_pending(self) -> None:
        # Runs on the worker's main loop at least once a second.
        super().murder_pending()
        self.cut_slow_clients()

    def cut_slow_clients(self) -> None:
        """Shut the read side of connections whose request took longer than ``CLIENT_TIMEOUT_S``.

        A thread blocked reading from such a client sees the end of the stream at once: the parser gives
        up (connection closed) or the app sees a short body (400). Writing the answer still works, so a
        request that was read in time and waits on Triton is not harmed.
        """
        now = time.monotonic()
        with self._reading_lock:
            expired = [(key, conn) for key, (deadline, conn) in self._reading.items() if deadline <= now]
            for key, _ in expired:
                del self._reading[key]
        for _, conn in expired:
            try:
                conn.sock.shutdown(socket.SHUT_RD)
            except OSError:
                continue  # already closed
            self.log.info(
                "cut off a client that did not send its request within %.0f s (%s)",
                CLIENT_TIMEOUT_S,
                _peer(conn.client),
            )

    def _keepalive_after(self, conn: Any, keepalive: bool) -> bool:
        # Draining an unread body can hit a malformed chunk: close the connection instead of answering
        # a second time.
        try:
            return bool(super()._keepalive_after(conn, keepalive))
        except (http_errors.ParseException, OSError):
            return False

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """Answer what gunicorn could not hand to the app in the JSON error shape; log no client bytes."""
        request_start = datetime.now()
        status, reason, code = classify(exc)
        rid = uuid.uuid4().hex
        extra = {"request_id": rid}
        if status >= 500:
            self.log.exception("error handling a request (%s)", type(exc).__name__, extra=extra)
            message = "the gateway failed unexpectedly; the request id is in the X-Request-ID header"
        else:
            # str(exc) would quote the client's bytes (a request line may be the middle of an image).
            self.log.warning(
                "refused a malformed request from %s: %s", _peer(addr), type(exc).__name__, extra=extra
            )
            message = f"the HTTP request is malformed or over a limit ({type(exc).__name__})"
        body = json.dumps({"error": {"code": code.value, "message": message}}).encode()
        headers = [
            ("Connection", "close"),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("X-Request-ID", rid),
            ("X-Content-Type-Options", "nosniff"),
            ("Cache-Control", "no-store"),
        ]
        if req is None:
            req = getattr(exc, "req", None)
        if req is not None:
            environ = default_environ(req, client, self.cfg)
            environ["REMOTE_ADDR"] = (addr or ("", -1))[0]
            environ["REMOTE_PORT"] = str((addr or ("", -1))[1])
            resp = Response(req, client, self.cfg)
            resp.status = f"{status} {reason}"
            resp.headers = list(headers)
            resp.response_length = resp.sent = len(body)
            self.log.access(resp, req, environ, datetime.now() - request_start)
        head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        try:
            util.write_nonblock(client, head.encode("latin-1") + body)
        except Exception:
            self.log.debug("could not send the error answer", extra=extra)


def _peer(addr: Any) -> str:
    return str(addr[0]) if isinstance(addr, tuple) and addr else "unix socket"


@contextlib.contextmanager
def _stop_lock() -> Iterator[None]:
    """A lock shared by this gateway's workers (a file in its private metrics folder); none if it cannot
    be opened."""
    try:
        handle = open(Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]) / "stop.lock", "a")
    except (KeyError, OSError):
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


worker_class = GatewayWorker


# -- hooks --------------------------------------------------------------------------------------------
def on_starting(server: Any) -> None:
    """Start with empty metric files: values from a previous run would be summed in."""
    # Python warnings (Pillow on odd files, ...) through logging: one line, with a request id.
    logging.captureWarnings(True)
    path = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    if path.is_dir():
        for child in path.iterdir():
            if child.is_file():
                child.unlink()
            else:
                shutil.rmtree(child, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)


def child_exit(server: Any, worker: Any) -> None:
    """Drop the live gauges of a worker that exited (killed, restarted or stopped)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
