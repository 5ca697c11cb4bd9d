"""Batch inference over a test set and the prediction file (``fashion predict``).

Images are decoded through the preprocessing contract batch by batch (a thread pool decodes the next
batch's JPEGs), so a 40 000-image test set never sits in memory at once; only the probabilities do.

Output formats:

- Meesho layout: the competition's submission file — ``id, Category, len, attr_1..attr_10`` with the
  category's attributes in the slots ``category_attributes.parquet`` gives them and ``dummy`` in unused
  slots. The format needs a value in every used slot, so abstaining is not possible there: the most
  probable class is written whatever its confidence (and the folded ``other`` class is never written).
- Other layouts: ``id, image`` and, per attribute, ``<attr>`` (the class, empty when uncertain),
  ``<attr>_confidence`` (its calibrated probability) and ``<attr>_uncertain`` (1 when the confidence is
  below the attribute's abstain threshold stored in the checkpoint by ``fashion calibrate``).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fashion.contract import ImageError, Preprocessing
from fashion.schema import OTHER, is_uncertain
from training.checkpoint import Checkpoint, load_checkpoint
from training.context import resolve_device
from training.data import Catalogue, DatasetError, Sample, read_catalogue
from training.dataset import load_view
from training.inference import collect, head_widths
from training.model import CONFLICT, FashionNet

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
MEESHO_SLOTS = 10
MEESHO_EMPTY = "dummy"


# --- reading a test set ---------------------------------------------------------------------------


def read_for_prediction(path: str | Path, format: str = "auto", split: str | None = None) -> Catalogue:
    """The images of a test set, labelled or not, in any layout ``read_catalogue`` knows, or a folder of
    images (``format="images"``, also chosen automatically for a folder with neither table).

    For the Meesho layout ``split`` names the table (``test`` → ``test.csv`` + ``test_images/``); by
    default ``test`` when ``test.csv`` exists, else ``train``. Rows without labels are kept: the readers
    only drop rows whose image is missing or whose id/category is unusable (they are logged).
    """
    root = Path(path)
    if not root.exists():
        raise DatasetError(f"{root} does not exist")
    if format == "images" or (
        format == "auto" and root.is_dir()
        and not (root / "styles.csv").is_file() and not (root / "category_attributes.parquet").is_file()
    ):
        return _image_folder(root)
    if split is None:
        split = "test" if (root / "test.csv").is_file() else "train"
    return read_catalogue(root, format, None, split=split)


def _image_folder(root: Path) -> Catalogue:
    folder = root / "images" if (root / "images").is_dir() else root
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DatasetError(f"{folder} holds no images ({sorted(IMAGE_SUFFIXES)})")
    samples = [
        Sample(id=str(p.relative_to(folder).with_suffix("")), image_path=str(p), labels={}) for p in paths
    ]
    return Catalogue("images", root, samples, [])


# --- inference ------------------------------------------------------------------------------------


def iter_batches(
    paths: Sequence[str], pre: Preprocessing, batch_size: int = 64, threads: int = 2, aspect: float = 1.0
) -> Iterator[tuple[np.ndarray, list[bool]]]:
    """(uint8 NHWC batch, ok flags) for consecutive slices of ``paths``; undecodable images are blank
    (the fill colour) with ``ok=False``. The next batch decodes while the caller works on this one.
    ``aspect`` multiplies each photo's height before the contract (``training.dataset.load_view``)."""

    def load(chunk: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        out = np.empty((len(chunk), pre.image_size, pre.image_size, 3), dtype=np.uint8)
        out[:] = np.asarray(pre.fill, dtype=np.uint8)
        ok = [True] * len(chunk)
        for i, p in enumerate(chunk):
            try:
                out[i] = load_view(p, pre, aspect)
            except (ImageError, OSError) as e:
                ok[i] = False
                log.warning("could not decode %s (%s); no prediction for it", p, e)
        return out, ok

    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max(threads, 1)) as pool:
        pending = None
        for chunk in chunks:
            following = pool.submit(load, chunk)
            if pending is not None:
                yield pending.result()
            pending = following
        if pending is not None:
            yield pending.result()


@dataclass
class Predictions:
    probs: dict[str, np.ndarray]  # head → (n, classes) calibrated probabilities
    ok: np.ndarray  # (n,) bool: the image could be decoded
    conflict: np.ndarray | None = None  # (n, heads) a title model's conflict scores, with titles


