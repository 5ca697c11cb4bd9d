"""The title as a second input, colour histograms, logit adjustment and the trunk cache (training side)."""

import numpy as np
import pytest
import torch

from fashion.contract import Preprocessing
from fashion.schema import Attribute, LabelSchema, is_uncertain
from fashion.text import TitleTokenizer
from training.checkpoint import load_checkpoint
from training.config import ConfigError, TrainConfig
from training.loss import Outputs, adjusted, log_priors, objective
from training.model import ProbabilityModel, build_model
from training.title import TitleEncoder
from training.train import train

SCHEMA = LabelSchema((Attribute("colour", ("red", "blue")), Attribute("kind", ("a", "b", "c"))))
PRE = Preprocessing(image_size=32)


def title_model(**kw):
    torch.manual_seed(0)
    tokenizer = TitleTokenizer(buckets=64, max_tokens=16)
    return build_model("test_efficientnet", SCHEMA, PRE, title=TitleEncoder(tokenizer, dim=8), **kw).eval()


def images(n=2, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))


def test_an_image_only_request_is_exactly_a_request_with_an_empty_title():
    model = title_model()
    x = images()
    ids = torch.from_numpy(model.title.tokenizer.batch(["", None]))
    a, b = model.probabilities(x), model.probabilities(x, ids)
    for name in a:
        assert torch.equal(a[name], b[name])
    titled = model.probabilities(x, torch.from_numpy(model.title.tokenizer.batch(["red shirt", "blue cap"])))
    assert not torch.allclose(a["kind"], titled["kind"])  # a title does change the answer


def colour_from_biases(model, photo: list[float], title: list[float]) -> None:
    """The colour head answers ``photo``'s logits whatever the photo, the title-only head ``title``'s."""
    with torch.no_grad():
        model.heads["colour"][1].weight.zero_()
        model.heads["colour"][1].bias.copy_(torch.tensor(photo))
        model.title_heads["colour"].weight.zero_()
        model.title_heads["colour"].bias.copy_(torch.tensor(title))


def test_the_conflict_score_is_high_when_photo_and_title_disagree_and_zero_without_a_title():
    model = title_model()
    colour_from_biases(model, [8.0, -8.0], [-8.0, 8.0])  # the photo says "red", the title "blue" / then "red"
    x = images()
    ids = torch.from_numpy(model.title.tokenizer.batch(["navy shirt", ""]))
    _, features = model.embed(x, ids)
    conflict = model.conflict(features)
    assert conflict.shape == (2, 2)
    assert conflict[0, 0] > 0.99 and conflict[1].abs().max() == 0  # the second row has no title
    with torch.no_grad():
        model.title_heads["colour"].bias.copy_(torch.tensor([8.0, -8.0]))
    assert model.conflict(features)[0, 0] < 0.01
    outputs = ProbabilityModel(model)(x, ids)
    assert len(outputs) == 3 and torch.equal(outputs[-1], model.conflict(features))


def test_the_title_only_heads_vote_in_a_titled_answer_by_their_weight_and_never_without_a_title():
    model = title_model()
    colour_from_biases(model, [2.0, -2.0], [-3.0, 3.0])  # the photo leans "red", the title is sure of "blue"
    x = images()
    titled = torch.from_numpy(model.title.tokenizer.batch(["navy shirt", "navy cap"]))
    assert model.probabilities(x, titled)["colour"].argmax(1).tolist() == [0, 0]  # weight 0: the fused heads
    photo_only = model.probabilities(x)
    with torch.no_grad():
        model.title_weight.copy_(torch.tensor([1.0, 0.5]))
    _, features = model.embed(x, titled)
    served, fused = model.served_logits(features), model.head_logits(features)
    text = model.title_logits(features)
    torch.testing.assert_close(served["colour"], fused["colour"] + text["colour"])
    torch.testing.assert_close(served["kind"], fused["kind"] + 0.5 * text["kind"])
    assert model.probabilities(x, titled)["colour"].argmax(1).tolist() == [1, 1]  # 2 - 3 < -2 + 3
    for name, p in model.probabilities(x).items():  # a request without a title: the weight plays no part
        assert torch.equal(p, photo_only[name])
    outputs = ProbabilityModel(model)(x, titled)  # the exported module answers the same
    torch.testing.assert_close(outputs[0], model.probabilities(x, titled)["colour"])


