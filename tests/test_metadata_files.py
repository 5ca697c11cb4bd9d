"""``fashion.metadata`` and ``fashion.upload``: the metadata file, version folders, checksums and upload
bodies every stage shares."""

from __future__ import annotations

import hashlib
import json

import pytest

from fashion.metadata import FILENAME as METADATA
from fashion.metadata import MetadataError, file_sha256, read_document, version_folders, write_metadata
from fashion.upload import multipart_image


def test_version_folders_are_numeric_ascending_and_optionally_need_metadata(tmp_path):
    model = tmp_path / "fashion"
    for name in ("10", "2", "1", "configs", ".staging-3-x"):
        (model / name).mkdir(parents=True)
    (model / "2" / METADATA).write_text("{}")
    (model / "7").write_text("a file, not a version")
    assert version_folders(model) == [1, 2, 10]
    assert version_folders(model, with_metadata=True) == [2]
    assert version_folders(tmp_path / "missing") == []


def test_file_checksum_is_sha256_of_the_bytes(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"x" * (3 << 20))
    assert file_sha256(path) == hashlib.sha256(b"x" * (3 << 20)).hexdigest()


def test_the_upload_body_is_what_the_gateway_parses():
    from werkzeug.test import EnvironBuilder

    body, content_type = multipart_image(b"\xff\xd8jpeg bytes\r\n--not-a-boundary", "shirt.jpg", top_k="1")
    request = EnvironBuilder(method="POST", data=body, content_type=content_type).get_request()
    assert request.form["top_k"] == "1"
    upload = request.files["image"]
    assert upload.filename == "shirt.jpg" and upload.mimetype == "image/jpeg"
    assert upload.read() == b"\xff\xd8jpeg bytes\r\n--not-a-boundary"


def test_write_metadata_refuses_a_document_the_gateway_could_not_read(tmp_path):
    with pytest.raises(MetadataError, match="format"):
        write_metadata(tmp_path, {"format": "something/else@9"})
    assert not (tmp_path / METADATA).exists()


def test_read_document_names_the_file_that_is_missing_or_not_json(tmp_path):
    with pytest.raises(MetadataError, match="does not exist"):
        read_document(tmp_path / METADATA)
    (tmp_path / METADATA).write_text("{not json")
    with pytest.raises(MetadataError, match="not readable JSON"):
        read_document(tmp_path / METADATA)
    (tmp_path / METADATA).write_text(json.dumps({"format": "x"}))
    assert read_document(tmp_path / METADATA) == {"format": "x"}
