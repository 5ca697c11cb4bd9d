"""Images for the parity check, INT8 calibration and the accuracy gate, through the preprocessing contract.

``export_images`` picks, in order of preference:

1. ``--calibration-data`` (any layout ``training.data.read_catalogue`` reads): calibration photos and a
   disjoint set of labelled gate photos from it;
2. the dataset the checkpoint was trained on (its ``config["data"]``), when it is still on disk:
   calibration from the training split, the gate on the validation split — the photos the model card's
   numbers come from;
3. photos shipped beside the checkpoint (``<checkpoint folder>/photos/``, any layout
   ``training.data.read_catalogue`` reads): validation photos the model never trained on, with their labels,
   that the shipped default model carries (``models/default/photos``) so that a fresh clone without the
   training data still gates INT8 and BF16 on real photos; split like ``--calibration-data``;
4. otherwise freshly rendered synthetic products (``training.synth``): enough for the FP32 parity check,
   but never used to calibrate INT8 or to pass a reduced precision unless asked
   (``--synthetic-calibration``), and then the metadata says so.

For a model that reads titles, every photo carries its listing's title as the model's ids (``titles``,
tokenised with the checkpoint's own tokenizer, ``fashion.text.tokenize_all``): Kaggle's
``productDisplayName``, a plain CSV's title column, a synthetic product's name; a photo without one gets an
all-zero row (no title). The gate and the INT8 calibration then see what a request with a title sends.

Where the photos come from is recorded truthfully (``fashion.metadata.PhotoOrigin``): a catalogue written
by ``fashion synth`` (its ``training.synth.MARKER`` file) holds renders, not real photos, and counts as
synthetic like the export's own renders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ExportError
from fashion.contract import Preprocessing, resize, to_rgb
from fashion.metadata import ExportPhotos, PhotoOrigin, PhotoSet
from fashion.text import has_title, tokenize_all
from training.context import checkpoint_config, prepare_data
from training.data import DatasetError, read_catalogue
from training.dataset import ImageCache
from training.evaluate import encode_known
from training.synth import MARKER, render, sample_rows


@dataclass(frozen=True)
class ImageSet:
    """uint8 NHWC images, where they came from and whether they are real photos (recorded); for a model
    that reads titles, their titles' ids ``(N, max_tokens)`` (all-zero rows: no title)."""

    images: np.ndarray
    source: str
    origin: PhotoOrigin = PhotoOrigin.REAL
    titles: np.ndarray | None = None

    def record(self) -> PhotoSet:
        titled = None if self.titles is None else int(has_title(self.titles).sum())
        return PhotoSet(self.source, len(self.images), self.origin, titled)

    def head(self, count: int) -> ImageSet:
        """The first ``count`` images (and their titles)."""
        titles = None if self.titles is None else self.titles[:count]
        return ImageSet(self.images[:count], self.source, self.origin, titles)

    def split(self, count: int) -> tuple[ImageSet, ImageSet]:
        """(the first ``count`` images, the rest), each with its titles."""
        rest = ImageSet(
            self.images[count:],
            self.source,
            self.origin,
            None if self.titles is None else self.titles[count:],
        )
        return self.head(count), rest


def title_ids(ckpt: Any, titles: Sequence[str | None]) -> np.ndarray | None:
    """The titles as ``ckpt``'s model reads them (None for a model without a title branch)."""
    encoder = getattr(ckpt.model, "title", None)
    return None if encoder is None else tokenize_all(encoder.tokenizer, titles)


def synthetic(
    pre: Preprocessing, count: int, seed: int = 0, start_id: int = 100_000, ckpt: Any = None
) -> ImageSet:
    """Rendered synthetic products with ids from ``start_id`` (beyond what ``fashion synth`` writes), with
    their product names as titles for ``ckpt``'s model when it reads titles."""

    rows = sample_rows(count, seed, start_id=start_id)
    images = np.stack([resize(to_rgb(render(row, seed)[0], pre.fill), pre) for row in rows])
    titles = None if ckpt is None else title_ids(ckpt, [row.product_display_name for row in rows])
    source = f"synthetic renders (seed {seed}, {count} images)"
    return ImageSet(images, source, PhotoOrigin.SYNTHETIC_RENDERS, titles)


def catalogue_origin(folder: str | Path) -> PhotoOrigin:
    """Real photos, unless ``fashion synth`` wrote the catalogue (its marker file is there)."""
    return PhotoOrigin.SYNTHETIC_CATALOGUE if (Path(folder) / MARKER).is_file() else PhotoOrigin.REAL


