"""The prediction API: ``POST /v1/predict``, ``POST /v1/predict/batch``, ``GET /v1/models``."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, g, request

from gateway.client import BatchResult, FashionClient
from gateway.errors import (
    TRITON_FAILURES,
    BadRequest,
    ErrorCode,
    GatewayError,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from gateway.service import gateway, json_response

bp = Blueprint("api", __name__, url_prefix="/v1")

RAW_TYPES = frozenset({"image/jpeg", "image/png", "image/webp"})


@bp.before_request
def _limit_single_body() -> None:
    if request.endpoint == "api.predict":
        request.max_content_length = gateway().config.single_request_bytes


def _options() -> tuple[Any, str | None]:
    source = request.form if request.mimetype == "multipart/form-data" else request.args
    top_k = source.get("top_k", request.args.get("top_k", "3"))
    category = source.get("category", request.args.get("category")) or None
    return top_k, category


def _single_image() -> bytes:
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        files = request.files.getlist("image")
        if not files:
            raise BadRequest("the multipart body has no file field 'image'", code=ErrorCode.MISSING_IMAGE)
        if len(files) > 1:
            raise BadRequest(
                "send one 'image' field; use /v1/predict/batch for several images",
                code=ErrorCode.TOO_MANY_IMAGES,
            )
        return files[0].read()
    if mimetype in RAW_TYPES:
        return request.get_data(cache=False)
    raise UnsupportedMediaType(
        f"Content-Type {mimetype or '(none)'!r} is not accepted; send multipart/form-data with a file "
        f"field 'image', or the raw image as one of {sorted(RAW_TYPES)}"
    )


def _batch_images() -> list[bytes]:
    if request.mimetype != "multipart/form-data":
        raise UnsupportedMediaType("send multipart/form-data with one file field 'images' per image")
    files = request.files.getlist("images")
    if not files:
        raise BadRequest("the multipart body has no file fields 'images'", code=ErrorCode.MISSING_IMAGE)
    limit = gateway().config.max_batch_images
    if len(files) > limit:
        raise PayloadTooLarge(
            f"{len(files)} images sent; at most {limit} per request", code=ErrorCode.TOO_MANY_IMAGES
        )
    return [f.read() for f in files]


def _predict(client: FashionClient, images: list[bytes], top_k: Any, category: str | None) -> BatchResult:
    try:
        return client.predict_batch(images, top_k=top_k, category=category)
    except GatewayError as e:
        if e.code in TRITON_FAILURES:
            gateway().metrics.triton_error(e.code)
        raise


def _receive_body() -> None:
    """Read the whole body before waiting for an in-flight slot: a client that uploads slowly holds a thread
    (until gunicorn's FASHION_CLIENT_TIMEOUT_S), never one of the slots that bound the work for Triton. (A
    request that can no longer get a slot was refused before this, in ``gateway.app``, unread.)"""
    if request.mimetype == "multipart/form-data":
        request.files  # noqa: B018  # parses the form; files stay in memory (gateway.app.Request)
    elif request.mimetype in RAW_TYPES and request.endpoint == "api.predict":
        request.get_data()  # cached: _single_image gets these bytes without reading again


def _run(images_of: Any, endpoint: str) -> tuple[FashionClient, BatchResult]:
    gw = gateway()
    _receive_body()
    with gw.inflight():
        client = gw.state.current()
        top_k, category = _options()
        # Options first: a wrong option is answered before any image is read or decoded.
        client.check_top_k(top_k)
        client.outputs_for(category)
        images = images_of()
        gw.metrics.images.labels(endpoint).observe(len(images))
        try:
            result = _predict(client, images, top_k, category)
        except GatewayError as e:
            # Triton unloaded this version while the request was in flight (a deploy or a rollback):
            # answer once more with the version it serves now. Inference has no side effects, and the
            # labels come from the metadata of the version that answers, so the switch stays atomic.
            # The failed attempt is counted in triton_errors{kind="model_not_ready"}.
            replacement = gw.state.replacement(client) if e.code is ErrorCode.MODEL_NOT_READY else None
            if replacement is None:
                raise
            client = replacement
            result = _predict(client, images, top_k, category)
    for stage, seconds in result.stage_s.items():
        if stage != "triton" or seconds > 0:
            gw.metrics.stages.labels(stage).observe(seconds)
    for error in result.errors:
        if error is not None:
            gw.metrics.image_error(error.code)
    return client, result


def _timing(result: BatchResult) -> dict[str, float]:
    timing = result.timing_ms
    timing["total"] = round((time.perf_counter() - g.start) * 1000, 3)
    return timing


@bp.post("/predict")
def predict() -> Response:
    client, result = _run(lambda: [_single_image()], "predict")
    error = result.errors[0]
    if error is not None:
        raise error
    return json_response(
        {"model": client.model, "predictions": result.results[0]["predictions"], "timing_ms": _timing(result)}
    )


@bp.post("/predict/batch")
def predict_batch() -> Response:
    client, result = _run(_batch_images, "predict_batch")
    return json_response({"model": client.model, "results": result.results, "timing_ms": _timing(result)})


@bp.get("/models")
def models() -> Response:
    client = gateway().state.current()
    return json_response({"models": [client.metadata.describe()]})
