"""The Flask application factory: configuration, shared resources, request hooks and the error handler."""

from __future__ import annotations

import io
import logging
import re
import time
import uuid
from typing import IO

from flask import Flask, Response, g, jsonify, request
from flask import Request as FlaskRequest
from werkzeug.exceptions import HTTPException

from gateway.api import bp as api_bp
from gateway.config import GatewayConfig
from gateway.errors import REFUSALS, ErrorCode, GatewayError, Unauthorized
from gateway.health import bp as health_bp
from gateway.service import EXTENSION, Gateway, gateway, received_at
from gateway.triton import TritonBackend, TritonTransport

log = logging.getLogger(__name__)

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Werkzeug's HTTP errors (routing, body limits) as codes of the JSON error shape.
HTTP_CODES = {
    400: ErrorCode.BAD_REQUEST,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    408: ErrorCode.REQUEST_TIMEOUT,
    411: ErrorCode.LENGTH_REQUIRED,
    413: ErrorCode.TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    431: ErrorCode.HEADERS_TOO_LARGE,
}
PREDICTIONS = frozenset({"api.predict", "api.predict_batch"})


class Request(FlaskRequest):
    """Keeps uploaded files in memory (bounded by MAX_CONTENT_LENGTH): client data never touches the disk."""

    def _get_file_stream(
        self,
        total_content_length: int | None,
        content_type: str | None,
        filename: str | None = None,
        content_length: int | None = None,
    ) -> IO[bytes]:
        return io.BytesIO()


def create_app(config: GatewayConfig | None = None, triton: TritonBackend | None = None) -> Flask:
    """Build the WSGI app. ``config`` defaults to ``GatewayConfig.from_env()``; ``triton`` (tests only)
    replaces the tritonclient transport with another ``TritonBackend``."""
    config = config or GatewayConfig.from_env()
    app = Flask(__name__, static_folder=None)
    app.request_class = Request
    app.json.sort_keys = False  # type: ignore[attr-defined]  # predictions in the metadata's order
    app.config.update(
        MAX_CONTENT_LENGTH=config.max_request_bytes,
        # Bounds the non-file fields (top_k, category). Werkzeug also applies it to its parse buffer, which
        # takes 64 KiB chunks: a value near 64 KiB would refuse ordinary photos.
        MAX_FORM_MEMORY_SIZE=1024 * 1024,
        # A full batch is one `images` and one `titles` part per image, plus the options (top_k, category).
        MAX_FORM_PARTS=form_parts(config),
    )
    init_app(app, config, triton)
    return app


def init_app(app: Flask, config: GatewayConfig, triton: TritonBackend | None = None) -> None:
    """Attach the resources, hooks, error handlers and blueprints."""
    triton = triton or TritonTransport(config.triton_url, config.triton_protocol, config.timeout_s)
    gw = Gateway(config, triton)
    app.extensions[EXTENSION] = gw
    # Reads the metadata files and asks Triton which versions are ready (health timeouts, so a Triton that is
    # down delays the start by seconds, not more); a missing file or version makes /readyz say why.
    gw.state.refresh(force=True)

    app.register_blueprint(api_bp)
    app.register_blueprint(health_bp)
    app.before_request(_before)
    app.after_request(_after)
    app.register_error_handler(GatewayError, _gateway_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)


def _before() -> None:
    g.start = time.perf_counter()
    given = request.headers.get("X-Request-ID", "")
    g.request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
    gw = gateway()
    path = request.path
    if path.startswith("/v1/"):
        # Before anything is read: a draining worker refuses what arrived after SIGTERM, and a prediction
        # that can no longer get a slot is refused for the price of its headers (gateway.admission).
        gw.admission.check(received_at(), prediction=request.endpoint in PREDICTIONS)
    protected = path.startswith("/v1/") or (path == "/metrics" and gw.config.metrics_require_key)
    if protected and gw.config.auth_enabled:
        if not gw.authorized(_presented_key()):
            raise Unauthorized("send a valid API key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")


def _presented_key() -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("X-API-Key") or None


def _after(response: Response) -> Response:
    response.headers["X-Request-ID"] = g.get("request_id", "")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Cache-Control", "no-store")
    endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
    elapsed = time.perf_counter() - g.get("start", time.perf_counter())
    gateway().metrics.requests.labels(endpoint, request.method, str(response.status_code)).observe(elapsed)
    return response


def error_response(
    status: int, code: ErrorCode, message: str, headers: dict[str, str] | None = None
) -> Response:
    response = jsonify({"error": {"code": code.value, "message": message}})
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def _gateway_error(e: GatewayError) -> Response:
    if e.code in REFUSALS:
        gateway().metrics.refused(e.code)
    headers: dict[str, str] = {}
    if e.status in (429, 503):
        headers["Retry-After"] = str(gateway().config.retry_after_s)
    if e.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="fashion-tagger"'
    if e.status >= 500:
        log.warning("%s %s -> %s %s: %s", request.method, request.path, e.status, e.code, e.message)
    return error_response(e.status, e.code, e.message, headers)


def _http_error(e: HTTPException) -> Response:
    status = e.code or 500
    code = HTTP_CODES.get(status, ErrorCode.HTTP_ERROR)
    message = e.description or e.name
    if status == 413:
        message = _too_large_message()
    headers: dict[str, str] = {}
    valid_methods = getattr(e, "valid_methods", None)
    if status == 405 and valid_methods:
        headers["Allow"] = ", ".join(valid_methods)
    return error_response(status, code, message, headers)


def form_parts(config: GatewayConfig) -> int:
    """The most parts a multipart body may have: an ``images`` and a ``titles`` part per image of a full
    batch, and room for the options."""
    return 2 * config.max_batch_images + 16


def _too_large_message() -> str:
    # Werkzeug raises the same 413 for a body over MAX_CONTENT_LENGTH, too many multipart parts and an
    # oversized text field; say which limit the client met.
    limit, length = request.max_content_length, request.content_length
    if limit is not None and (length is None or length > limit):
        return f"the request body is larger than this endpoint accepts ({limit} bytes)"
    return (
        f"the multipart body has too many parts or a text field over {request.max_form_memory_size} bytes "
        f"(at most {request.max_form_parts} parts: one 'images' and one 'titles' field per image, and the "
        "options)"
    )


def _unexpected_error(e: Exception) -> Response:
    # A bug, never a client's fault; logged with its traceback, answered in the JSON shape.
    log.exception("unexpected error on %s %s", request.method, request.path)
    return error_response(
        500,
        ErrorCode.INTERNAL_ERROR,
        "the gateway failed unexpectedly; the request id is in the X-Request-ID header",
    )
