"""What the training-side commands resolve before they work: the device, and the catalogue split exactly as
``fashion train`` made it (for training, and again for evaluation, calibration, the novelty gate, the export's
accuracy gate and the bench). Below ``train``, ``evaluate``, ``calibrate``, ``predict`` and ``unseen``,
so that
none of them imports another's internals back.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from training.checkpoint import Checkpoint
from training.config import ConfigError, TrainConfig
from training.data import (
    Catalogue,
    DatasetError,
    Sample,
    read_catalogue,
    split_by_column,
    split_held_out,
    stratified_split,
)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def prepare_data(cfg: TrainConfig) -> tuple[Catalogue, list, list]:
    cat = read_catalogue(cfg.data, cfg.format, cfg.attributes)
    samples = cat.samples[: cfg.max_samples] if cfg.max_samples else cat.samples
    if len(samples) < 4:
        raise DatasetError(f"{cfg.data}: only {len(samples)} usable samples; need at least 4 to train")
    stratify = None if cat.category_column else cat.attributes[0]
    if not cat.category_column:
        # Stratify on the head with the most classes that is rarely missing (e.g. articleType).
        enough = 0.9 * len(samples)
        filled = [h for h in cat.attributes if sum(s.labels.get(h) is not None for s in samples) > enough]
        if filled:
            stratify = max(filled, key=lambda h: len({s.labels.get(h) for s in samples}))
    if cfg.split_by is not None and cfg.val_from is not None:
        # The later period is the drift set: neither trained on nor used to pick an epoch, a temperature or
        # a threshold; the validation split is drawn at random from the earlier period, as usual.
        samples, _, _ = split_by_column(samples, cfg.split_by, cfg.val_from)
    train, val = stratified_split(samples, stratify, cfg.val_fraction, cfg.seed)
    # Held-out classes leave after the split, so that the rest of the split is the usual one.
    train, _ = split_held_out(train, cfg.hold_out)
    val, _ = split_held_out(val, cfg.hold_out)
    return cat, train, val


def drift_samples(cfg: TrainConfig) -> list[Sample]:
    """The photos of the later period that a ``--split-by`` run never trained or validated on (known and
    unknown classes alike; ``fashion evaluate --subset drift`` scores them)."""
    if cfg.split_by is None or cfg.val_from is None:
        raise DatasetError(
            "this checkpoint was trained on a random split; a drift set needs a run trained with "
            "--split-by COLUMN --val-from VALUE"
        )
    cat = read_catalogue(cfg.data, cfg.format, cfg.attributes)
    samples = cat.samples[: cfg.max_samples] if cfg.max_samples else cat.samples
    _, later, _ = split_by_column(samples, cfg.split_by, cfg.val_from)
    return split_held_out(later, cfg.hold_out)[0]


def checkpoint_config(ckpt: Checkpoint, **overrides: Any) -> TrainConfig:
    """The training configuration stored in ``ckpt``, with ``overrides`` (``None`` values ignored)."""
    known = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in ckpt.config.items() if k in known}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "data" not in values:
        raise DatasetError("the checkpoint does not record its training data; pass --data")
    values.setdefault("out", ".")
    return TrainConfig(**values)


def validation_samples(ckpt: Checkpoint, data: str | None = None, format: str | None = None) -> list[Sample]:
    """The validation split exactly as ``fashion train`` made it (same data, seed, fraction, stratum).

    ``data`` replaces the recorded path (the same dataset in another place); the split is only the same
    when the files are the same.
    """
    cfg = checkpoint_config(ckpt, data=data, format=format)
    if not Path(cfg.data).exists():
        raise DatasetError(f"the checkpoint's training data {cfg.data} is not here; pass --data")
    _, _, val = prepare_data(cfg)
    return val