def test_calibration_weighs_the_title_heads_by_the_blend_times_the_fused_temperature(kaggle_dir, tmp_path):
    from fashion.text import tokenize_all
    from training.calibrate import fit_temperatures_from_logits, fit_title_temperatures, model_logits
    from training.checkpoint import save_checkpoint
    from training.context import validation_samples
    from training.dataset import ImageCache
    from training.evaluate import encode_known

    cfg = TrainConfig(data=str(kaggle_dir), out=str(tmp_path / "run"), backbone="test_efficientnet",
                      image_size=32, epochs=1, batch_size=8, workers=0, title=True, title_buckets=256,
                      title_dim=8, min_class_count=0, novelty_quantile=0.0)
    ckpt = load_checkpoint(train(cfg).run_dir / "best.pt")
    assert ckpt.config["title_blend"] == 1.0 and ckpt.model.title_weight.abs().min() > 0  # set by training
    samples = validation_samples(ckpt)
    photos = ImageCache.build([s.image_path for s in samples], ckpt.preprocessing, desc="decode").images
    ids = tokenize_all(ckpt.model.title.tokenizer, [s.title for s in samples])
    labels = encode_known(ckpt.schema, samples)
    model = ckpt.model
    fit_title_temperatures(ckpt, photos, ids, labels, "cpu", blend=0.0)
    assert not model.title_weight.any()
    fused_t = model.title_temperature.clone()
    fused = model_logits(model, photos, titles=ids)
    want = fit_temperatures_from_logits(ckpt.schema, fused, labels)
    assert fused_t.tolist() == pytest.approx([want[a.name] for a in ckpt.schema.attributes])
    fit_title_temperatures(ckpt, photos, ids, labels, "cpu", blend=2.0)
    torch.testing.assert_close(model.title_weight, 2.0 * fused_t)
    with torch.no_grad():
        _, features = model.embed(torch.from_numpy(photos), torch.from_numpy(ids))
        text = model.title_logits(features)
    probs = model.probabilities(torch.from_numpy(photos), torch.from_numpy(ids))
    for i, a in enumerate(ckpt.schema.attributes):  # the answer: fused calibrated logits + 2 x the title's
        expected = torch.from_numpy(fused[a.name]) / fused_t[i] + 2.0 * text[a.name]
        assert torch.equal(probs[a.name].argmax(1), expected.argmax(1)), a.name
    # A checkpoint saved before the blend existed has no title_weight: it loads with the fused heads alone.
    old = tmp_path / "old.pt"
    save_checkpoint(old, ckpt)
    payload = torch.load(old, weights_only=True)
    del payload["state_dict"]["title_weight"]
    torch.save(payload, old)
    assert not load_checkpoint(old).model.title_weight.any()


def test_logit_adjustment_adds_tau_times_the_log_prior_to_the_loss_logits_only():
    labels = np.array([[0, 0], [0, 1], [0, 0], [1, 2]])
    priors = log_priors(labels, SCHEMA)
    np.testing.assert_allclose(priors[0].exp().numpy(), [4 / 6, 2 / 6], rtol=1e-6)  # +1 per class
    logits = {"colour": torch.zeros(1, 2), "kind": torch.zeros(1, 3)}
    moved = adjusted(logits, SCHEMA, priors, 0.5)
    torch.testing.assert_close(moved["colour"][0], 0.5 * priors[0])
    targets = torch.tensor([[1, 2]])
    plain = objective(Outputs(logits), targets, SCHEMA, [None, None], 0.0)
    tilted = objective(Outputs(logits), targets, SCHEMA, [None, None], 0.0, priors=priors, tau=1.0)
    assert tilted > plain  # the rare classes are the targets: with their prior added they look less likely


def test_the_colour_histogram_sees_the_product_and_not_the_white_background():
    model = build_model("test_efficientnet", SCHEMA, PRE, colour_hist=3, colour_grid=0).eval()
    x = torch.full((1, 32, 32, 3), 255, dtype=torch.uint8)
    x[0, 8:24, 8:24] = torch.tensor([200, 20, 20], dtype=torch.uint8)  # a red product on white
    hist = model.colour_histogram(model.normalize(x) * model.std + model.mean)[0]
    assert hist.shape == (28,)
    assert int(hist[:27].argmax()) == 2 * 9 + 0 * 3 + 0  # the red bin
    assert hist[:27].sum() > 0.9 and 0.6 < hist[27] < 0.8  # the background's share: 3/4 of the photo


