"""Accuracy through the whole served stack equals ``fashion evaluate``'s, on images the model never saw.

A tiny model (``test_efficientnet``, 48 px) is trained on a synthetic catalogue (seed 11), exported with
``export.pipeline.export_checkpoint`` into a model repository, and served by the pip-installed Triton and the
gateway under gunicorn. ``python -m loadtest.parity`` then scores a disjoint synthetic set (seed 12) both
ways: ``training.evaluate.evaluate`` with the checkpoint, and one ``POST /v1/predict`` per image. Any gap is
the serving path's (decoding, resizing, ONNX export, label decoding), which must not cost accuracy.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fashion.schema import MISSING, Attribute, LabelSchema
from gateway.config import PROTOCOLS
from loadtest import parity

TRAIN_IMAGES = 240
UNSEEN_IMAGES = 250  # one flipped label moves an accuracy by 0.4 points: within the 0.5-point tolerance
TOLERANCE_POINTS = 0.5

COLOUR = LabelSchema((Attribute("colour", ("red", "green", "blue")),))


# ------------------------------------------------------------------------------------------ the comparison
def _labels(n: int = 200) -> np.ndarray:
    return (np.arange(n) % 3).reshape(-1, 1)


def test_parity_flags_a_serving_path_that_changes_two_predictions_in_200():
    labels = _labels()
    offline = labels.copy()
    offline[:20] = (labels[:20] + 1) % 3  # the model itself is 90 % right
    served = offline.copy()
    served[20:22] = (offline[20:22] + 1) % 3  # the serving path breaks two right answers
    report = parity.compare(COLOUR, labels, offline, served, {"colour": 0.9}, TOLERANCE_POINTS)
    (colour,) = report.attributes
    np.testing.assert_allclose(
        [colour.served_accuracy, colour.delta_points, colour.agreement], [0.89, 1.0, 0.99], atol=1e-9
    )
    assert not report.ok and report.max_delta_points > TOLERANCE_POINTS

    same = parity.compare(COLOUR, labels, offline, offline, {"colour": 0.9}, TOLERANCE_POINTS)
    assert same.ok and same.max_delta_points < 1e-9 and same.attributes[0].agreement == 1.0


def test_parity_counts_an_unanswered_image_as_a_served_error_and_fails():
    labels = _labels()
    served = labels.copy()
    served[7] = MISSING  # the gateway answered 4xx/5xx for this image
    report = parity.compare(COLOUR, labels, labels.copy(), served, {"colour": 1.0}, TOLERANCE_POINTS)
    assert report.served_errors == 1 and report.attributes[0].support == 199
    assert report.attributes[0].served_accuracy == 1.0 and not report.ok


def test_served_indices_map_gateway_labels_to_the_checkpoints_classes():
    answers = [{"colour": "blue"}, None, {"colour": "red"}]
    np.testing.assert_array_equal(parity.served_indices(COLOUR, answers), [[2], [MISSING], [0]])


# ------------------------------------------------------------------------------------------ the real stack
def _digests(folder: Path) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in (folder / "images").glob("*.jpg")}


@pytest.fixture(scope="module")
def served_tiny_model(stack_factory, tmp_path_factory) -> Iterator[dict]:
    """A tiny model trained on seed-11 products, served by a real Triton; seed-12 products unseen. Each test
    puts its own gateway (gunicorn) in front of it."""
    from export.pipeline import ExportOptions, export_checkpoint
    from training.config import TrainConfig
    from training.synth import generate
    from training.train import train

    work = tmp_path_factory.mktemp("parity")
    generate(work / "train", TRAIN_IMAGES, seed=11)
    generate(work / "unseen", UNSEEN_IMAGES, seed=12)
    run = work / "run"
    train(
        TrainConfig(
            data=str(work / "train"),
            out=str(run),
            format="kaggle",
            backbone="test_efficientnet",
            image_size=48,
            epochs=4,
            batch_size=16,
            workers=0,
            seed=0,
        )
    )
    repository = work / "model_repository"
    export_checkpoint(
        ExportOptions(checkpoint=run / "best.pt", repository=repository, eval_images=16),
        report=lambda _: None,
    )
    stack = stack_factory(repository, work)
    try:
        yield {"stack": stack, "checkpoint": run / "best.pt", "unseen": work / "unseen", "work": work}
    finally:
        stack.stop()


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_served_accuracy_on_unseen_images_equals_fashion_evaluate_within_half_a_point(
    served_tiny_model, protocol
):
    model = served_tiny_model
    assert not _digests(model["work"] / "train") & _digests(model["unseen"])  # never seen, not one image
    out = model["work"] / f"parity-{protocol}"
    with model["stack"].gateway(f"parity-{protocol}", protocol, workers=2, timeout_s=30) as gateway:
        args = ["--gateway", gateway.url, "--checkpoint", str(model["checkpoint"]), "--out", str(out)]
        args += ["--data", str(model["unseen"]), "--tolerance-points", str(TOLERANCE_POINTS)]
        status = parity.main(args)
    report = json.loads((out / "parity.json").read_text())
    assert status == 0, report
    assert report["images"] == UNSEEN_IMAGES and report["served_errors"] == 0

    evaluated = json.loads((out / "eval" / "metrics.json").read_text())["attributes"]  # `fashion evaluate`
    assert {a["attribute"] for a in report["attributes"]} == {n for n, m in evaluated.items() if m["support"]}
    for a in report["attributes"]:
        name = a["attribute"]
        assert a["support"] == evaluated[name]["support"], name
        np.testing.assert_allclose(a["offline_accuracy"], evaluated[name]["accuracy"], atol=1e-12)
        assert 100 * abs(a["served_accuracy"] - a["offline_accuracy"]) <= TOLERANCE_POINTS, a
        assert a["agreement"] >= 0.99, a  # the same label for (nearly) every image, not just the same rate

    # Not a comparison of two constant guesses: the model learned the colour (12 classes, chance ~0.08).
    colour = next(a for a in report["attributes"] if a["attribute"] == "baseColour")
    assert colour["served_accuracy"] > 0.3, colour
