"""Evaluation, prediction files, Grad-CAM and calibration (issue 3). Tiny random-weight models: fast."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fashion.cli import main
from fashion.contract import Preprocessing
from fashion.schema import MISSING, Attribute, LabelSchema
from training.calibrate import (
    calibrate_logits,
    fit_temperature,
    fit_temperatures,
    model_logits,
    softmax,
    threshold_for_precision,
)
from training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from training.data import build_schema, read_catalogue
from training.evaluate import flag_rates, metrics_document, plot_confusion
from training.explain import GradCAM, heatmap_on_photo, heatmap_peak, peak_on_product, product_mask
from training.metrics import (
    attribute_metrics,
    confusion_top_classes,
    evaluate_arrays,
    expected_calibration_error,
    overall_score,
    per_class_report,
)
from training.model import FashionNet, build_model

METRIC_KEYS = {"accuracy", "top3_accuracy", "macro_f1", "micro_f1", "harmonic_f1", "ece", "support"}
DOC_KEYS = METRIC_KEYS | {"uncertain_rate", "conflict_rate", "silent_error_rate",  # what a client sees
                          "unseen_support", "unseen_uncertain_rate",  # null unless --subset drift
                          "known_type_accuracy", "known_type_support",
                          "new_type_accuracy", "new_type_support"}


def tiny_checkpoint(data, path, *, image_size=32, thresholds=None, split="train"):
    cat = read_catalogue(data, split=split)
    schema = build_schema(cat, cat.samples)
    torch.manual_seed(0)
    model = build_model("test_efficientnet", schema, Preprocessing(image_size=image_size)).eval()
    config = {"data": str(data), "out": str(path.parent), "backbone": "test_efficientnet",
              "image_size": image_size, "min_class_count": 0}
    save_checkpoint(path, Checkpoint(model, "test_efficientnet", config, thresholds=thresholds or {}))
    return path


def one_hot_probs(pred, classes, confidence):
    p = np.full((len(pred), classes), (1 - confidence) / (classes - 1))
    p[np.arange(len(pred)), pred] = confidence
    return p


# --- metric definitions -----------------------------------------------------------------------------


def test_metrics_match_a_hand_computed_case_with_an_unpredicted_class_and_masked_labels():
    labels = np.array([0, 0, 1, 1, 2, MISSING, MISSING])
    pred = np.array([0, 1, 1, 1, 1, 2, 0])  # class 2 never predicted where labelled; masked rows ignored
    m = attribute_metrics(labels, one_hot_probs(pred, 3, 0.8))
    # class F1: 0 → P 1, R .5 → 2/3; 1 → P .5, R 1 → 2/3; 2 → 0. macro 4/9, micro = accuracy 3/5.
    macro, micro = 4 / 9, 3 / 5
    expected = {"accuracy": 0.6, "top3_accuracy": 1.0, "macro_f1": macro, "micro_f1": micro,
                "harmonic_f1": 2 * macro * micro / (macro + micro), "ece": 0.2, "support": 5}
    assert set(m) == METRIC_KEYS
    np.testing.assert_allclose([m[k] for k in sorted(expected)], [expected[k] for k in sorted(expected)],
                               rtol=1e-9, atol=1e-9)
    rows = per_class_report(labels, pred, ["a", "b", "c"])
    np.testing.assert_allclose([[r["precision"], r["recall"], r["f1"]] for r in rows],
                               [[1, 0.5, 2 / 3], [0.5, 1, 2 / 3], [0, 0, 0]], atol=1e-9)
    assert [r["support"] for r in rows] == [2, 2, 1]


def test_metrics_json_has_the_issue_shape_and_null_for_an_attribute_without_labels():
    schema = LabelSchema((Attribute("colour", ("r", "g", "b")), Attribute("kind", ("x", "y"))))
    labels = np.array([[0, MISSING], [1, MISSING], [2, MISSING]])
    probs = {"colour": one_hot_probs(np.array([0, 1, 1]), 3, 0.9),
             "kind": one_hot_probs(np.zeros(3, int), 2, 0.9)}
    score, per = evaluate_arrays(schema, labels, probs)
    doc = json.loads(json.dumps(metrics_document(score, per)))  # valid JSON: no NaN
    assert set(doc) == {"score", "attributes"}
    assert set(doc["attributes"]) == {"colour", "kind"}
    assert all(set(v) == DOC_KEYS for v in doc["attributes"].values())
    assert doc["attributes"]["kind"]["support"] == 0 and doc["attributes"]["kind"]["accuracy"] is None
    np.testing.assert_allclose(doc["attributes"]["colour"]["accuracy"], 2 / 3)
    np.testing.assert_allclose(doc["score"], doc["attributes"]["colour"]["harmonic_f1"])  # kind left out


def test_meesho_score_averages_heads_within_a_category_then_over_categories():
    schema = LabelSchema((
        Attribute("A/color", ("r", "g"), label="color", category="A"),
        Attribute("A/neck", ("round", "v"), label="neck", category="A"),
        Attribute("B/color", ("r", "g"), label="color", category="B"),
        Attribute("B/border", ("zari", "solid"), label="border", category="B"),
    ), category_column="Category")
    per = {"A/color": {"harmonic_f1": 1.0, "support": 5}, "A/neck": {"harmonic_f1": 0.5, "support": 3},
           "B/color": {"harmonic_f1": 0.0, "support": 4},
           "B/border": {"harmonic_f1": 0.9, "support": 0}}  # no labels: left out of B's mean
    np.testing.assert_allclose(overall_score(schema, per), (0.75 + 0.0) / 2)
    flat = LabelSchema((Attribute("x", ("a", "b")), Attribute("y", ("a", "b"))))
    np.testing.assert_allclose(overall_score(flat, {"x": {"harmonic_f1": 0.2, "support": 1},
                                                    "y": {"harmonic_f1": 0.6, "support": 1}}), 0.4)


def test_confusion_matrix_with_80_classes_keeps_the_top_classes_and_pools_the_rest(tmp_path):
    rng = np.random.default_rng(0)
    classes = [f"class number {k}" for k in range(80)]
    labels = np.minimum(rng.geometric(0.08, 3000) - 1, 79)
    pred = np.where(rng.random(3000) < 0.6, labels, rng.integers(0, 80, 3000))
    labels[:10] = MISSING
    matrix, names = confusion_top_classes(labels, pred, classes, top_n=20)
    assert matrix.shape == (21, 21) and names[-1] == "rest" and names[0] == "class number 0"
    assert matrix.sum() == 2990
    path = tmp_path / "cm.png"
    plot_confusion(path, labels, pred, classes, "articleType", top_n=20)
    with Image.open(path) as im:
        assert im.format == "PNG" and 600 <= im.width <= 2000 and 600 <= im.height <= 2000


# --- evaluate / predict end to end ------------------------------------------------------------------


def test_evaluate_writes_metrics_reports_confusion_pngs_and_a_linked_report(kaggle_dir, tmp_path, capsys):
    ckpt = tiny_checkpoint(kaggle_dir, tmp_path / "best.pt")
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(kaggle_dir), "--out", str(out)]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert set(doc) == {"score", "attributes"}
    assert doc["attributes"]["baseColour"]["support"] == 25
    assert doc["attributes"]["usage"]["support"] == 24  # the NA cell is excluded
    assert all(set(v) == DOC_KEYS for v in doc["attributes"].values())
    report = (out / "report.md").read_text()
    for name in ("baseColour", "usage"):
        assert (out / "reports" / f"{name}.csv").is_file() and (out / "confusion" / f"{name}.png").is_file()
        assert f"(reports/{name}.csv)" in report and f"(confusion/{name}.png)" in report
    with (out / "reports" / "baseColour.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["class"] for r in rows} == {"Red", "Blue", "Green"}
    assert sum(int(r["support"]) for r in rows) == 25
    assert "harmonic F1" in capsys.readouterr().out


def test_evaluate_on_a_meesho_layout_scores_by_category(meesho_dir, tmp_path):
    ckpt = tiny_checkpoint(meesho_dir, tmp_path / "best.pt")
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(meesho_dir), "--out", str(out)]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    a = doc["attributes"]
    assert a["Men Tshirts/neck"]["support"] == 12  # 16 T-shirts, 4 with neck "dummy" (not applicable)
    assert a["Sarees/color"]["support"] == 16  # other categories' images are not applicable
    tshirts = np.mean([a["Men Tshirts/color"]["harmonic_f1"], a["Men Tshirts/neck"]["harmonic_f1"]])
    sarees = np.mean([a[f"Sarees/{n}"]["harmonic_f1"] for n in ("blouse_pattern", "color", "border")])
    np.testing.assert_allclose(doc["score"], (tshirts + sarees) / 2, rtol=1e-9)


def test_predict_writes_the_meesho_submission_format_for_an_unlabelled_test_set(meesho_dir, tmp_path):
    ckpt = tiny_checkpoint(meesho_dir, tmp_path / "best.pt")
    (meesho_dir / "test_images").mkdir()
    with (meesho_dir / "test.csv").open("w") as f:  # the competition's test.csv: no attribute columns
        f.write("id,Category\n")
        for i, category in [(100, "Men Tshirts"), (101, "Sarees"), (102, "Sarees")]:
            f.write(f"{i},{category}\n")
            source = meesho_dir / "train_images" / f"{i - 100:06d}.jpg"
            shutil.copy(source, meesho_dir / "test_images" / f"{i:06d}.jpg")
    out = tmp_path / "submission.csv"
    assert main(["predict", "--checkpoint", str(ckpt), "--data", str(meesho_dir), "--out", str(out)]) == 0
    with out.open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "Category", "len"] + [f"attr_{k}" for k in range(1, 11)]
    by_id = {r[0]: r for r in rows[1:]}
    assert set(by_id) == {"100", "101", "102"}
    schema = load_checkpoint(ckpt).schema
    tshirt = by_id["100"]
    assert tshirt[1:3] == ["Men Tshirts", "2"]
    assert tshirt[3] in schema["Men Tshirts/color"].classes
    assert tshirt[4] in schema["Men Tshirts/neck"].classes
    assert tshirt[5:] == ["dummy"] * 8
    saree = by_id["101"]
    assert saree[2] == "3" and saree[3] in schema["Sarees/blouse_pattern"].classes
    assert saree[4] in schema["Sarees/color"].classes and saree[6:] == ["dummy"] * 7


def test_predict_on_kaggle_reports_confidence_and_abstains_below_the_threshold(kaggle_dir, tmp_path):
    ckpt = tiny_checkpoint(kaggle_dir, tmp_path / "best.pt", thresholds={"baseColour": 1.0, "usage": 0.0})
    # A test set without labels: styles.csv with ids only.
    (kaggle_dir / "styles.csv").write_text("id\n1\n2\n3\n")
    out = tmp_path / "pred.csv"
    assert main(["predict", "--checkpoint", str(ckpt), "--data", str(kaggle_dir), "--out", str(out)]) == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["1", "2", "3"]
    schema = load_checkpoint(ckpt).schema
    for r in rows:
        assert r["baseColour"] == "" and r["baseColour_uncertain"] == "1"  # threshold 1.0: always uncertain
        assert r["usage"] in schema["usage"].classes and r["usage_uncertain"] == "0"
        assert r["gender"] in schema["gender"].classes and r["gender_uncertain"] == "0"  # no threshold
        assert 0.0 < float(r["articleType_confidence"]) <= 1.0


def test_predict_reads_a_plain_folder_of_images(kaggle_dir, tmp_path):
    ckpt = tiny_checkpoint(kaggle_dir, tmp_path / "best.pt")
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("1.jpg", "2.jpg"):
        shutil.copy(kaggle_dir / "images" / name, folder / name)
    out = tmp_path / "pred.csv"
    assert main(["predict", "--checkpoint", str(ckpt), "--data", str(folder), "--out", str(out)]) == 0
    with out.open() as f:
        assert [r["id"] for r in csv.DictReader(f)] == ["1", "2"]


# --- Grad-CAM ---------------------------------------------------------------------------------------


COLOUR_SCHEMA = LabelSchema((Attribute("colour", ("red", "blue", "green")),))


def product_at(x0, size=64):
    image = np.full((size, size, 3), 245, np.uint8)
    image[20:44, x0 : x0 + 20] = (220, 30, 30)
    return image


def tiny_swin():
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=64, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1),
                           num_heads=(1, 2), num_classes=0)


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_vit", "swin"])
def test_gradcam_maps_have_the_input_size_and_differ_when_the_product_moves(backbone):
    torch.manual_seed(0)
    pre = Preprocessing(image_size=64)
    model = FashionNet(tiny_swin(), COLOUR_SCHEMA, pre) if backbone == "swin" else build_model(
        backbone, COLOUR_SCHEMA, pre)
    images = torch.from_numpy(np.stack([product_at(4), product_at(40)]))
    maps, chosen = GradCAM(model.eval())(images, "colour")
    assert maps.shape == (2, 64, 64) and len(chosen) == 2
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert np.abs(maps[0] - maps[1]).mean() > 1e-3
    assert not any(p.grad is not None for p in model.parameters())  # no training side effects


def test_heatmap_is_mapped_back_onto_the_photo_through_the_letterbox():
    pre = Preprocessing(image_size=32, resize_mode="letterbox")
    heat = np.zeros((32, 32), np.float32)
    heat[8:24, 0:4] = 1.0  # left edge of the content of a 64×32 (w×h) photo letterboxed to 32×16
    on_photo = heatmap_on_photo(heat, (64, 32), pre)
    assert on_photo.shape == (32, 64)
    assert on_photo[:, :4].mean() > 0.5 and on_photo[:, 32:].max() < 0.05


def test_explain_writes_one_overlay_per_image_and_attribute_at_the_photo_size(kaggle_dir, tmp_path, capsys):
    ckpt = tiny_checkpoint(kaggle_dir, tmp_path / "best.pt", image_size=64)
    images = [str(kaggle_dir / "images" / "1.jpg"), str(kaggle_dir / "images" / "2.jpg")]
    out = tmp_path / "cam"
    args = ["explain", "--checkpoint", str(ckpt), "--out", str(out), "--attribute", "baseColour",
            "--attribute", "articleType", *images]
    assert main(args) == 0
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == ["1__articleType.png", "1__baseColour.png", "2__articleType.png", "2__baseColour.png"]
    with Image.open(out / "1__baseColour.png") as im, Image.open(images[0]) as photo:
        assert im.size == photo.size
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heatmaps"] == 4 and len(summary["maps"]) == 4
    assert set(summary["attributes"]) == {"baseColour", "articleType"}
    printed = capsys.readouterr().out
    assert "baseColour" in printed and f"peak on product: {summary['peak_on_product']}/4 heatmaps" in printed


def upsampled(cell, grid=3, size=96):
    coarse = torch.zeros(1, 1, grid, grid)
    coarse[0, 0, cell[0], cell[1]] = 1.0
    heat = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return heat[0, 0].numpy()


def test_heatmap_peak_is_the_centre_of_the_strongest_cell_not_the_edge_of_its_plateau():
    heat = upsampled((0, 0))  # a 3 × 3 map whose top-left cell is the strongest: flat from (15, 15) to (0, 0)
    assert np.unravel_index(int(np.argmax(heat)), heat.shape) == (0, 0)  # argmax: the photo's corner
    x, y = heatmap_peak(heat)
    assert 13 <= x <= 17 and 13 <= y <= 17  # the cell's centre is at 15.5
    x, y = heatmap_peak(upsampled((2, 1)))  # bottom-middle cell: centre (47.5, 79.5)
    assert 46 <= x <= 49 and 78 <= y <= 82
    x, y = heatmap_peak(upsampled((1, 1)))
    assert 46 <= x <= 49 and 46 <= y <= 49
    assert heatmap_peak(np.zeros((8, 8), np.float32)) is None  # no positive evidence anywhere: no peak


def outlined_white_product(width=96, height=64):
    """A white product with a dark outline on a slightly darker white background, at x 8-47, y 12-51."""
    photo = np.full((height, width, 3), 250, np.uint8)
    photo[12:52, 8:48] = 246  # as white as the background: only the outline stands out
    photo[12:52, 8:10] = photo[12:52, 46:48] = photo[12:14, 8:48] = photo[50:52, 8:48] = 60
    return Image.fromarray(photo)


def blob(shape, x, y, sigma=3.0):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)).astype(np.float32)


def test_peak_on_product_is_true_inside_the_silhouette_and_false_on_the_background():
    mask = product_mask(outlined_white_product())
    assert mask.shape == (64, 96)
    assert mask[30, 28] and mask[13, 20]  # inside a white product (enclosed by its outline) and on it
    assert not mask[30, 70] and not mask[2, 2]
    assert peak_on_product(blob(mask.shape, 28, 30), mask) == ((28, 30), True)
    assert peak_on_product(blob(mask.shape, 70, 30), mask) == ((70, 30), False)
    assert peak_on_product(np.zeros(mask.shape, np.float32), mask) == (None, False)


def test_explain_counts_heatmaps_that_peak_on_the_product_in_its_summary(kaggle_dir, tmp_path, capsys,
                                                                         monkeypatch):
    """Maps made by hand (Grad-CAM replaced): one peaks on the product, one on the background, one is
    flat; the photos are 96 × 64, so the peak goes back through the letterbox of the 64 px input."""
    ckpt = tiny_checkpoint(kaggle_dir, tmp_path / "best.pt", image_size=64)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("on", "off", "flat"):
        outlined_white_product().save(photos / f"{name}.png")
    # Photo (x, y) → input: scale 64/96 = 2/3, content 64 × 43 placed 10 rows down.
    peaks = {"on": (28, 30), "off": (70, 30)}

    def fake_cam(self, images, attribute, class_index=None):
        name = current.pop(0)
        if name == "flat":
            return np.zeros((1, 64, 64), np.float32), [0]
        x, y = peaks[name]
        return blob((64, 64), x * 2 / 3, y * 2 / 3 + 10)[None], [0]

    current = ["on", "off", "flat"]
    monkeypatch.setattr("training.explain.GradCAM.__call__", fake_cam)
    out = tmp_path / "cam"
    args = ["explain", "--checkpoint", str(ckpt), "--out", str(out), "--attribute", "baseColour",
            *(str(photos / f"{n}.png") for n in ("on", "off", "flat"))]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["peak_on_product"], summary["heatmaps"], summary["flat"]) == (1, 3, 1)
    assert summary["attributes"] == {"baseColour": {"peak_on_product": 1, "heatmaps": 3, "share": 0.3333}}
    by_image = {m["image"].rsplit("/", 1)[-1]: m for m in summary["maps"]}
    assert by_image["on.png"]["peak_on_product"] and not by_image["off.png"]["peak_on_product"]
    assert by_image["flat.png"]["peak_xy"] is None
    x, y = by_image["on.png"]["peak_xy"]
    assert abs(x - 28) <= 2 and abs(y - 30) <= 2  # back on the photo, through the letterbox
    assert "peak on product: 1/3 heatmaps (33 %)" in capsys.readouterr().out


# --- calibration ------------------------------------------------------------------------------------


def overconfident_case(n=3000, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes))
    logits[np.arange(n), y] += 1.5  # about 70 % accurate ...
    return 6.0 * logits, y  # ... and far too sure of itself


def nll(p, y):
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


def test_temperature_scaling_lowers_nll_and_ece_of_an_overconfident_head():
    logits, y = overconfident_case()
    t = fit_temperature(torch.from_numpy(logits), torch.from_numpy(y))
    assert 2.0 < t < 8.0  # the logits were inflated 6×; the best fit undoes most of it
    before, after = softmax(logits), softmax(logits, t)
    assert nll(after, y) < 0.8 * nll(before, y)
    ece = [expected_calibration_error(p.max(1), p.argmax(1) == y) for p in (before, after)]
    assert ece[1] < 0.03 < 0.2 < ece[0]
    np.testing.assert_array_equal(before.argmax(1), after.argmax(1))  # predictions unchanged


def test_calibration_is_stored_in_the_checkpoint_and_used_by_probabilities(tmp_path):
    torch.manual_seed(0)
    model = build_model("test_efficientnet", COLOUR_SCHEMA, Preprocessing(image_size=32)).eval()
    with torch.no_grad():
        model.heads["colour"][1].weight.mul_(50.0)  # an over-confident head
    images = np.random.default_rng(0).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
    labels = np.random.default_rng(1).integers(0, 3, (48, 1))
    temps = fit_temperatures(model, images, labels)
    assert temps["colour"] > 1.0
    ckpt = Checkpoint(model, "test_efficientnet", {})
    report = calibrate_logits(ckpt, model_logits(model, images), labels, target_precision=0.9)
    assert report[0].nll_after < report[0].nll_before and report[0].ece_after <= report[0].ece_before
    save_checkpoint(tmp_path / "cal.pt", ckpt)
    loaded = load_checkpoint(tmp_path / "cal.pt")
    np.testing.assert_allclose(loaded.temperatures()["colour"], temps["colour"], rtol=1e-5)
    assert set(loaded.thresholds) == {"colour"}
    x = torch.from_numpy(images[:4])
    with torch.no_grad():
        expected = torch.softmax(loaded.model(x)["colour"] / temps["colour"], dim=1)
        torch.testing.assert_close(loaded.model.probabilities(x)["colour"], expected)


def test_abstain_threshold_is_the_lowest_confidence_that_reaches_the_target_precision():
    logits, y = overconfident_case(seed=1)
    probs = softmax(logits, 6.0)
    threshold, coverage = threshold_for_precision(probs, y, 0.9)
    conf, correct = probs.max(1), probs.argmax(1) == y
    kept = conf >= threshold
    assert correct[kept].mean() >= 0.9
    np.testing.assert_allclose(coverage, kept.mean())
    assert 0.05 < coverage < 0.95
    lower = conf[conf < threshold].max()  # one step lower already misses the target
    assert correct[conf >= lower].mean() < 0.9
    masked = y.copy()
    masked[:100] = MISSING
    assert threshold_for_precision(probs, masked, 0.9)[0] > 0
    always_wrong = one_hot_probs(np.zeros(10, int), 2, 0.9)
    assert threshold_for_precision(always_wrong, np.ones(10, int), 0.9) == (1.0, 0.0)
    # Every validation prediction is precise enough: nothing says to abstain, whatever the confidences.
    always_right = one_hot_probs(np.ones(10, int), 2, 0.98)
    assert threshold_for_precision(always_right, np.ones(10, int), 0.9) == (0.0, 1.0)


# --- with the trainer -------------------------------------------------------------------------------


def test_training_calibrates_best_pt_and_evaluate_on_its_validation_split_matches_the_trainer(
    kaggle_dir, tmp_path
):
    from training.config import TrainConfig
    from training.train import train

    cfg = TrainConfig(data=str(kaggle_dir), out=str(tmp_path / "run"), backbone="test_efficientnet",
                      image_size=32, epochs=1, batch_size=8, workers=0, min_class_count=0,
                      attributes=("baseColour", "articleType"))
    result = train(cfg)
    best = tmp_path / "run" / "best.pt"
    assert set(load_checkpoint(best).thresholds) == {"baseColour", "articleType"}
    report = json.loads((tmp_path / "run" / "best.calibration.json").read_text())
    assert {h["attribute"] for h in report["heads"]} == {"baseColour", "articleType"}

    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(best), "--subset", "val", "--out", str(out)]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    for name, m in result.val_metrics.items():  # same images, same model: the same numbers
        np.testing.assert_allclose(doc["attributes"][name]["accuracy"], m["accuracy"], atol=1e-9)
        assert doc["attributes"][name]["support"] == m["support"]
    assert "## By product type" not in (out / "report.md").read_text()  # no new types in a random split

    calibrated = tmp_path / "cal.pt"
    args = ["calibrate", "--checkpoint", str(best), "--out", str(calibrated), "--target-precision", "0.8"]
    assert main(args) == 0
    np.testing.assert_allclose(list(load_checkpoint(calibrated).temperatures().values()),
                               list(load_checkpoint(best).temperatures().values()), rtol=1e-4)


def test_evaluate_drift_scores_only_the_later_period_and_only_classes_the_model_knows(tmp_path, capsys):
    from training.synth import generate

    data = tmp_path / "synth"
    generate(data, 60, seed=3)
    with (data / "styles.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):  # 40 photos of an earlier period, then 20 of a later one
        row["year"] = "2011" if i < 40 else "2013"
        if i >= 50:  # 10 of the later ones are of a product type the earlier period never had
            row["articleType"] = "Sarees"
    with (data / "styles.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--backbone", "test_efficientnet",
                 "--image-size", "32", "--epochs", "1", "--split-by", "year", "--val-from", "2012",
                 "--novelty-quantile", "0", "--workers", "0", "--always-uncertain", "articleType"]) == 0
    out = tmp_path / "eval"
    checkpoint = str(run / "best.pt")
    assert main(["evaluate", "--checkpoint", checkpoint, "--subset", "drift", "--out", str(out)]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    # The 20 photos of the later period (never trained or validated on), each scored only on known classes.
    assert "on 20 images" in capsys.readouterr().out
    assert max(v["support"] for v in doc["attributes"].values()) <= 20
    # The unseen type's photos: counted apart, and flagged (articleType is served always uncertain here).
    from training.data import read_catalogue

    schema = load_checkpoint(checkpoint).schema
    later = [s for s in read_catalogue(data).samples if s.extra.get("year") == "2013"]
    for a in schema.attributes:
        unseen = sum(s.labels.get(a.name) not in (None, *a.classes) for s in later)
        assert doc["attributes"][a.name]["unseen_support"] == unseen, a.name
    article = doc["attributes"]["articleType"]
    assert article["unseen_support"] >= 10 and article["unseen_uncertain_rate"] == 1.0
    assert article["support"] + article["unseen_support"] == 20
    # Every other attribute's score splits into the photos of trained types and of the type never seen.
    classes = {a.name: a.classes for a in schema.attributes}
    new = [s for s in later if s.labels.get("articleType") not in (None, *classes["articleType"])]
    assert sum(s.labels["articleType"] == "Sarees" for s in new) == 10
    gender_classes = classes["gender"]
    gender = doc["attributes"]["gender"]
    assert gender["new_type_support"] == sum(s.labels.get("gender") in gender_classes for s in new) > 0
    assert gender["known_type_support"] + gender["new_type_support"] == gender["support"]
    assert (gender["known_type_accuracy"] * gender["known_type_support"]
            + gender["new_type_accuracy"] * gender["new_type_support"]) == pytest.approx(
        gender["accuracy"] * gender["support"])
    assert article["new_type_support"] == 0 and article["known_type_support"] == article["support"]
    assert "## By product type" in (out / "report.md").read_text()

    # `fashion novelty` on the same run puts the later period's photos into its candidate table, known types
    # and the type the run never saw apart, so that the quantile is chosen against the drift too.
    gated = tmp_path / "gated" / "best.pt"
    gated.parent.mkdir()
    assert main(["novelty", "--checkpoint", checkpoint, "--out", str(gated), "--quantile", "0.9"]) == 0
    report = json.loads((gated.parent / "novelty.json").read_text())
    assert report["parts"]["drift unseen"] == article["unseen_support"]
    assert report["parts"]["drift known"] == article["support"]
    for row in report["candidates"]:
        for part in ("seen", "drift known", "drift unseen"):
            share = row[f"articleType {part}"]
            assert 0.0 <= share <= 1.0 and share * report["parts"][part] == pytest.approx(
                round(share * report["parts"][part])
            )


def test_a_silent_error_is_a_wrong_answer_flagged_neither_uncertain_nor_conflict():
    from types import SimpleNamespace

    from training.predict import Predictions

    schema = LabelSchema((Attribute("colour", ("red", "blue")),))
    # Six photos, all truly red. Answers: right; wrong but unsure; wrong with a conflict; wrong and silent;
    # wrong and silent; unscored (missing label).
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.05, 0.95], [0.1, 0.9], [0.2, 0.8], [0.1, 0.9]])
    conflict = np.array([[0.1], [0.1], [0.9], [0.2], [0.1], [0.9]])
    labels = np.array([[0], [0], [0], [0], [0], [MISSING]])
    ckpt = SimpleNamespace(schema=schema, thresholds={"colour": 0.7}, conflict_thresholds={"colour": 0.5})
    per: dict[str, dict[str, float]] = {"colour": {}}
    flag_rates(ckpt, labels, Predictions({"colour": probs}, np.ones(6, dtype=bool), conflict), per)
    assert per["colour"]["silent_error_rate"] == pytest.approx(2 / 5)
    assert per["colour"]["uncertain_rate"] == pytest.approx(1 / 5)
    assert per["colour"]["conflict_rate"] == pytest.approx(1 / 5)
    per = {"colour": {}}  # without titles nothing is flagged conflict: the wrong, confident answer is silent
    flag_rates(ckpt, labels, Predictions({"colour": probs}, np.ones(6, dtype=bool)), per)
    assert per["colour"]["silent_error_rate"] == pytest.approx(3 / 5) and "conflict_rate" not in per["colour"]