def test_a_title_model_trains_calibrates_both_temperatures_and_round_trips(kaggle_dir, tmp_path):
    cfg = TrainConfig(data=str(kaggle_dir), out=str(tmp_path / "run"), backbone="test_efficientnet",
                      image_size=32, epochs=2, batch_size=8, workers=0, title=True, title_buckets=256,
                      title_dim=8, colour_hist=2, min_class_count=0, novelty_quantile=0.5, logit_adjust=1.0)
    result = train(cfg)
    ckpt = load_checkpoint(result.run_dir / "best.pt")
    model = ckpt.model
    assert model.title is not None and model.title.tokenizer.buckets == 256 and model.colour_hist == 2
    assert not torch.equal(model.title_temperature, torch.ones_like(model.title_temperature))
    x = images(3)
    ids = torch.from_numpy(model.title.tokenizer.batch(["Brand 1 Red Tshirt", "", "Brand 2 Blue Tshirt"]))
    again = load_checkpoint(result.run_dir / "best.pt").model
    for name, p in model.probabilities(x, ids).items():
        torch.testing.assert_close(p, again.probabilities(x, ids)[name])
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    assert '"val_image_only"' in lines[-1]


def test_title_training_on_data_without_titles_is_refused_before_any_work(meesho_dir, tmp_path):
    cfg = TrainConfig(data=str(meesho_dir), out=str(tmp_path / "run"), backbone="test_efficientnet",
                      image_size=32, epochs=1, workers=0, title=True)
    with pytest.raises(ConfigError, match=r"no training row .* has a title"):
        train(cfg)


def test_the_trunk_cache_is_computed_once_and_gives_the_same_run(kaggle_dir, tmp_path):
    def run(out, colour_hist):
        cfg = TrainConfig(data=str(kaggle_dir), out=str(tmp_path / out), backbone="tf_efficientnet_lite0",
                          image_size=32, epochs=1, batch_size=8, workers=0, freeze_blocks=4,
                          aspect_views=(1.0, 1.3333), novelty_quantile=0, min_class_count=0,
                          trunk_cache=str(tmp_path / "cache"), colour_hist=colour_hist)
        return train(cfg).best_score

    first = run("a", 0)
    chunks = sorted((tmp_path / "cache").rglob("chunk-*.pt"))
    assert len(chunks) == 3  # two views of the training photos, one of the validation photos
    assert run("b", 0) == first
    run("c", 2)  # other colour features, the same trunk: nothing new is computed
    assert sorted((tmp_path / "cache").rglob("chunk-*.pt")) == chunks


def test_conflict_thresholds_flag_few_photos_with_their_own_titles(kaggle_dir, tmp_path):
    from training.calibrate import CONFLICT_FALSE_ALARMS, conflict_scores

    cfg = TrainConfig(data=str(kaggle_dir), out=str(tmp_path / "run"), backbone="test_efficientnet",
                      image_size=32, epochs=1, batch_size=8, workers=0, title=True, title_buckets=256,
                      title_dim=8, min_class_count=0, novelty_quantile=0)
    ckpt = load_checkpoint(train(cfg).run_dir / "best.pt")
    assert set(ckpt.conflict_thresholds) == {a.name for a in ckpt.schema.attributes}
    tok = ckpt.model.title.tokenizer
    photos = images(20, seed=3).numpy()
    ids = tok.batch([f"Brand {i} Red Tshirt" for i in range(20)])
    scores = conflict_scores(ckpt.model, photos, ids, "cpu")
    assert scores.shape == (20, len(ckpt.schema.attributes)) and (scores >= 0).all() and (scores <= 1).all()
    assert 0 < CONFLICT_FALSE_ALARMS < 0.1


def test_prior_correction_moves_answers_towards_classes_the_training_mix_made_rare():
    from training.priors import shift_biases

    model = build_model("test_efficientnet", SCHEMA, PRE).eval()
    with torch.no_grad():
        for head in model.heads.values():
            head[1].weight.zero_()
            head[1].bias.zero_()
    priors = log_priors(np.array([[0, 0]] * 9 + [[1, 1]]), SCHEMA)  # "red" 9 times in 10: a common class
    x = images(1)
    shift_biases(model, priors, 1.0)
    p = model.probabilities(x)["colour"][0]
    assert p[1] > p[0]  # with nothing else to go on, the corrected model now leans to the rare class
    torch.testing.assert_close(p[0] / p[1], (priors[0][1] - priors[0][0]).exp())


