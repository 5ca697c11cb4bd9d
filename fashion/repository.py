"""What every stage knows about a model repository on disk: version folders, the metadata file's name, file
checksums, and how a client uploads a photo. Torch-free and dependency-free, so the export (which writes),
the gateway and the bench (which read) and ``fashion serve`` share one copy."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

METADATA = "metadata.json"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def version_folders(model_dir: str | Path, *, with_metadata: bool = False) -> list[int]:
    """The numeric version folders of a model (ascending); only those holding ``metadata.json`` if asked."""
    root = Path(model_dir)
    if not root.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in root.iterdir()
        if p.is_dir() and p.name.isdigit() and (not with_metadata or (p / METADATA).is_file())
    )


def multipart_image(image: bytes, filename: str, **fields: str) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with ``image`` as field ``image`` and text ``fields``; returns the body
    and its Content-Type (urllib3's encoder, the one tritonclient's HTTP stack already installs)."""
    from urllib3 import encode_multipart_formdata

    parts: dict[str, str | tuple[str, bytes, str]] = dict(fields)
    parts["image"] = (filename, image, "image/jpeg")
    return encode_multipart_formdata(parts, boundary=f"fashion-{uuid.uuid4().hex}")
