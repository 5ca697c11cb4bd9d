"""The novelty gate has no cliff, the analysis measures what the model serves, and heads have roles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fashion.contract import Preprocessing
from fashion.schema import Attribute, LabelSchema, Role
from training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from training.model import build_model
from training.novelty import (
    GATE,
    NoveltyGate,
    fit_novelty,
    floor_thresholds,
    gate_weight,
    ramp_scale,
    reference_head,
)
from training.unseen import model_outputs, served

SCHEMA = LabelSchema(
    (Attribute("articleType", ("a", "b", "c")), Attribute("baseColour", ("red", "blue", "green", "black")))
)
SIZE = 32


def photos(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8)


def gated_model(seed: int = 0):
    """A tiny model with a gate fitted on 40 random photos; (model, validation photos, their distances)."""
    torch.manual_seed(seed)
    model = build_model("test_efficientnet", SCHEMA, Preprocessing(image_size=SIZE)).eval()
    train, val = photos(40, seed), photos(24, seed + 1)
    labels = np.stack([np.arange(40) % 3, np.arange(40) % 4], axis=1)
    fit = fit_novelty(SCHEMA, model_outputs(model, train).pooled, labels)
    d_val = fit.distances(model_outputs(model, val).pooled)
    model.novelty = fit.gate(float(np.quantile(d_val, 0.5)), ramp_scale(d_val))
    return model, val, d_val


# --- no cliff -------------------------------------------------------------------------------------------


def test_one_ulp_of_distance_flips_a_step_gate_but_barely_moves_the_ramp():
    t = torch.tensor(150.0)
    at, above = torch.tensor([150.0]), torch.nextafter(torch.tensor([150.0]), torch.tensor([1e9]))
    assert float(gate_weight(above, t, 0.0) - gate_weight(at, t, 0.0)) == pytest.approx(GATE)  # the cliff
    scale = 10.0
    moved = float(gate_weight(above, t, scale) - gate_weight(at, t, scale))
    assert 0.0 <= moved <= GATE * float(above - at) / scale
    # 0 up to threshold - scale, the full gate from the threshold on, continuous in between.
    d = torch.tensor([100.0, 140.0, 145.0, 150.0, 1e6])
    torch.testing.assert_close(gate_weight(d, t, scale), torch.tensor([0.0, 0.0, GATE / 2, GATE, GATE]))


def test_a_photo_exactly_at_the_threshold_gets_the_same_probabilities_from_pytorch_and_onnx_runtime(tmp_path):
    """The threshold at a photo's own PyTorch distance, and one float step either side of it (a step gate
    fails this: ONNX Runtime's distance of that photo lands on the other side of one of them)."""
    import onnxruntime as ort

    from export.onnx_export import export_onnx, run_torch
    from export.parity import FP32_ATOL

    model, val, _ = gated_model()
    assert model.novelty is not None
    with torch.no_grad():
        distances = model.novelty.distance(model.embed(torch.from_numpy(val))[0])
    k = int(torch.argsort(distances)[len(distances) // 2])
    at = np.float32(distances[k])
    for threshold in (np.nextafter(at, np.float32(0)), at, np.nextafter(at, np.float32(np.inf))):
        model.novelty.threshold.fill_(float(threshold))
        with torch.no_grad():
            gates = model.novelty(model.embed(torch.from_numpy(val))[0])[:, 0]
        assert float(gates.max()) > 0.0 and float(gates.min()) == 0.0  # photos on both sides of it
        path = export_onnx(model, tmp_path / "model.onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        onnx_probs = session.run(None, {"image": val})
        for name, want, got in zip(SCHEMA.names, run_torch(model, val), onnx_probs, strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=FP32_ATOL, err_msg=f"{name} at {threshold}")


def test_photos_below_the_ramp_are_served_as_without_the_gate_and_past_the_threshold_always_flagged():
    model, val, _ = gated_model()
    gate = model.novelty
    assert gate is not None and gate.scale > 0
    thresholds: dict[str, float] = {}
    floor_thresholds(SCHEMA, thresholds, gate.gated)
    with torch.no_grad():
        pooled, logits = model.pooled_and_logits(torch.from_numpy(val))
        d = gate.distance(pooled)
        model.novelty = None
        plain = model.served_probabilities(logits, None)["articleType"]
        model.novelty = gate
        gate.threshold.fill_(float(d.max()) + gate.scale)  # every photo at or below the foot of the ramp
        torch.testing.assert_close(model.served_probabilities(logits, pooled)["articleType"], plain)
        gate.threshold.fill_(float(d.min()))  # every photo at or past the threshold
        past = model.served_probabilities(logits, pooled)["articleType"]
    assert torch.all(past.max(1).values < thresholds["articleType"])
    assert torch.equal(past.argmax(1), plain.argmax(1))  # the order is kept


def test_a_gate_saved_before_the_ramp_stays_a_step_and_a_new_one_keeps_its_scale(tmp_path):
    model, _, _ = gated_model()
    assert model.novelty is not None
    description = model.novelty.describe()
    assert description["scale"] == model.novelty.scale > 0
    save_checkpoint(tmp_path / "m.pt", Checkpoint(model, "test_efficientnet", {}))
    assert load_checkpoint(tmp_path / "m.pt").model.novelty.scale == pytest.approx(model.novelty.scale)
    old = {k: v for k, v in description.items() if k != "scale"}
    assert NoveltyGate.from_description(old).scale == 0.0


# --- one function from logits to what is served -----------------------------------------------------------


def test_the_novelty_analysis_measures_what_the_model_serves():
    model, val, _ = gated_model()
    out = model_outputs(model, val)
    with torch.no_grad():
        direct = model.probabilities(torch.from_numpy(val))
    for name, p in served(model, out).items():
        np.testing.assert_allclose(p, direct[name].numpy(), rtol=0, atol=1e-6)


def test_the_distance_of_the_analysis_equals_the_gate_in_the_model():
    model, val, d_val = gated_model()
    assert model.novelty is not None
    with torch.no_grad():
        d_model = model.novelty.distance(model.embed(torch.from_numpy(val))[0]).numpy()
    np.testing.assert_allclose(d_model, d_val, rtol=1e-4)


# --- roles ---------------------------------------------------------------------------------------------


def test_a_schema_saved_without_roles_infers_them_as_the_code_guessed_before():
    old = {
        "attributes": [
            {"name": "gender", "classes": ["m", "w"]},
            {"name": "colour", "classes": ["r", "g", "b", "k", "w"]},
            {"name": "articleType", "classes": ["a", "b", "c"]},
        ]
    }
    schema = LabelSchema.from_dict(old)
    assert [a.role for a in schema.attributes] == [Role.OTHER, Role.COLOUR, Role.PRODUCT_TYPE]
    assert LabelSchema.from_dict(schema.to_dict()) == schema
    assert schema.to_dict()["attributes"][1]["role"] == "colour"


def test_a_declared_product_type_is_gated_even_when_another_head_has_more_classes():
    schema = LabelSchema(
        (
            Attribute("usage", tuple("abcdefgh")),
            Attribute("articleType", ("a", "b", "c"), role=Role.PRODUCT_TYPE),
            Attribute("shade", ("x", "y", "z", "w"), role=Role.COLOUR),
        )
    )
    assert reference_head(schema, None) == (["articleType"], "articleType")
    assert [a.role for a in schema.attributes] == [Role.OTHER, Role.PRODUCT_TYPE, Role.COLOUR]
    with pytest.raises(ValueError, match="role must be one of"):
        Attribute("x", ("a",), role="size")  # type: ignore[arg-type]


# --- unit-length features -------------------------------------------------------------------------------


def test_a_gate_on_unit_features_ignores_the_overall_scale_of_the_activations_and_a_raw_one_does_not():
    """The later period of a catalogue moves every photo's activations (exposure, background): the
    normalised distance measures only their direction."""
    rng = np.random.default_rng(0)
    train = rng.normal(size=(60, 16)) + np.repeat(np.eye(3, 16) * 4, 20, axis=0)
    labels = np.stack([np.repeat(np.arange(3), 20), np.zeros(60, int)], axis=1)
    photo = rng.normal(size=(5, 16))
    unit = fit_novelty(SCHEMA, train, labels)
    raw = fit_novelty(SCHEMA, train, labels, normalise=False)
    np.testing.assert_allclose(unit.distances(photo), unit.distances(3.0 * photo), rtol=1e-9)
    assert not np.allclose(raw.distances(photo), raw.distances(3.0 * photo))
    # The gate module of the model computes what the fit measured.
    gate = unit.gate(threshold=1.0, scale=0.5)
    with torch.no_grad():
        got = gate.distance(torch.from_numpy(photo.astype(np.float32))).numpy()
    np.testing.assert_allclose(got, unit.distances(photo), rtol=1e-4)


def test_a_gate_saved_before_unit_features_rebuilds_as_a_gate_on_raw_features():
    labels = np.stack([np.arange(12) % 3, np.zeros(12, int)], axis=1)
    gate = fit_novelty(SCHEMA, np.random.default_rng(1).normal(size=(12, 8)), labels).gate(1.0)
    described = gate.describe()
    assert described["normalise"] is True
    assert NoveltyGate.from_description(described).normalise is True
    old = {k: v for k, v in described.items() if k != "normalise"}  # a checkpoint of 2026-12-02
    assert NoveltyGate.from_description(old).normalise is False
