"""The gateway's typed errors. Each carries its HTTP status and a stable ``code`` for the JSON body.

Flask-free: the Python client raises the same classes. The app turns any ``GatewayError`` into
``{"error": {"code": ..., "message": ...}}`` in one error handler.
"""

from __future__ import annotations

from fashion.contract import ImageError, ImageTooLarge, UndecodableImage, UnsupportedImageFormat


class GatewayError(Exception):
    """Base class: ``status`` is the HTTP status the gateway answers with."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequest(GatewayError):
    """The request is malformed (no image, an empty field, a broken multipart body)."""

    status = 400
    code = "bad_request"


class InvalidImage(GatewayError):
    """The image bytes cannot be decoded (empty, truncated, not an image)."""

    status = 400
    code = "undecodable_image"


class Unauthorized(GatewayError):
    """No API key, or one the gateway does not know."""

    status = 401
    code = "unauthorized"


class PayloadTooLarge(GatewayError):
    """Too many bytes, pixels or images."""

    status = 413
    code = "too_large"


class UnsupportedMediaType(GatewayError):
    """A content type or image format the gateway does not accept."""

    status = 415
    code = "unsupported_media_type"


class InvalidOption(GatewayError):
    """A well-formed request with an option the model cannot honour (``top_k``, ``category``)."""

    status = 422
    code = "invalid_option"


class Overloaded(GatewayError):
    """This worker already serves its limit of in-flight requests; retry shortly."""

    status = 429
    code = "overloaded"


class UpstreamError(GatewayError):
    """Triton answered with an error that is not the client's fault and not a timeout."""

    status = 502
    code = "upstream_error"


class ModelUnavailable(GatewayError):
    """Triton is unreachable, the model is not loaded, or its metadata is missing or skewed."""

    status = 503
    code = "model_unavailable"


class UpstreamTimeout(GatewayError):
    """Triton did not answer within the configured deadline."""

    status = 504
    code = "upstream_timeout"


def from_image_error(error: ImageError) -> GatewayError:
    """Map a ``fashion.contract`` image error to the gateway error (and status) a client should see."""
    if isinstance(error, ImageTooLarge):
        cls: type[GatewayError] = PayloadTooLarge
    elif isinstance(error, UnsupportedImageFormat):
        cls = UnsupportedMediaType
    elif isinstance(error, UndecodableImage):
        cls = InvalidImage
    else:
        cls = InvalidImage
    return cls(str(error), code=error.code)
