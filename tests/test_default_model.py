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

FIXED_PHOTOS = 200
MODEL_FILES_LIMIT_MB = 25


def test_the_shipped_model_and_its_card_are_in_the_tree_within_the_size_limit():
    assert DEFAULT_CHECKPOINT.is_file(), "models/default/model.pt is part of the product"
    card = (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text()
    for must in ("fashion train", "articleType", "macro F1", "Known limits", "uncertain"):
        assert must in card, must
    size_mb = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file()) / 2**20
    assert size_mb <= MODEL_FILES_LIMIT_MB


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
        # INT8 of the shipped model passes with stages 0-4 in FP32 (models/default/export.yaml)
        assert candidates[name].passed, gate
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
    """``examples/labels.json`` holds each photo's catalogue labels and the model's answer when it shipped
    (three right, one shoe called Formal Shoes); the served stack must give the same answers."""
    from loadtest.parity import served_labels

    expected = json.loads((DEFAULT_MODEL_DIR / "examples" / "labels.json").read_text())
    paths = [DEFAULT_MODEL_DIR / "examples" / name for name in expected]
    answers = served_labels(served_default["url"], paths)
    for name, answer in zip(expected, answers, strict=True):
        assert answer is not None, name
        assert answer["articleType"] == expected[name]["articleType"], (name, answer)
        assert answer["masterCategory"] == expected[name]["masterCategory"], (name, answer)


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.skipif(not SHARED_SAMPLE.is_dir(), reason=f"the real sample photos are not at {SHARED_SAMPLE}")
def test_the_shipped_model_tags_200_real_validation_photos_through_the_stack(served_default):
    from loadtest.parity import served_labels
    from training.checkpoint import load_checkpoint
    from training.context import validation_samples

    val = validation_samples(load_checkpoint(DEFAULT_CHECKPOINT), data=str(SHARED_SAMPLE))
    step = max(1, len(val) // FIXED_PHOTOS)
    photos = val[::step][:FIXED_PHOTOS]
    assert len(photos) == FIXED_PHOTOS
    answers = served_labels(served_default["url"], [s.image_path for s in photos])
    assert all(a is not None for a in answers)
    right = {
        name: np.mean(
            [a[name] == s.labels[name] for a, s in zip(answers, photos, strict=True) if s.labels.get(name)]
        )
        for name in ("articleType", "masterCategory", "subCategory")
    }
    assert right["articleType"] >= 0.85, right
    assert right["masterCategory"] >= 0.95, right
