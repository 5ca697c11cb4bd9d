"""Images for the parity check, INT8 calibration and precision deltas, through the preprocessing contract.

Sources, in order of preference: ``--calibration-data`` (any layout ``training.data.read_catalogue``
reads), the dataset the checkpoint was trained on (its ``config["data"]``) when it is still on disk,
and otherwise freshly rendered synthetic products (``training.synth``), which need no files at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.errors import ExportError
from fashion.contract import Preprocessing, resize, to_rgb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageSet:
    """uint8 NHWC images and where they came from (recorded in the metadata)."""

    images: np.ndarray
    source: str


def load_images(
    pre: Preprocessing,
    count: int,
    *,
    data: str | Path | None = None,
    train_data: str | None = None,
    seed: int = 0,
) -> ImageSet:
    """``count`` contract-preprocessed images from ``data``, else ``train_data``, else synthetic renders.

    Args:
        pre: the checkpoint's preprocessing contract.
        count: how many images (fewer when the dataset is smaller).
        data: an explicit dataset path (``--calibration-data``); an error when it cannot be read.
        train_data: the checkpoint's training dataset; silently skipped when missing.
        seed: picks which images (a deterministic spread over the catalogue).
    """
    if data is not None:
        return _from_catalogue(Path(data), pre, count, seed)
    if train_data and Path(train_data).exists():
        try:
            return _from_catalogue(Path(train_data), pre, count, seed)
        except ExportError as e:
            log.warning("cannot use the training data for calibration (%s); using synthetic images", e)
    return synthetic(pre, count, seed)


def _from_catalogue(path: Path, pre: Preprocessing, count: int, seed: int) -> ImageSet:
    from training.data import DatasetError, read_catalogue
    from training.dataset import ImageCache

    try:
        cat = read_catalogue(path)
    except DatasetError as e:
        raise ExportError(f"--calibration-data {path}: {e}") from e
    if not cat.samples:
        raise ExportError(f"--calibration-data {path}: no usable images")
    rng = np.random.default_rng(seed)
    picked = rng.permutation(len(cat.samples))[:count]
    paths = [cat.samples[int(i)].image_path for i in sorted(picked)]
    cache = ImageCache.build(paths, pre, desc="decode calibration images")
    return ImageSet(cache.images, f"{cat.format} catalogue {path} ({len(paths)} images)")


def synthetic(pre: Preprocessing, count: int, seed: int = 0, start_id: int = 100_000) -> ImageSet:
    """Rendered synthetic products with ids from ``start_id`` (beyond what ``fashion synth`` writes)."""
    from training.synth import render, sample_rows

    rows = sample_rows(count, seed, start_id=start_id)
    images = np.stack([resize(to_rgb(render(row, seed)[0], pre.fill), pre) for row in rows])
    return ImageSet(images, f"synthetic renders (seed {seed}, {count} images)")