def predict_paths(
    model: FashionNet,
    paths: Sequence[str],
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    desc: str = "predict",
    aspect: float = 1.0,
    titles: np.ndarray | None = None,
    title_only: bool = False,
) -> Predictions:
    """Calibrated probabilities per head for image files, with a progress bar; with ``titles`` (a title
    model's ``(n, max_tokens)`` ids, rows aligned with ``paths``) as image + title requests, and the
    conflict scores. ``title_only``: what the title-only heads say instead (a reference, never served)."""
    model.eval().to(device)
    ok: list[bool] = []

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        with tqdm(total=len(paths), desc=desc, unit="img") as bar:
            start = 0
            for images, flags in iter_batches(paths, model.preprocessing, batch_size, aspect=aspect):
                ids = titles[start : start + len(flags)] if titles is not None else None
                yield torch.from_numpy(images).to(device), None if ids is None else torch.from_numpy(ids)
                start += len(flags)
                ok.extend(flags)
                bar.update(len(flags))

    widths = head_widths(model.schema)
    with_conflict = titles is not None and model.title is not None and not title_only
    if with_conflict:
        widths = {**widths, CONFLICT: len(model.schema.attributes)}

    def step(batch: tuple[torch.Tensor, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        pooled, features = model.embed(*batch)
        if title_only:
            return {k: torch.softmax(v, dim=1) for k, v in model.title_logits(features).items()}
        out = model.features_probabilities(pooled, features)
        return {**out, CONFLICT: model.conflict(features)} if with_conflict else out

    probs = collect(step, batches(), widths)
    conflict = probs.pop(CONFLICT) if with_conflict else None
    return Predictions(probs, np.asarray(ok, dtype=bool), conflict)


# --- writing the file -----------------------------------------------------------------------------


def write_attribute_csv(
    path: Path, ckpt: Checkpoint, samples: Sequence[Sample], preds: Predictions, *, abstain: bool = True
) -> None:
    """One row per image: ``id, image`` then ``<attr>, <attr>_confidence, <attr>_uncertain`` per head."""
    schema = ckpt.schema
    header = ["id", "image"]
    for a in schema.attributes:
        header += [a.name, f"{a.name}_confidence", f"{a.name}_uncertain"]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, s in enumerate(samples):
            row: list[object] = [s.id, s.image_path]
            for a in schema.attributes:
                if not preds.ok[i]:
                    row += ["", "", 1]
                    continue
                p = preds.probs[a.name][i]
                k = int(p.argmax())
                threshold = ckpt.thresholds.get(a.name) if abstain else None
                uncertain = bool(is_uncertain(float(p[k]), threshold))
                row += ["" if uncertain else a.classes[k], f"{float(p[k]):.4f}", int(uncertain)]
            w.writerow(row)


def meesho_slots(cat: Catalogue) -> dict[str, list[str]]:
    """Category → its heads in slot order (``attr_1`` first), from the catalogue's parquet order."""
    slots: dict[str, list[str]] = {}
    for head in cat.attributes:
        slots.setdefault(cat.head_category[head], []).append(head)
    return slots


def write_meesho_submission(path: Path, ckpt: Checkpoint, cat: Catalogue, preds: Predictions) -> None:
    """The competition's format: ``id, Category, len, attr_1..attr_10``; ``dummy`` where nothing applies.

    ``len`` is the number of attributes of the category. A head the model does not have (no labels in
    its training split) is written as ``dummy``. The folded ``other`` class is not a competition value, so
    the most probable real class is written instead.
    """
    schema = ckpt.schema
    known = set(schema.names)
    slots = meesho_slots(cat)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "Category", "len"] + [f"attr_{k}" for k in range(1, MEESHO_SLOTS + 1)])
        for i, s in enumerate(cat.samples):
            heads = slots.get(s.category or "", [])
            values = []
            for head in heads[:MEESHO_SLOTS]:
                if head not in known or not preds.ok[i]:
                    values.append(MEESHO_EMPTY)
                    continue
                a = schema[head]
                p = preds.probs[head][i].copy()
                if OTHER in a.classes and len(a.classes) > 1:
                    p[a.classes.index(OTHER)] = -1.0
                values.append(a.classes[int(p.argmax())])
            values += [MEESHO_EMPTY] * (MEESHO_SLOTS - len(values))
            w.writerow([s.id, s.category, len(heads), *values])


@dataclass(frozen=True)
class PredictResult:
    out: Path
    rows: int
    failed: int
    uncertain: dict[str, float]  # head → share of predictions reported as uncertain


def predict(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    format: str = "auto",
    split: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    abstain: bool = True,
) -> PredictResult:
    """Predict every image of ``data`` and write ``out`` (CSV) in the layout's format (module docstring)."""

    ckpt = load_checkpoint(checkpoint)
    cat = read_for_prediction(data, format, split)
    if not cat.samples:
        raise DatasetError(f"{data}: no usable images to predict")
    dev = resolve_device(device)
    paths = [s.image_path for s in cat.samples]
    preds = predict_paths(ckpt.model, paths, dev, batch_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    uncertain: dict[str, float] = {}
    if cat.format == "meesho":
        if not ckpt.schema.categories:
            raise DatasetError(f"{data} is a Meesho layout but {checkpoint} was not trained on one")
        write_meesho_submission(out, ckpt, cat, preds)
    else:
        write_attribute_csv(out, ckpt, cat.samples, preds, abstain=abstain)
        for a in ckpt.schema.attributes:
            t = ckpt.thresholds.get(a.name)
            if abstain and t is not None and len(paths):
                uncertain[a.name] = float(np.mean(preds.probs[a.name].max(axis=1) < t))
    return PredictResult(out, len(cat.samples), int((~preds.ok).sum()), uncertain)
