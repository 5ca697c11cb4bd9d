import json

import numpy as np
import pytest
import torch
import yaml

from fashion.contract import Preprocessing
from fashion.schema import MISSING, Attribute, LabelSchema
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import ConfigError, TrainConfig
from training.loss import masked_loss
from training.model import ModelError, build_model, create_backbone
from training.train import train

SCHEMA = LabelSchema((Attribute("colour", ("red", "blue")), Attribute("kind", ("a", "b", "c"))))


def test_missing_labels_contribute_nothing_to_the_loss():
    logits = {"colour": torch.randn(4, 2), "kind": torch.randn(4, 3)}
    full = torch.tensor([[0, 1], [1, 2], [0, 0], [1, 1]])
    masked = full.clone()
    masked[2:, 1] = MISSING
    changed = {"colour": logits["colour"], "kind": logits["kind"].clone()}
    changed["kind"][2:] += 100.0  # wildly different logits where the label is missing
    a = masked_loss(logits, masked, SCHEMA, [None, None], 0.0)
    b = masked_loss(changed, masked, SCHEMA, [None, None], 0.0)
    torch.testing.assert_close(a, b)
    assert not torch.isclose(a, masked_loss(logits, full, SCHEMA, [None, None], 0.0))


def test_a_head_with_no_label_in_the_batch_is_skipped_not_nan():
    logits = {"colour": torch.randn(2, 2), "kind": torch.randn(2, 3)}
    targets = torch.tensor([[0, MISSING], [1, MISSING]])
    assert torch.isfinite(masked_loss(logits, targets, SCHEMA, [None, None], 0.1))


def test_class_weights_scale_each_photos_loss_and_leave_label_smoothing_uniform():
    """A rare class's large weight makes its photos count more; it must not pull the smoothing mass of
    every other photo towards that class (``cross_entropy(weight=...)`` with smoothing does)."""
    logits = {"colour": torch.tensor([[4.0, -4.0], [4.0, -4.0], [-4.0, 4.0]]), "kind": torch.zeros(3, 3)}
    targets = torch.tensor([[0, MISSING], [0, MISSING], [1, MISSING]])
    weights = [torch.tensor([0.5, 50.0]), None]
    plain = torch.nn.functional.cross_entropy(
        logits["colour"], targets[:, 0], label_smoothing=0.1, reduction="none"
    )
    got = masked_loss(logits, targets, SCHEMA, weights, 0.1)
    torch.testing.assert_close(got, (plain * torch.tensor([0.5, 0.5, 50.0])).mean())
    # the frequent class's confident, right photos cost what they cost unweighted, times their weight
    right = {"colour": logits["colour"][:2], "kind": torch.zeros(2, 3)}
    frequent = masked_loss(right, torch.tensor([[0, MISSING]] * 2), SCHEMA, weights, 0.1)
    torch.testing.assert_close(frequent, 0.5 * plain[0])


def test_mixup_mixes_every_head_with_the_same_weight():
    logits = {"colour": torch.randn(2, 2), "kind": torch.randn(2, 3)}
    targets = torch.tensor([[0, 1], [1, 2]])
    perm = torch.tensor([1, 0])
    mixed = masked_loss(logits, targets, SCHEMA, [None, None], 0.0, (perm, 0.3))
    plain = masked_loss(logits, targets, SCHEMA, [None, None], 0.0)
    swapped = masked_loss(logits, targets[perm], SCHEMA, [None, None], 0.0)
    torch.testing.assert_close(mixed, 0.3 * plain + 0.7 * swapped)


def test_model_takes_uint8_nhwc_and_returns_one_probability_row_per_head():
    model = build_model("test_efficientnet", SCHEMA, Preprocessing(image_size=32)).eval()
    probs = model.probabilities(torch.randint(0, 255, (3, 32, 32, 3), dtype=torch.uint8))
    assert probs["colour"].shape == (3, 2) and probs["kind"].shape == (3, 3)
    torch.testing.assert_close(probs["kind"].sum(1), torch.ones(3))


def test_local_weights_file_is_loaded_into_the_backbone(tmp_path):
    source = create_backbone("test_efficientnet")
    with torch.no_grad():
        for p in source.parameters():
            p.fill_(0.125)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = create_backbone("test_efficientnet", weights=str(path))
    for name, p in loaded.named_parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.125), msg=name)


def offline_hub(monkeypatch, cache):
    # huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE at import time: patch its constants.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def test_pretrained_weights_load_through_the_hub_cache_offline(tmp_path, monkeypatch):
    """--pretrained uses timm's real download path; a warm Hugging Face cache stands in for the network."""
    import timm
    from safetensors.torch import save_file

    repo = timm.models.get_pretrained_cfg("test_efficientnet").hf_hub_id
    folder = tmp_path / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    state = timm.create_model("test_efficientnet").state_dict()
    save_file({k: torch.full_like(v, 0.25) for k, v in state.items()}, snapshot / "model.safetensors")
    offline_hub(monkeypatch, tmp_path)
    model = create_backbone("test_efficientnet", pretrained=True)
    first = next(model.parameters())
    torch.testing.assert_close(first, torch.full_like(first, 0.25))


def test_pretrained_without_network_or_cache_says_how_to_fix_it(tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path)
    with pytest.raises(ModelError, match="--weights"):
        create_backbone("test_efficientnet", pretrained=True)


