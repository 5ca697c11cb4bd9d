"""How a client uploads a photo to the gateway: one ``multipart/form-data`` encoder (urllib3's) for the
bench, the parity check and ``fashion serve``'s smoke request."""

from __future__ import annotations

import uuid


def multipart_image(image: bytes, filename: str, **fields: str) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with ``image`` as field ``image`` and text ``fields``; returns the body
    and its Content-Type (urllib3's encoder, the one tritonclient's HTTP stack already installs)."""
    from urllib3 import encode_multipart_formdata

    parts: dict[str, str | tuple[str, bytes, str]] = dict(fields)
    parts["image"] = (filename, image, "image/jpeg")
    return encode_multipart_formdata(parts, boundary=f"fashion-{uuid.uuid4().hex}")
