"""Calls to Triton over gRPC or HTTP, with deadlines, and failures mapped to the gateway's typed errors.

``TritonBackend`` is the small interface the rest of the gateway uses; ``TritonTransport`` implements it
with ``tritonclient``. Connections are reused: tritonclient's gRPC client is thread-safe for unary calls,
so one per process (made after gunicorn forks); its HTTP client is not, so one per thread.
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np

from gateway.errors import ErrorCode, GatewayError, ModelUnavailable, UpstreamError, UpstreamTimeout

log = logging.getLogger(__name__)
T = TypeVar("T")

HEALTH_TIMEOUT_S = 2.0  # readiness checks must answer within a probe's timeout
RETRY_DELAY_S = 0.05


class TritonBackend(Protocol):
    """What the gateway needs from Triton. Every method raises a ``GatewayError`` on failure.

    ``infer`` sends ``batch`` as ``input_name`` and, for a model with more inputs (the title ids of a model
    that reads titles), ``extra_inputs`` by name, each with the batch's first dimension. The gateway passes
    ``extra_inputs`` only to a model that has them."""

    def infer(
        self,
        model: str,
        version: int,
        input_name: str,
        batch: np.ndarray,
        outputs: Sequence[str],
        timeout_s: float,
        *,
        extra_inputs: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]: ...

    def server_ready(self) -> bool: ...

    def model_ready(self, model: str, version: int) -> bool: ...

    def model_metadata(self, model: str, version: int) -> dict[str, Any]:
        """``{"inputs": [{"name", "datatype", "shape"}], "outputs": [...]}`` with integer shapes."""
        ...


class TritonTransport:
    """``TritonBackend`` over tritonclient (``protocol`` "grpc" or "http"), reusing connections."""

    def __init__(self, url: str, protocol: str = "grpc", timeout_s: float = 10.0) -> None:
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be grpc or http, got {protocol!r}")
        self.url = url
        self.protocol = protocol
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._grpc: tuple[int, Any] | None = None  # (pid, client): a forked child makes its own
        self._local = threading.local()

    # -- connections ---------------------------------------------------------------------------
    def _client(self, purpose: str = "infer") -> Any:
        if self.protocol == "grpc":
            with self._lock:
                if self._grpc is None or self._grpc[0] != os.getpid():
                    self._grpc = (os.getpid(), self._new_grpc())
                return self._grpc[1]
        client = getattr(self._local, purpose, None)
        if client is None or getattr(self._local, "pid", None) != os.getpid():
            self._local.pid = os.getpid()
            timeout = self.timeout_s if purpose == "infer" else min(self.timeout_s, HEALTH_TIMEOUT_S)
            import tritonclient.http as httpclient

            client = httpclient.InferenceServerClient(
                self.url, connection_timeout=min(timeout, 5.0), network_timeout=timeout
            )
            setattr(self._local, purpose, client)
        return client

    def _new_grpc(self) -> Any:
        import tritonclient.grpc as grpcclient

        # Reconnect quickly after Triton restarts (gRPC's default backoff grows to 120 s).
        args = [
            ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 5_000),
        ]
        return grpcclient.InferenceServerClient(self.url, channel_args=args)

    def _drop_http_client(self, purpose: str) -> None:
        # A failed geventhttpclient connection pool can stay broken; start afresh next call.
        if self.protocol == "http" and getattr(self._local, purpose, None) is not None:
            try:
                getattr(self._local, purpose).close()
            except Exception:  # closing a broken client must not hide the original error
                log.debug("closing a failed Triton HTTP client raised", exc_info=True)
            setattr(self._local, purpose, None)

    # -- calls ---------------------------------------------------------------------------------
    def _call(self, purpose: str, fn: Callable[[Any], T], deadline_s: float) -> T:
        """Run ``fn(client)``; retry once, only on connection failures, while the deadline allows."""
        start = time.monotonic()
        for attempt in (0, 1):
            try:
                return fn(self._client(purpose))
            except BaseException as e:  # gevent's Timeout is a BaseException
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                error = classify(e, self.url)
                if error is None:
                    raise
                self._drop_http_client(purpose)
                retry = (
                    attempt == 0
                    and error.code == "triton_unreachable"
                    and time.monotonic() - start + RETRY_DELAY_S < deadline_s / 2
                )
                if not retry:
                    raise error from e
                time.sleep(RETRY_DELAY_S)
        raise AssertionError("unreachable")  # pragma: no cover

    def infer(
        self,
        model: str,
        version: int,
        input_name: str,
        batch: np.ndarray,
        outputs: Sequence[str],
        timeout_s: float | None = None,
        *,
        extra_inputs: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        sent = {input_name: batch, **(extra_inputs or {})}

        def run(client: Any) -> dict[str, np.ndarray]:
            from tritonclient.utils import np_to_triton_dtype

            if self.protocol == "grpc":
                import tritonclient.grpc as tc
            else:
                import tritonclient.http as tc  # type: ignore[no-redef]
            inputs = []
            for name, array in sent.items():
                inp = tc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
                if self.protocol == "grpc":
                    inp.set_data_from_numpy(array)
                else:
                    inp.set_data_from_numpy(array, binary_data=True)
                inputs.append(inp)
            if self.protocol == "grpc":
                requested = [tc.InferRequestedOutput(name) for name in outputs]
                result = client.infer(
                    model, inputs, model_version=str(version), outputs=requested, client_timeout=timeout_s
                )
            else:
                requested = [tc.InferRequestedOutput(name, binary_data=True) for name in outputs]
                result = client.infer(model, inputs, model_version=str(version), outputs=requested)
            arrays = {name: result.as_numpy(name) for name in outputs}
            missing = [name for name, value in arrays.items() if value is None]
            if missing:
                raise UpstreamError(
                    f"Triton's answer lacks the outputs {missing}", code=ErrorCode.OUTPUT_MISMATCH
                )
            return arrays

        return self._call("infer", run, timeout_s)

    def _health_kwargs(self) -> dict[str, Any]:
        return {"client_timeout": min(self.timeout_s, HEALTH_TIMEOUT_S)} if self.protocol == "grpc" else {}

    def server_ready(self) -> bool:
        return bool(
            self._call("health", lambda c: c.is_server_ready(**self._health_kwargs()), HEALTH_TIMEOUT_S)
        )

    def model_ready(self, model: str, version: int) -> bool:
        return bool(
            self._call(
                "health",
                lambda c: c.is_model_ready(model, str(version), **self._health_kwargs()),
                HEALTH_TIMEOUT_S,
            )
        )

    def model_metadata(self, model: str, version: int) -> dict[str, Any]:
        def run(client: Any) -> dict[str, Any]:
            if self.protocol == "grpc":
                return client.get_model_metadata(model, str(version), as_json=True, **self._health_kwargs())
            return client.get_model_metadata(model, str(version))

        raw = self._call("health", run, HEALTH_TIMEOUT_S)
        return {
            key: [
                {"name": t["name"], "datatype": t["datatype"], "shape": [int(d) for d in t.get("shape", [])]}
                for t in raw.get(key, [])
            ]
            for key in ("inputs", "outputs")
        }


_TIMEOUT_WORDS = ("deadline exceeded", "timed out", "request timeout")
_OVERLOAD_WORDS = ("maximum queue size", "resource_exhausted", "queue is full")
_NOT_READY_WORDS = ("unknown model", "is not found", "not ready", "unavailable model", "is not loaded")


def classify(error: BaseException, url: str = "") -> GatewayError | None:
    """The ``GatewayError`` a tritonclient/socket failure means, or None if it is not a Triton failure."""
    if isinstance(error, GatewayError):
        return error
    try:
        from gevent import Timeout as GeventTimeout
    except ImportError:  # gevent comes with tritonclient[http]; a gRPC-only install may lack it
        GeventTimeout = ()
    if isinstance(error, (TimeoutError, socket.timeout)) or (
        GeventTimeout and isinstance(error, GeventTimeout)
    ):
        return UpstreamTimeout(f"Triton at {url} did not answer in time")
    from tritonclient.utils import InferenceServerException

    if isinstance(error, InferenceServerException):
        status = str(error.status() or "").upper()
        message = str(error.message() or error)
        lowered = message.lower()
        if "DEADLINE_EXCEEDED" in status or "timeout expired" in lowered:  # client deadline, queue policy
            return UpstreamTimeout(f"Triton did not answer in time: {message}")
        if any(w in lowered for w in _OVERLOAD_WORDS) or "RESOURCE_EXHAUSTED" in status:
            return ModelUnavailable(f"Triton's queue is full: {message}", code=ErrorCode.TRITON_OVERLOADED)
        if any(w in lowered for w in _NOT_READY_WORDS) or "NOT_FOUND" in status:
            return ModelUnavailable(
                f"the model is not ready in Triton: {message}", code=ErrorCode.MODEL_NOT_READY
            )
        if "UNAVAILABLE" in status or "connect" in lowered or "socket closed" in lowered:
            return ModelUnavailable(
                f"Triton at {url} is unreachable: {message}", code=ErrorCode.TRITON_UNREACHABLE
            )
        if any(w in lowered for w in _TIMEOUT_WORDS):
            return UpstreamTimeout(f"Triton did not answer in time: {message}")
        return UpstreamError(f"Triton failed the request: {message}")
    # HTTPException: the HTTP client's connection closed before a whole answer (geventhttpclient's
    # HTTPConnectionClosed when Triton dies with the request in flight).
    if isinstance(error, (ConnectionError, OSError, EOFError, http.client.HTTPException)):
        return ModelUnavailable(f"Triton at {url} is unreachable: {error}", code=ErrorCode.TRITON_UNREACHABLE)
    return None