@dataclass(frozen=True)
class ExportImages:
    """The photos an export checks and calibrates with, and whether they are real."""

    gate: ImageSet  # parity and the accuracy gate
    labels: np.ndarray | None  # (gate images, attributes) class indices, -1 missing; None = unlabelled
    calibration: ImageSet | None  # None: no real photos and synthetic calibration not allowed

    @property
    def real(self) -> bool:
        """Whether every photo is a real photo (not a render of ``fashion synth`` or of the export)."""
        sets = [self.gate] + ([self.calibration] if self.calibration is not None else [])
        return all(s.origin is PhotoOrigin.REAL for s in sets)

    def record(self) -> ExportPhotos:
        calibration = None if self.calibration is None else self.calibration.record()
        return ExportPhotos(self.gate.record(), self.labels is not None, calibration)

    def gate_batch(self) -> GateBatch:
        """What the accuracy gate sends: the gate photos; for a model that reads titles, each photo twice,
        with its title and without one (all-zero ids), since one model answers both kinds of request."""
        gate = self.gate
        if gate.titles is None:
            return GateBatch(gate.images, None, self.labels)
        labels = None if self.labels is None else np.concatenate([self.labels, self.labels])
        titles = np.concatenate([gate.titles, np.zeros_like(gate.titles)])
        return GateBatch(np.concatenate([gate.images, gate.images]), titles, labels)


@dataclass(frozen=True)
class GateBatch:
    """The gate's inputs and labels, row by row."""

    images: np.ndarray
    titles: np.ndarray | None  # a title model's ids, all-zero rows without a title
    labels: np.ndarray | None

    @property
    def titled(self) -> np.ndarray | None:
        """Which rows carry a title (None for a model that reads no titles)."""
        return None if self.titles is None else has_title(self.titles)


def export_images(
    ckpt: Any,
    *,
    gate_count: int,
    calibration_count: int,
    data: str | Path | None = None,
    shipped: str | Path | None = None,
    synthetic_calibration: bool = False,
    seed: int = 0,
) -> ExportImages:
    """Gate and calibration photos for ``ckpt`` (a ``training.checkpoint.Checkpoint``); ``shipped``: the
    folder of photos shipped beside it, used when neither ``data`` nor its training data is on disk; see
    the module doc."""

    pre, rng = ckpt.preprocessing, np.random.default_rng(seed)
    trained_on = ckpt.config.get("data")
    if data is None and not (trained_on and Path(trained_on).exists()) and shipped is not None:
        data = shipped
    if data is not None:
        samples = _catalogue_samples(Path(data))
        order = rng.permutation(len(samples))
        calib = [samples[int(i)] for i in sorted(order[:calibration_count])]
        gate = [samples[int(i)] for i in sorted(order[calibration_count : calibration_count + gate_count])]
        where = f"photos shipped with the model ({data})" if data is shipped else f"--calibration-data {data}"
        gate_where, calib_where = where, where
        origin = catalogue_origin(data)
    elif trained_on and Path(trained_on).exists():
        _, train, val = prepare_data(checkpoint_config(ckpt))
        gate = [val[int(i)] for i in sorted(rng.permutation(len(val))[:gate_count])]
        calib = [train[int(i)] for i in sorted(rng.permutation(len(train))[:calibration_count])]
        gate_where = f"validation split of {ckpt.config['data']}"
        calib_where = f"training split of {ckpt.config['data']}"
        origin = catalogue_origin(ckpt.config["data"])
    else:
        renders = synthetic(
            pre, gate_count + (calibration_count if synthetic_calibration else 0), seed, ckpt=ckpt
        )
        first, rest = renders.split(gate_count)
        gate_set = replace(first, source=renders.source + " [synthetic: not real photos]")
        calibration = (
            replace(rest, source=renders.source + " [synthetic: asked by --synthetic-calibration]")
            if synthetic_calibration
            else None
        )
        return ExportImages(gate_set, None, calibration)
    if len(gate) < 2:
        raise ExportError(f"{gate_where}: only {len(gate)} labelled photos for the checks; need at least 2")
    note = "" if origin is PhotoOrigin.REAL else ", a `fashion synth` catalogue: renders, not real photos"
    gate_set = _decode(ckpt, gate, f"{gate_where} ({len(gate)} photos{note})", "decode gate photos", origin)
    calib_set = (
        _decode(
            ckpt, calib, f"{calib_where} ({len(calib)} photos{note})", "decode calibration photos", origin
        )
        if calib
        else None
    )
    return ExportImages(gate_set, encode_known(ckpt.schema, gate), calib_set)


def _catalogue_samples(path: Path) -> list[Any]:

    try:
        cat = read_catalogue(path)
    except DatasetError as e:
        raise ExportError(f"--calibration-data {path}: {e}") from e
    if not cat.samples:
        raise ExportError(f"--calibration-data {path}: no usable images")
    return cat.samples


def _decode(ckpt: Any, samples: list[Any], source: str, desc: str, origin: PhotoOrigin) -> ImageSet:
    """The samples' photos through the checkpoint's preprocessing, with their titles (``Sample.title``)."""
    images = ImageCache.build([s.image_path for s in samples], ckpt.preprocessing, desc=desc).images
    return ImageSet(images, source, origin, title_ids(ckpt, [s.title for s in samples]))
