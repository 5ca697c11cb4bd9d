"""Operational endpoints: ``/healthz``, ``/readyz``, ``/metrics`` and the upload page at ``/``."""

from __future__ import annotations

from importlib import resources

from flask import Blueprint, Response

from gateway.service import gateway, json_response

bp = Blueprint("health", __name__)

# The page is static and self-contained (inline CSS/JS, no external assets).
PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src blob:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)


@bp.get("/healthz")
def healthz() -> Response:
    """Liveness: the worker answers. Nothing external is checked (that is readiness)."""
    return json_response({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    """Readiness: Triton reachable, the model ready, its metadata matching — and not draining (a stopping
    gateway leaves the load balancer's endpoints while it answers what it had accepted)."""
    gw = gateway()
    if gw.admission.draining:
        ready, body = False, {"status": "draining"}
    else:
        ready, details = gw.state.readiness()
        body = {"status": "ready" if ready else "not_ready", **details}
    if ready:
        return json_response(body)
    response = json_response(body, status=503)
    response.headers["Retry-After"] = str(gw.config.retry_after_s)
    return response


@bp.get("/metrics")
def metrics() -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(
        gateway().metrics.render(),
        mimetype=CONTENT_TYPE_LATEST.split(";")[0],
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )


@bp.get("/")
def index() -> Response:
    page = resources.files("gateway").joinpath("index.html").read_bytes()
    return Response(page, mimetype="text/html", headers={"Content-Security-Policy": PAGE_CSP})
