"""The gateway's typed errors. Each carries its HTTP status and a stable ``code`` for the JSON body.

Flask-free: the Python client raises the same classes. The app turns any ``GatewayError`` into
``{"error": {"code": ..., "message": ...}}`` in one error handler.

Every code is an ``ErrorCode`` member, never a string literal: the error handler writes it into the body and
the metrics (``gateway.metrics``) label their series with it, both from the same member, so renaming a code
renames its metric series too instead of silently stopping it. The families below say which metric counts
which codes; each family's series exist (at 0) from the start.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fashion.contract import ImageError
    from fashion.text import TitleError


class ErrorCode(StrEnum):
    """The ``error.code`` of every JSON error the gateway (and gunicorn in front of it) answers with."""

    # the request
    BAD_REQUEST = "bad_request"
    MISSING_IMAGE = "missing_image"
    TOO_MANY_IMAGES = "too_many_images"
    TOO_LARGE = "too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    INVALID_OPTION = "invalid_option"
    INVALID_TOP_K = "invalid_top_k"
    UNKNOWN_CATEGORY = "unknown_category"
    UNAUTHORIZED = "unauthorized"
    # a title (fashion.text's codes: one per TitleError class), and a batch whose titles do not pair up
    INVALID_TITLE = "invalid_title"
    TITLE_TOO_LONG = "title_too_long"
    TITLE_COUNT_MISMATCH = "title_count_mismatch"
    # an image (fashion.contract's codes: one per ImageError class)
    INVALID_IMAGE = "invalid_image"
    UNDECODABLE_IMAGE = "undecodable_image"
    UNSUPPORTED_IMAGE_FORMAT = "unsupported_image_format"
    IMAGE_TOO_LARGE = "image_too_large"
    # HTTP (routing, Werkzeug's limits, gunicorn's parser)
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    REQUEST_TIMEOUT = "request_timeout"
    LENGTH_REQUIRED = "length_required"
    HEADERS_TOO_LARGE = "headers_too_large"
    URI_TOO_LONG = "uri_too_long"
    EXPECTATION_FAILED = "expectation_failed"
    FORBIDDEN = "forbidden"
    HTTP_ERROR = "http_error"
    # load: refused before any work
    OVERLOADED = "overloaded"
    SHUTTING_DOWN = "shutting_down"
    # Triton and the model
    MODEL_UNAVAILABLE = "model_unavailable"
    METADATA_UNAVAILABLE = "metadata_unavailable"
    TRITON_UNREACHABLE = "triton_unreachable"
    TRITON_OVERLOADED = "triton_overloaded"
    MODEL_NOT_READY = "model_not_ready"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_ERROR = "upstream_error"
    OUTPUT_MISMATCH = "output_mismatch"
    # a bug
    INTERNAL_ERROR = "internal_error"


# Metric families (gateway.metrics): fashion_gateway_triton_errors_total{kind}, _rejected_total{reason},
# _image_errors_total{code}, _title_errors_total{code}.
TRITON_FAILURES = frozenset(
    {
        ErrorCode.MODEL_UNAVAILABLE,
        ErrorCode.TRITON_UNREACHABLE,
        ErrorCode.TRITON_OVERLOADED,
        ErrorCode.MODEL_NOT_READY,
        ErrorCode.UPSTREAM_TIMEOUT,
        ErrorCode.UPSTREAM_ERROR,
        ErrorCode.OUTPUT_MISMATCH,
    }
)
REFUSALS = frozenset({ErrorCode.UNAUTHORIZED, ErrorCode.OVERLOADED, ErrorCode.SHUTTING_DOWN})
TITLE_ERRORS = frozenset({ErrorCode.INVALID_TITLE, ErrorCode.TITLE_TOO_LONG})  # _title_errors_total{code}
IMAGE_ERRORS = frozenset(
    {
        ErrorCode.INVALID_IMAGE,
        ErrorCode.UNDECODABLE_IMAGE,
        ErrorCode.UNSUPPORTED_IMAGE_FORMAT,
        ErrorCode.IMAGE_TOO_LARGE,
    }
)


class GatewayError(Exception):
    """Base class: ``status`` is the HTTP status the gateway answers with."""

    status = 500
    code = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = ErrorCode(code)


class BadRequest(GatewayError):
    """The request is malformed (no image, an empty field, a broken multipart body)."""

    status = 400
    code = ErrorCode.BAD_REQUEST


class InvalidImage(GatewayError):
    """The image bytes cannot be decoded (empty, truncated, not an image)."""

    status = 400
    code = ErrorCode.UNDECODABLE_IMAGE


class InvalidTitle(GatewayError):
    """A title the gateway cannot use: too long, not UTF-8, control characters (``invalid_title``,
    ``title_too_long``), or a batch whose ``titles`` fields do not pair up with its images."""

    status = 400
    code = ErrorCode.INVALID_TITLE


class Unauthorized(GatewayError):
    """No API key, or one the gateway does not know."""

    status = 401
    code = ErrorCode.UNAUTHORIZED


class PayloadTooLarge(GatewayError):
    """Too many bytes, pixels or images."""

    status = 413
    code = ErrorCode.TOO_LARGE


class UnsupportedMediaType(GatewayError):
    """A content type or image format the gateway does not accept."""

    status = 415
    code = ErrorCode.UNSUPPORTED_MEDIA_TYPE


class InvalidOption(GatewayError):
    """A well-formed request with an option the model cannot honour (``top_k``, ``category``)."""

    status = 422
    code = ErrorCode.INVALID_OPTION


class Overloaded(GatewayError):
    """Every in-flight slot of this worker stayed busy for the whole bounded wait; retry shortly."""

    status = 429
    code = ErrorCode.OVERLOADED


class ShuttingDown(GatewayError):
    """The gateway is stopping: it answers what it accepted before, and nothing new; retry elsewhere."""

    status = 503
    code = ErrorCode.SHUTTING_DOWN


class UpstreamError(GatewayError):
    """Triton answered with an error that is not the client's fault and not a timeout."""

    status = 502
    code = ErrorCode.UPSTREAM_ERROR


class ModelUnavailable(GatewayError):
    """Triton is unreachable, the model is not loaded, or its metadata is missing or skewed."""

    status = 503
    code = ErrorCode.MODEL_UNAVAILABLE


class UpstreamTimeout(GatewayError):
    """Triton did not answer within the configured deadline."""

    status = 504
    code = ErrorCode.UPSTREAM_TIMEOUT


def from_image_error(error: ImageError) -> GatewayError:
    """Map a ``fashion.contract`` image error to the gateway error (and status) a client should see."""
    # lazy: fashion.contract imports NumPy and Pillow; gunicorn's master imports this module for the codes
    from fashion.contract import ImageTooLarge, UndecodableImage, UnsupportedImageFormat

    if isinstance(error, ImageTooLarge):
        cls: type[GatewayError] = PayloadTooLarge
    elif isinstance(error, UnsupportedImageFormat):
        cls = UnsupportedMediaType
    elif isinstance(error, UndecodableImage):
        cls = InvalidImage
    else:
        cls = InvalidImage
    return cls(str(error), code=ErrorCode(error.code))


def from_title_error(error: TitleError) -> GatewayError:
    """Map a ``fashion.text`` title error to the gateway error a client should see (400, its code)."""
    return InvalidTitle(str(error), code=ErrorCode(error.code))
