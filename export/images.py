"""Images for the parity check, INT8 calibration and the accuracy gate, through the preprocessing contract.

``export_images`` picks, in order of preference:

1. ``--calibration-data`` (any layout ``training.data.read_catalogue`` reads): calibration photos and a
   disjoint set of labelled gate photos from it;
2. the dataset the checkpoint was trained on (its ``config["data"]``), when it is still on disk:
   calibration from the training split, the gate on the validation split — the photos the model card's
   numbers come from;
3. otherwise freshly rendered synthetic products (``training.synth``): enough for the FP32 parity check,
   but never used to calibrate INT8 or to pass a reduced precision unless asked
   (``--synthetic-calibration``), and then the metadata says so.

Where the photos come from is recorded truthfully (``fashion.metadata.PhotoOrigin``): a catalogue written
by ``fashion synth`` (its ``training.synth.MARKER`` file) holds renders, not real photos, and counts as
synthetic like the export's own renders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ExportError
from fashion.contract import Preprocessing, resize, to_rgb
from fashion.metadata import ExportPhotos, PhotoOrigin, PhotoSet
from training.context import checkpoint_config, prepare_data
from training.data import DatasetError, read_catalogue
from training.dataset import ImageCache
from training.evaluate import encode_known
from training.synth import MARKER, render, sample_rows


@dataclass(frozen=True)
class ImageSet:
    """uint8 NHWC images, where they came from and whether they are real photos (recorded)."""

    images: np.ndarray
    source: str
    origin: PhotoOrigin = PhotoOrigin.REAL

    def record(self) -> PhotoSet:
        return PhotoSet(self.source, len(self.images), self.origin)


def synthetic(pre: Preprocessing, count: int, seed: int = 0, start_id: int = 100_000) -> ImageSet:
    """Rendered synthetic products with ids from ``start_id`` (beyond what ``fashion synth`` writes)."""

    rows = sample_rows(count, seed, start_id=start_id)
    images = np.stack([resize(to_rgb(render(row, seed)[0], pre.fill), pre) for row in rows])
    return ImageSet(images, f"synthetic renders (seed {seed}, {count} images)", PhotoOrigin.SYNTHETIC_RENDERS)


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


def export_images(
    ckpt: Any,
    *,
    gate_count: int,
    calibration_count: int,
    data: str | Path | None = None,
    synthetic_calibration: bool = False,
    seed: int = 0,
) -> ExportImages:
    """Gate and calibration photos for ``ckpt`` (a ``training.checkpoint.Checkpoint``); see the module doc."""

    pre, rng = ckpt.preprocessing, np.random.default_rng(seed)
    if data is not None:
        samples = _catalogue_samples(Path(data))
        order = rng.permutation(len(samples))
        calib = [samples[int(i)] for i in sorted(order[:calibration_count])]
        gate = [samples[int(i)] for i in sorted(order[calibration_count : calibration_count + gate_count])]
        where = f"--calibration-data {data}"
        gate_where, calib_where = where, where
        origin = catalogue_origin(data)
    elif ckpt.config.get("data") and Path(ckpt.config["data"]).exists():
        _, train, val = prepare_data(checkpoint_config(ckpt))
        gate = [val[int(i)] for i in sorted(rng.permutation(len(val))[:gate_count])]
        calib = [train[int(i)] for i in sorted(rng.permutation(len(train))[:calibration_count])]
        gate_where = f"validation split of {ckpt.config['data']}"
        calib_where = f"training split of {ckpt.config['data']}"
        origin = catalogue_origin(ckpt.config["data"])
    else:
        renders = synthetic(pre, gate_count + (calibration_count if synthetic_calibration else 0), seed)
        kind = PhotoOrigin.SYNTHETIC_RENDERS
        gate_set = ImageSet(
            renders.images[:gate_count], renders.source + " [synthetic: not real photos]", kind
        )
        calibration = (
            ImageSet(
                renders.images[gate_count:],
                renders.source + " [synthetic: asked by --synthetic-calibration]",
                kind,
            )
            if synthetic_calibration
            else None
        )
        return ExportImages(gate_set, None, calibration)
    if len(gate) < 2:
        raise ExportError(f"{gate_where}: only {len(gate)} labelled photos for the checks; need at least 2")
    note = "" if origin is PhotoOrigin.REAL else ", a `fashion synth` catalogue: renders, not real photos"
    gate_set = _decode(gate, pre, f"{gate_where} ({len(gate)} photos{note})", "decode gate photos", origin)
    calib_set = (
        _decode(calib, pre, f"{calib_where} ({len(calib)} photos{note})", "decode calibration photos", origin)
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


def _decode(samples: list[Any], pre: Preprocessing, source: str, desc: str, origin: PhotoOrigin) -> ImageSet:

    return ImageSet(ImageCache.build([s.image_path for s in samples], pre, desc=desc).images, source, origin)
