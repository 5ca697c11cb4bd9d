"""A tiny model that reads titles, whose title branch reliably knows the colour, exported once per session.

``title_catalogue`` draws a Kaggle-layout catalogue (red, green and blue squares and discs on a light
background; ``productDisplayName`` names the colour and the shape: "Brand 3 Red Square Tee").
``title_checkpoint`` trains ``test_efficientnet`` with ``--title`` on it for one epoch, then sets the colour
by hand, as ``tests/test_title_model.py`` does, so that a test can rely on it:

* the photo alone: ``baseColour`` reads the colour grid's mean colour (``colour_grid=1``) — red, green or
  blue, whichever channel is highest;
* the title alone: the embedding of each colour word has a dimension of its own, and the title-only head
  reads it; its tokenizer counts words only (``word_ngrams=1``, no character n-grams), so that no other
  word of the catalogue shares a colour word's bucket (checked here);
* the answer with a title adds the two (``title_weight`` 1), so a title that names a colour wins;
* ``baseColour``'s conflict threshold is 0.8: a title naming another colour scores ~1, the photo's colour
  ~0, a title without a colour word 2/3.

Every other head and the rest of the embedding keep their trained weights, so the served answers with a
title depend on every id of the title: a gateway that tokenised differently from the trainer would not
reproduce PyTorch's probabilities. ``title_export`` exports it (FP32 and FP16; the gate loosened and
``--force``, as for the conftest's tiny model) into a repository of its own, ``title_int8`` with INT8.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import COLOURS, draw_product

SHAPES = ("Square", "Round")
TITLE_SIZE = 32
CHANNEL = {"Red": 0, "Green": 1, "Blue": 2}  # RGB channel of each drawn colour (conftest.COLOURS)
CONFLICT_THRESHOLD = 0.8


def title_of(i: int, colour: str, shape: str) -> str:
    return f"Brand {i % 7} {colour} {shape} Tee"


def write_catalogue(root: Path, count: int = 60) -> Path:
    (root / "images").mkdir(parents=True)
    header = (
        "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"
    )
    lines = [header]
    for i in range(count):
        colour, shape = list(COLOURS)[i % 3], SHAPES[(i // 3) % 2]
        gender = ("Men", "Women")[(i // 6) % 2]
        labels = f"{gender},Apparel,Topwear,{shape},{colour},Summer,2011,Casual"
        lines.append(f"{i + 1},{labels},{title_of(i, colour, shape)}")
        draw_product(root / "images" / f"{i + 1}.jpg", COLOURS[colour], shape.lower(), seed=i)
    (root / "styles.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def title_catalogue(tmp_path_factory) -> Path:
    return write_catalogue(tmp_path_factory.mktemp("title-catalogue") / "kaggle")


@pytest.fixture(scope="session")
def title_checkpoint(title_catalogue, tmp_path_factory) -> Path:
    """``best.pt`` of the tiny title model with the colour set by hand (the module docstring)."""
    from training.checkpoint import load_checkpoint, save_checkpoint
    from training.config import TrainConfig
    from training.train import train

    out = tmp_path_factory.mktemp("title-run")
    cfg = TrainConfig(
        data=str(title_catalogue),
        out=str(out / "run"),
        backbone="test_efficientnet",
        image_size=TITLE_SIZE,
        epochs=1,
        batch_size=16,
        workers=0,
        seed=0,
        title=True,
        title_buckets=4096,
        title_dim=8,
        colour_grid=1,
        min_class_count=0,
    )
    ckpt = load_checkpoint(train(cfg).run_dir / "best.pt")
    set_colour_by_hand(ckpt)
    path = out / "colour-by-hand.pt"
    save_checkpoint(path, ckpt)
    return path


def set_colour_by_hand(ckpt) -> None:
    """The module docstring's ``baseColour``: photo from the colour grid, title from the colour word."""
    import torch

    from fashion.text import TitleTokenizer

    net = ckpt.model
    names = [a.name for a in net.schema.attributes]
    j = names.index("baseColour")
    attribute = net.schema.attributes[j]
    # Words only: a colour word is one id, and no other word of the catalogue may share its bucket.
    tokenizer = TitleTokenizer(buckets=net.title.tokenizer.buckets, max_tokens=24, word_ngrams=1, char_max=0)
    net.title.tokenizer = tokenizer
    vocabulary = {w for i in range(60) for c in COLOURS for s in SHAPES for w in title_of(i, c, s).split()}
    ids = {w: int(tokenizer.ids(w)[0]) for w in vocabulary | {"Navy", "Cotton"}}
    colour_ids = {c: ids[c] for c in COLOURS}
    others = {v for w, v in ids.items() if w not in COLOURS}
    assert len(set(colour_ids.values())) == 3 and not others & set(colour_ids.values()), ids
    width = net.num_features  # the heads' input: pooled features, then the colour grid's 3 means
    with torch.no_grad():
        head = net.heads[attribute.tensor][1]
        head.weight.zero_()
        head.bias.zero_()
        embedding = net.title.embedding.weight
        embedding[:, :3] = 0
        title_head = net.title_heads[attribute.tensor]
        title_head.weight.zero_()
        title_head.bias.zero_()
        for colour, channel in CHANNEL.items():
            k = attribute.classes.index(colour)
            head.weight[k, width + channel] = 20.0
            embedding[colour_ids[colour], channel] = 1.0
            title_head.weight[k, channel] = 100.0
        net.temperature[j] = 1.0
        net.title_temperature[j] = 1.0
        net.title_weight[j] = 1.0  # with a title: photo logit + title-only logit (FashionNet.served_logits)
    ckpt.conflict_thresholds = {**ckpt.conflict_thresholds, "baseColour": CONFLICT_THRESHOLD}


def export_options(checkpoint: Path, repository: Path, precisions: tuple[str, ...]):
    from export.pipeline import ExportOptions

    return ExportOptions(
        checkpoint=checkpoint,
        repository=repository,
        precisions=precisions,
        min_agreement=0.5,  # a one-epoch 32 px model decides on noise; the gate itself is tested elsewhere
        max_accuracy_drop=1.0,
        force=True,
        synthetic_calibration=True,
        calibration_images=16,
        gate_images=12,
        eval_images=12,
        max_batch_size=16,
        time_s=0.1,
    )


@pytest.fixture(scope="session")
def title_export(title_checkpoint, tmp_path_factory):
    """(repository, ExportResult) of the hand-set title model: FP32 (served: ONNX Runtime or OpenVINO,
    whichever the export times faster) and FP16 (a GPU precision, never served on the CPU)."""
    from export.pipeline import export_checkpoint

    repo = tmp_path_factory.mktemp("title-repo")
    return repo, export_checkpoint(
        export_options(title_checkpoint, repo, ("fp16",)), report=lambda text: None
    )


@pytest.fixture(scope="session")
def title_int8(title_checkpoint, tmp_path_factory) -> Path:
    """The version folder of an export with INT8 too (in a repository of its own: the loosened gate may pass
    INT8, and then it would be the one served)."""
    from export.pipeline import export_checkpoint

    repo = tmp_path_factory.mktemp("title-int8")
    return export_checkpoint(
        export_options(title_checkpoint, repo, ("int8",)), report=lambda text: None
    ).version_dir
