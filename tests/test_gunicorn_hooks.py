"""The private gthread hooks that ``GatewayWorker`` extends exist in the installed gunicorn.

``gateway/gunicorn_conf.py`` overrides or calls parts of gunicorn's gthread worker that are not public API
(``_DEFER``, ``_keepalive_after``, ``TConn.wait_for_data`` …); ``pyproject.toml`` pins gunicorn to the
release line they were written against. An upgrade that drops one fails here, not in production.
"""

from __future__ import annotations

import inspect

import pytest
from gunicorn.workers import gthread

WORKER_METHODS = (
    "handle",
    "murder_pending",
    "_keepalive_after",
    "handle_error",
    "load_wsgi",
    # the arrival time and the drain
    "enqueue_req",
    "handle_request",
    "handle_exit",
    "set_accept_enabled",
    "accept",
    # a connection parked while the worker stops
    "finish_request",
    "on_pending_socket_readable",
)
WORKER_ATTRIBUTES = ("method_queue", "nr_conns", "alive", "pending_conns", "poller", "sockets")
CONNECTION_METHODS = ("wait_for_data",)
CONNECTION_ATTRIBUTES = ("initialized", "data_ready", "sock", "client")


def test_gthread_still_has_the_defer_marker_the_worker_returns_for_silent_connections():
    assert hasattr(gthread, "_DEFER")


@pytest.mark.parametrize("name", WORKER_METHODS)
def test_thread_worker_still_has_the_method_the_gateway_worker_overrides(name):
    from gateway.gunicorn_conf import GatewayWorker

    assert callable(getattr(gthread.ThreadWorker, name, None)), name
    assert GatewayWorker.__mro__[1] is gthread.ThreadWorker


@pytest.mark.parametrize("name", CONNECTION_METHODS)
def test_thread_connections_still_have_the_method_the_worker_calls(name):
    assert callable(getattr(gthread.TConn, name, None)), name


@pytest.mark.parametrize("name", CONNECTION_ATTRIBUTES)
def test_thread_connections_still_set_the_attribute_the_worker_reads(name):
    assert f"self.{name} =" in inspect.getsource(gthread.TConn), name


@pytest.mark.parametrize("name", WORKER_ATTRIBUTES)
def test_thread_workers_still_set_the_attribute_the_drain_uses(name):
    source = inspect.getsource(gthread.ThreadWorker) + inspect.getsource(gthread.ThreadWorker.__mro__[1])
    assert f"self.{name} =" in source, name


def test_requests_can_still_be_told_to_close_their_connection():
    from gunicorn.http.message import Request

    assert callable(getattr(Request, "force_close", None))
