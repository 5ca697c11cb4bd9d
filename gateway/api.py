"""The prediction API: ``POST /v1/predict``, ``POST /v1/predict/batch``, ``GET /v1/models``.

The listing's title, for a model that reads titles (docs/api.md): ``/v1/predict`` takes it as the multipart
text field ``title`` or the query parameter ``title`` (percent-encoded UTF-8; the raw-image body form's way);
``/v1/predict/batch`` takes one text field ``titles`` per file field ``images``, in the same order (an
empty one for an image without a title), or none at all. An empty title means the photo alone.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import unquote_to_bytes

from flask import Blueprint, Response, g, request

from gateway.client import BatchResult, FashionClient
from gateway.errors import (
    TRITON_FAILURES,
    BadRequest,
    ErrorCode,
    GatewayError,
    InvalidTitle,
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


def _form_titles(name: str) -> list[str]:
    """The multipart text fields ``name``; a file sent under that name is refused (a title is text)."""
    if request.files.getlist(name):
        raise InvalidTitle(f"send {name!r} as a text field (curl -F '{name}=...'), not as a file")
    return request.form.getlist(name)


def _query_titles() -> list[str]:
    """The query parameters ``title``, decoded as strict UTF-8 (Werkzeug's ``request.args`` would keep
    undecodable bytes as ``%XX`` text, indistinguishable from a title that says ``%FF``)."""
    titles = []
    for pair in request.query_string.split(b"&"):
        key, _, value = pair.partition(b"=")
        if unquote_to_bytes(key.replace(b"+", b" ")) != b"title":
            continue
        try:
            titles.append(unquote_to_bytes(value.replace(b"+", b" ")).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InvalidTitle(f"the title is not UTF-8 text ({e.reason} at byte {e.start})") from e
    return titles


def _single_title() -> str | None:
    """The title of ``/v1/predict``: the multipart field ``title``, else (and for a raw image body) the
    query parameter ``title``; at most one."""
    titles = _form_titles("title") if request.mimetype == "multipart/form-data" else []
    titles = titles or _query_titles()
    if len(titles) > 1:
        raise InvalidTitle("send one 'title'; /v1/predict/batch takes one 'titles' field per image")
    return titles[0] if titles else None


def _batch_titles(count: int) -> list[str] | None:
    """The ``titles`` fields of ``/v1/predict/batch``: none, or one per ``images`` field, in order."""
    titles = _form_titles("titles")
    if not titles:
        return None
    if len(titles) != count:
        raise InvalidTitle(
            f"{len(titles)} 'titles' fields for {count} 'images': send one per image, in the same order "
            "(an empty one for an image without a title), or none",
            code=ErrorCode.TITLE_COUNT_MISMATCH,
        )
    return titles


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


def _predict(
    client: FashionClient, images: list[bytes], titles: list[str] | None, top_k: Any, category: str | None
) -> BatchResult:
    try:
        return client.predict_batch(images, top_k=top_k, category=category, titles=titles)
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


def _run(images_of: Any, titles_of: Any, endpoint: str) -> tuple[FashionClient, BatchResult]:
    gw = gateway()
    _receive_body()
    with gw.inflight():
        client = gw.state.current()
        top_k, category = _options()
        # Options first: a wrong option is answered before any image is read or decoded.
        client.check_top_k(top_k)
        client.outputs_for(category)
        images = images_of()
        titles = titles_of(len(images))
        gw.metrics.images.labels(endpoint).observe(len(images))
        try:
            result = _predict(client, images, titles, top_k, category)
        except GatewayError as e:
            # Triton unloaded this version while the request was in flight (a deploy or a rollback):
            # answer once more with the version it serves now. Inference has no side effects, and the
            # labels come from the metadata of the version that answers, so the switch stays atomic.
            # The failed attempt is counted in triton_errors{kind="model_not_ready"}.
            replacement = gw.state.replacement(client) if e.code is ErrorCode.MODEL_NOT_READY else None
            if replacement is None:
                raise
            client = replacement
            result = _predict(client, images, titles, top_k, category)
    for stage, seconds in result.stage_s.items():
        if stage != "triton" or seconds > 0:
            gw.metrics.stages.labels(stage).observe(seconds)
    for error, answer in zip(result.errors, result.results, strict=True):
        if error is not None:
            gw.metrics.input_error(error.code)
        else:
            gw.metrics.answer(answer["inputs"])
    return client, result


def _timing(result: BatchResult) -> dict[str, float]:
    timing = result.timing_ms
    timing["total"] = round((time.perf_counter() - g.start) * 1000, 3)
    return timing


@bp.post("/predict")
def predict() -> Response:
    client, result = _run(lambda: [_single_image()], lambda count: [_single_title()], "predict")
    error = result.errors[0]
    if error is not None:
        raise error
    answer = result.results[0]
    return json_response(
        {
            "model": client.model,
            "inputs": answer["inputs"],
            "predictions": answer["predictions"],
            "timing_ms": _timing(result),
        }
    )


@bp.post("/predict/batch")
def predict_batch() -> Response:
    client, result = _run(_batch_images, _batch_titles, "predict_batch")
    return json_response({"model": client.model, "results": result.results, "timing_ms": _timing(result)})


@bp.get("/models")
def models() -> Response:
    client = gateway().state.current()
    return json_response({"models": [client.metadata.describe()]})