def test_flags_override_the_yaml_file_which_overrides_defaults(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"data": "d", "out": "o", "lr": 0.5, "epochs": 3}))
    cfg = TrainConfig.from_sources(str(path), {"lr": 0.1, "epochs": None})
    default_batch = TrainConfig.__dataclass_fields__["batch_size"].default
    assert (cfg.lr, cfg.epochs, cfg.batch_size) == (0.1, 3, default_batch)
    with pytest.raises(ConfigError, match="unknown settings"):
        TrainConfig.from_sources(None, {"data": "d", "out": "o", "learning_rate": 1})
    with pytest.raises(ConfigError, match="backbone"):
        TrainConfig(data="d", out="o", backbone="resnet9000")


def tiny_config(data, out, **kw):
    base = dict(data=str(data), out=str(out), backbone="test_efficientnet", image_size=32, epochs=2,
                batch_size=8, workers=0, min_class_count=0, seed=0)
    return TrainConfig(**(base | kw))


def test_training_on_a_meesho_layout_writes_a_complete_run_directory(meesho_dir, tmp_path):
    result = train(tiny_config(meesho_dir, tmp_path / "run"))
    run = result.run_dir
    assert {"best.pt", "last.pt", "config.yaml", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert set(lines[-1]["val"]) == {"Men Tshirts/color", "Men Tshirts/neck", "Sarees/blouse_pattern",
                                     "Sarees/color", "Sarees/border"}
    assert {"accuracy", "macro_f1"} <= set(lines[-1]["val"]["Sarees/color"])
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt.schema.category_column == "Category"
    assert ckpt.preprocessing.image_size == 32
    assert ckpt.config["backbone"] == "test_efficientnet"


def test_resume_continues_from_the_next_epoch(kaggle_dir, tmp_path):
    train(tiny_config(kaggle_dir, tmp_path / "run", epochs=1))
    train(tiny_config(kaggle_dir, tmp_path / "run", epochs=2, resume=str(tmp_path / "run" / "last.pt")))
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    assert load_checkpoint(tmp_path / "run" / "last.pt").epoch == 2


def test_a_resumed_run_that_never_improves_reports_the_best_epochs_metrics(kaggle_dir, tmp_path, capsys):
    first = train(tiny_config(kaggle_dir, tmp_path / "run", epochs=1))
    assert first.val_metrics
    capsys.readouterr()
    last = tmp_path / "run" / "last.pt"
    # Resumed at its last epoch: no epoch runs, none improves; the best one's metrics are still reported.
    resumed = train(tiny_config(kaggle_dir, tmp_path / "run", epochs=1, resume=str(last)))
    assert resumed.epochs_run == 0 and (resumed.best_epoch, resumed.best_score) == (1, first.best_score)
    assert resumed.val_metrics == first.val_metrics
    table = capsys.readouterr().out.split("best validation score")[0]
    assert all(name in table for name in first.val_metrics)
    # A last.pt saved before best_metrics was kept: its own metrics are the best epoch's when it is the best.
    old = load_checkpoint(last)
    del old.extra["best_metrics"]
    save_checkpoint(tmp_path / "old-last.pt", old)
    again = train(tiny_config(kaggle_dir, tmp_path / "run", epochs=1, resume=str(tmp_path / "old-last.pt")))
    assert again.val_metrics == first.val_metrics


def test_trained_model_learns_a_visible_attribute(kaggle_dir, tmp_path):
    """Colour is all that differs between the fixture's images: a few epochs must beat chance clearly."""
    result = train(tiny_config(kaggle_dir, tmp_path / "run", epochs=12, lr=1e-2, attributes=("baseColour",),
                               val_fraction=0.3, patience=0))
    assert result.val_metrics["baseColour"]["accuracy"] > 0.6  # chance is 1/3
    np.testing.assert_equal(result.epochs_run, 12)


def test_split_by_year_trains_on_earlier_rows_and_validates_on_later_ones(tmp_path):
    from training.data import Sample, split_by_column

    samples = [
        Sample(id=str(i), image_path="x", labels={}, extra={"year": str(y)})
        for i, y in enumerate([2010, 2011, 2011, 2012, 2016, 2009])
    ] + [Sample(id="no-year", image_path="x", labels={})]
    train, val, missing = split_by_column(samples, "year", "2012")
    assert [s.extra["year"] for s in train] == ["2010", "2011", "2011", "2009"]
    assert [s.extra["year"] for s in val] == ["2012", "2016"]
    assert missing == 1


def test_split_by_a_value_outside_the_column_is_a_clear_error():
    from training.data import DatasetError, Sample, split_by_column

    samples = [Sample(id="1", image_path="x", labels={}, extra={"year": "2011"})]
    with pytest.raises(DatasetError, match="between the column's smallest and largest"):
        split_by_column(samples, "year", "2020")


def test_kaggle_reader_keeps_the_title_and_year_out_of_the_labels(tmp_path):
    from training.data import read_catalogue

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.jpg").write_bytes(b"x")
    (tmp_path / "styles.csv").write_text(
        "id,gender,year,productDisplayName\n1,Men,2012,Turtle Check Men Navy Blue Shirt\n"
    )
    sample = read_catalogue(tmp_path).samples[0]
    assert sample.labels == {"gender": "Men"}
    assert sample.title == "Turtle Check Men Navy Blue Shirt"
    assert sample.extra["year"] == "2012"