def test_prior_correction_also_shifts_the_title_only_heads_that_vote_in_a_titled_answer():
    from training.priors import shift_biases

    model = title_model()
    colour_from_biases(model, [0.0, 0.0], [0.0, 0.0])
    with torch.no_grad():
        model.title_weight.fill_(1.0)
    priors = log_priors(np.array([[0, 0]] * 9 + [[1, 1]]), SCHEMA)
    x = images(1)
    titled = torch.from_numpy(model.title.tokenizer.batch(["navy shirt"]))
    shift_biases(model, priors, 1.0)
    p, q = model.probabilities(x)["colour"][0], model.probabilities(x, titled)["colour"][0]
    ratio = (priors[0][1] - priors[0][0]).exp()
    torch.testing.assert_close(p[0] / p[1], ratio)  # the photo-only answer: corrected once
    torch.testing.assert_close(q[0] / q[1], ratio**2)  # both experts corrected, so their product twice


def test_a_title_blend_needs_trained_title_heads_and_a_title_model():
    with pytest.raises(ConfigError, match="title_blend > 0 needs title_loss > 0"):
        TrainConfig(data="d", out="o", title=True, title_loss=0.0)
    TrainConfig(data="d", out="o", title=True, title_loss=0.0, title_blend=0.0)  # the fused heads alone


def test_evaluate_scores_a_title_model_with_titles_without_and_with_wrong_ones(kaggle_dir, tmp_path, capsys):
    import json

    from fashion.cli import main

    cfg = TrainConfig(data=str(kaggle_dir), out=str(tmp_path / "run"), backbone="test_efficientnet",
                      image_size=32, epochs=1, batch_size=8, workers=0, title=True, title_buckets=256,
                      title_dim=8, min_class_count=0, novelty_quantile=0, prior_correction=0.5)
    best = str(train(cfg).run_dir / "best.pt")
    assert load_checkpoint(best).config["prior_correction"] == 0.5
    docs = {}
    for mode in ("auto", "none", "shuffled", "only"):
        out = tmp_path / mode
        assert main(["evaluate", "--checkpoint", best, "--data", str(kaggle_dir), "--out", str(out),
                     "--title", mode]) == 0
        docs[mode] = json.loads((out / "metrics.json").read_text())["attributes"]["baseColour"]
    assert docs["none"]["conflict_rate"] is None  # no title, nothing to disagree with
    assert docs["auto"]["conflict_rate"] is not None and docs["shuffled"]["conflict_rate"] is not None
    assert docs["only"]["accuracy"] != docs["auto"]["accuracy"] or docs["only"]["ece"] != docs["auto"]["ece"]


def test_a_head_served_as_always_uncertain_gets_a_threshold_no_answer_reaches(kaggle_dir, tmp_path):
    cfg = TrainConfig(data=str(kaggle_dir), out=str(tmp_path / "run"), backbone="test_efficientnet",
                      image_size=32, epochs=1, batch_size=8, workers=0, min_class_count=0, novelty_quantile=0,
                      always_uncertain=("season",))
    ckpt = load_checkpoint(train(cfg).run_dir / "best.pt")
    assert ckpt.thresholds["season"] == 1.0
    confidence = ckpt.model.probabilities(images(4))["season"].max(dim=1).values.detach().numpy()
    assert is_uncertain(confidence, ckpt.thresholds["season"]).all()  # every season answer is flagged
    assert (confidence > 0.99).all()  # however sure the model is (one season in this catalogue)
    assert not is_uncertain(confidence, 0.5).any() and not is_uncertain(confidence, None).any()
    # Calibrated again (fashion calibrate, e.g. after a prior correction): the head stays always uncertain.
    from training.calibrate import calibrate

    calibrate(tmp_path / "run" / "best.pt", tmp_path / "again.pt", device="cpu")
    assert load_checkpoint(tmp_path / "again.pt").thresholds["season"] == 1.0
    from fashion.cli import main

    # ... and fashion calibrate can make a head always uncertain after training, with a prior correction.
    again = str(tmp_path / "again.pt")
    assert main(["calibrate", "--checkpoint", again, "--out", str(tmp_path / "gender.pt"),
                 "--always-uncertain", "gender", "--prior-correction", "1"]) == 0
    later = load_checkpoint(tmp_path / "gender.pt")
    assert later.thresholds["gender"] == 1.0 and later.thresholds["season"] == 1.0
    assert later.config["always_uncertain"] == ["gender", "season"] and later.config["prior_correction"] == 1
    assert main(["calibrate", "--checkpoint", str(tmp_path / "again.pt"), "--out", str(tmp_path / "x.pt"),
                 "--always-uncertain", "sleeve"]) == 2  # a head the model does not have: a clear error
    with pytest.raises(ConfigError, match="not trained"):
        TrainConfig(data="d", out="o", attributes=("gender",), always_uncertain=("season",))
