"""What ``fashion serve`` says about its first requests: the example's title, and the flags it prints."""

from __future__ import annotations

import json

from orchestration.serve import describe_prediction, sample_title


def test_the_start_up_request_finds_the_example_photos_title_beside_it(tmp_path):
    photo = tmp_path / "10005.jpg"
    photo.write_bytes(b"")
    (tmp_path / "labels.json").write_text(json.dumps({"10005.jpg": {"title": "Nike Men Blue T-Shirts"}}))
    assert sample_title(photo) == "Nike Men Blue T-Shirts"
    assert sample_title(tmp_path / "other.jpg") is None


def test_an_example_without_a_title_or_labels_is_asked_with_the_photo_alone(tmp_path):
    photo = tmp_path / "1.jpg"
    assert sample_title(photo) is None  # no labels.json
    (tmp_path / "labels.json").write_text("{not json")
    assert sample_title(photo) is None
    (tmp_path / "labels.json").write_text(json.dumps({"1.jpg": {"title": ""}}))
    assert sample_title(photo) is None


def test_the_printed_answer_shows_uncertain_and_conflict_beside_the_label():
    answer = {"predictions": {
        "baseColour": {"label": "Black", "confidence": 0.94, "uncertain": False, "conflict": True},
        "season": {"label": "Fall", "confidence": 0.9, "uncertain": True, "conflict": True},
        "gender": {"label": "Men", "confidence": 0.99, "uncertain": False},
    }}
    lines = describe_prediction(answer)
    assert lines[0].split() == ["baseColour", "Black", "0.94", "(conflict)"]
    assert lines[1].split() == ["season", "Fall", "0.90", "(uncertain,", "conflict)"]
    assert lines[2].split() == ["gender", "Men", "0.99"]
