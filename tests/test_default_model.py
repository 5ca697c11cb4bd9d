"""The shipped default model (``models/default``): what ``fashion serve`` exports on a fresh clone, served by
the real Triton and gunicorn, tagging real catalogue photos it never trained on."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest

from orchestration.serve import (
    DEFAULT_CHECKPOINT,
    DEFAULT_MODEL_DIR,
    ServeConfig,
    ensure_model,
    read_metadata,
)
from tests.conftest import SHARED_SAMPLE, served_repository

MODEL_FILES_LIMIT_MB = 25  # the model and its files; the shipped validation photos have their own limit
SHIPPED_PHOTOS_LIMIT_MB = 5
SHIPPED_PHOTOS_MIN = 500  # enough for the export's precision gate on any machine


def _megabytes(paths) -> float:
    return sum(p.stat().st_size for p in paths if p.is_file()) / 2**20


def test_the_shipped_model_and_its_card_are_in_the_tree_within_the_size_limit():
    assert DEFAULT_CHECKPOINT.is_file(), "models/default/model.pt is part of the product"
    card = (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text()
    for must in ("fashion train", "articleType", "macro F1", "Known limits", "uncertain", "drift", "title"):
        assert must in card, must
    photos = DEFAULT_MODEL_DIR / "photos"
    model_files = [p for p in DEFAULT_MODEL_DIR.rglob("*") if photos not in p.parents]
    assert _megabytes(model_files) <= MODEL_FILES_LIMIT_MB
    assert _megabytes(photos.rglob("*")) <= SHIPPED_PHOTOS_LIMIT_MB


def _shipped_rows() -> list[dict[str, str]]:
    import csv

    with (DEFAULT_MODEL_DIR / "photos" / "styles.csv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_the_shipped_photos_are_labelled_titled_real_photos_the_export_can_gate_on():
    from PIL import Image

    rows = _shipped_rows()
    assert len(rows) >= SHIPPED_PHOTOS_MIN
    for row in rows:
        assert row["articleType"] and row["productDisplayName"], row
        with Image.open(DEFAULT_MODEL_DIR / "photos" / "images" / f"{row['id']}.jpg") as image:
            image.verify()
    assert len({r["articleType"] for r in rows}) >= 30  # spread over the catalogue's types, not one


@pytest.mark.skipif(not SHARED_SAMPLE.is_dir(), reason=f"the real sample photos are not at {SHARED_SAMPLE}")
def test_the_shipped_photos_come_from_the_validation_split_never_from_training():
    from training.checkpoint import load_checkpoint
    from training.context import validation_samples

    val = {s.id for s in validation_samples(load_checkpoint(DEFAULT_CHECKPOINT), data=str(SHARED_SAMPLE))}
    shipped = {r["id"] for r in _shipped_rows()}
    assert shipped <= val, sorted(shipped - val)[:5]


@pytest.fixture(scope="module")
def served_default(stack_factory, tmp_path_factory) -> Iterator[dict]:
    """``fashion serve``'s model step on an empty repository (the shipped model, exported), then real
    Triton + gunicorn serving it."""
    work = tmp_path_factory.mktemp("default-model")
    repository = work / "model_repository"
    said: list[str] = []
    version = ensure_model(ServeConfig(repository=repository), said.append)
    with served_repository(stack_factory, repository, work) as url:
        yield {"url": url, "repository": repository, "version": version, "said": said}


@pytest.mark.server
@pytest.mark.slow
def test_serve_exports_the_shipped_model_when_the_repository_is_empty(served_default):
    import hashlib

    from fashion.metadata import load_export_record

    meta = read_metadata(served_default["repository"], "fashion", served_default["version"])
    record = load_export_record(served_default["repository"], "fashion", served_default["version"])
    assert served_default["version"] == 1
    assert record.checkpoint_sha256 == hashlib.sha256(DEFAULT_CHECKPOINT.read_bytes()).hexdigest()
    assert meta["model"]["backbone"] == "tf_efficientnet_lite0"
    assert meta["preprocessing"]["mean"] == [0.5, 0.5, 0.5]  # the backbone's, not ImageNet's
    assert any("export the default model" in line for line in served_default["said"])


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.skipif(not SHARED_SAMPLE.is_dir(), reason=f"the real sample photos are not at {SHARED_SAMPLE}")
def test_serve_gates_every_cpu_candidate_on_500_real_photos_and_serves_the_fastest_that_passed(
    served_default,
):
    from export.runtimes import cpu_info
    from fashion.metadata import load_export_record

    meta = read_metadata(served_default["repository"], "fashion", served_default["version"])
    record = load_export_record(served_default["repository"], "fashion", served_default["version"])
    photos = record.photos
    assert photos.real_photos and photos.gate.images >= 500 and photos.labelled
    assert "validation split" in photos.gate.source
    int8 = record.variant("int8")
    assert int8 is not None and int8.quantisation is not None
    calibration = int8.quantisation.calibration
    assert calibration.real_photos and "training split" in calibration.source
    candidates = {c.name: c for c in record.cpu.candidates}
    assert {"onnxruntime-fp32", "openvino-fp32", "openvino-bf16", "onnxruntime-int8", "openvino-int8"} == set(
        candidates
    )
    bf16 = candidates["openvino-bf16"]
    if cpu_info().bf16:
        # Measured and gated where the CPU has BF16; whether it passes is the gate's verdict on this CPU (on
        # the AMX Xeon of 2026-12-02 it failed on baseColour agreement alone), not this test's: a refused
        # candidate is never served (below).
        assert bf16.unavailable is None and bf16.gate is not None and bf16.gate.images >= 500
        assert len(bf16.gate.attributes) == len(meta["outputs"])
    else:  # an AVX2-only CPU: reported unavailable, with the reason
        assert bf16.unavailable is not None and "no BF16" in bf16.unavailable
    for name in ("openvino-int8", "onnxruntime-int8"):
        gate = candidates[name].gate
        assert gate is not None and gate.images >= 500 and len(gate.attributes) == len(meta["outputs"])
    assert (int8.quantisation.keep_from or "").endswith("models/default/export.yaml")
    kept = int8.quantisation.excluded_nodes["kept_by_request"]
    assert any("/blocks.4/" in n for n in kept) and not any("/blocks.5/" in n for n in kept)
    passed = [c for c in candidates.values() if c.passed]
    assert record.cpu.timing.rounds == 3  # the candidates timed taking turns
    fastest = max(passed, key=lambda c: c.best_ips)
    chosen = record.chosen
    assert (chosen.runtime, chosen.precision) == (fastest.runtime, fastest.precision)
    assert (meta["model"]["runtime"], meta["model"]["precision"]) == (chosen.runtime, chosen.precision)
    configs = served_default["repository"] / "fashion" / "configs"
    config = (configs / "cpu.pbtxt").read_text()
    assert f'string_value: "{chosen.runtime}"' in config and chosen.file in config
    # A candidate refused by the gate (or unavailable) is never served: not chosen, no config of it.
    for refused in (c for c in candidates.values() if not c.passed):
        assert refused != chosen and not refused.configured, refused.name
        assert not (configs / f"{refused.config_name}.pbtxt").exists(), refused.name


@pytest.mark.server
@pytest.mark.slow
def test_the_shipped_example_photos_get_the_answers_the_card_shows_through_the_stack(served_default):
    """``examples/labels.json`` holds each photo's catalogue labels, its listing title, and the model's
    answers when it shipped, from the photo alone and with the title; the served stack must give the same.
    A list is a near tie in PyTorch (10005's colour with its title: Blue 0.44, Black 0.42), where a
    runtime's rounding may pick either — but nothing else."""
    from loadtest.parity import served_labels

    expected = json.loads((DEFAULT_MODEL_DIR / "examples" / "labels.json").read_text())
    paths = [DEFAULT_MODEL_DIR / "examples" / name for name in expected]
    alone = served_labels(served_default["url"], paths)
    titled = served_labels(served_default["url"], paths, titles=[e["title"] for e in expected.values()])
    for name, photo, both in zip(expected, alone, titled, strict=True):
        assert photo is not None and both is not None, name
        for attribute in ("articleType", "masterCategory", "baseColour"):
            want = expected[name]
            assert photo[attribute] in _answers(want["photo"][attribute]), (name, attribute, photo)
            assert both[attribute] in _answers(want["photo_and_title"][attribute]), (name, attribute, both)


def _answers(expected: str | list[str]) -> list[str]:
    return [expected] if isinstance(expected, str) else expected


def _accuracy(answers, photos, names) -> dict[str, float]:
    return {
        name: float(np.mean(
            [a[name] == s.labels[name] for a, s in zip(answers, photos, strict=True) if s.labels.get(name)]
        ))
        for name in names
    }


@pytest.mark.server
@pytest.mark.slow
def test_the_shipped_model_tags_its_860_validation_photos_through_the_stack_better_with_their_titles(
    served_default,
):
    """The shipped validation photos (every machine has them), posted alone and with their listing titles.
    Measured when it shipped (OpenVINO BF16 on a Zen 5 EPYC, 2026-12-03, the title-only heads voting in
    image + title answers): articleType 0.917 alone, 0.970 with titles; baseColour 0.688 / 0.940; gender
    0.933 / 0.992. The bars leave room for another runtime's rounding, not for a title path that reads
    nothing or a served answer that leaves the title-only heads out (0.949 / 0.867 / 0.971 without them)."""
    from loadtest.parity import served_labels
    from training.data import read_catalogue

    photos = read_catalogue(DEFAULT_MODEL_DIR / "photos").samples
    assert len(photos) >= SHIPPED_PHOTOS_MIN
    paths = [s.image_path for s in photos]
    alone = served_labels(served_default["url"], paths)
    titled = served_labels(served_default["url"], paths, titles=[s.title for s in photos])
    assert all(a is not None for a in alone + titled)
    names = ("articleType", "masterCategory", "subCategory", "gender", "baseColour")
    photo, both = _accuracy(alone, photos, names), _accuracy(titled, photos, names)
    assert photo["articleType"] >= 0.88 and photo["masterCategory"] >= 0.98, photo
    assert both["articleType"] >= 0.96 and both["masterCategory"] >= 0.98, both  # issue 24: >= 0.95
    assert both["articleType"] >= photo["articleType"] + 0.035, (photo, both)
    assert both["baseColour"] >= photo["baseColour"] + 0.20, (photo, both)
    assert both["gender"] >= photo["gender"] + 0.045, (photo, both)


@pytest.mark.server
@pytest.mark.slow
def test_the_shipped_model_never_serves_season_as_a_confident_tag(served_default):
    """Season is when the listing was made, not something in the photo (the model card's drift split): the
    served model answers it, always flagged uncertain."""
    from orchestration.serve import predict_file

    for path in sorted((DEFAULT_MODEL_DIR / "examples").glob("*.jpg")):
        answer = predict_file(served_default["url"], path)
        assert answer["predictions"]["season"]["uncertain"] is True, answer
        assert answer["predictions"]["articleType"]["label"], answer
