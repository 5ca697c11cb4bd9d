"""Training configuration: a frozen dataclass; defaults < YAML file < command-line flags."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from training.data import FORMATS
from training.model import BACKBONES

CLASS_WEIGHTS = ("none", "balanced", "effective")


class ConfigError(ValueError):
    """A setting is invalid; raised before any work starts."""


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out: str
    format: str = "auto"
    attributes: tuple[str, ...] | None = None
    backbone: str = "efficientnet_b0"
    pretrained: bool = False
    weights: str | None = None
    image_size: int = 224
    resize_mode: str = "letterbox"
    trim: int = 24  # crop plain light margins before resizing (fashion.contract.Preprocessing.trim); 0: off
    interpolation: str | None = None  # None: what the backbone's published weights expect
    epochs: int = 20
    batch_size: int = 16  # small batches = more updates per epoch; raise it on a GPU
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    class_weights: str = "none"
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    dropout: float = 0.2
    colour_grid: int = 4  # heads also see the mean colour of a grid×grid layout of the input; 0: off
    head_lr_scale: float = 10.0  # heads learn this many times faster than the backbone
    grad_clip: float = 5.0
    patience: int = 5  # early stopping: epochs without a better validation score
    min_class_count: int = 5  # rarer classes fold into "other"; 0 or 1 turns folding off
    val_fraction: float = 0.2
    seed: int = 0
    workers: int = -1  # DataLoader workers; -1: one per spare core
    device: str = "auto"
    amp: bool = True  # mixed precision, on CUDA only
    channels_last: bool = True
    resume: str | None = None
    time_budget_min: float | None = None  # stop after this many minutes (the last epoch finishes)
    max_samples: int | None = None  # use only the first N usable rows (quick experiments)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone must be one of {sorted(BACKBONES)}, got {self.backbone!r}")
        if self.class_weights not in CLASS_WEIGHTS:
            raise ConfigError(f"class_weights must be one of {CLASS_WEIGHTS}, got {self.class_weights!r}")
        for name in ("epochs", "batch_size", "image_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.attributes is not None:
            object.__setattr__(self, "attributes", tuple(self.attributes))

    @property
    def resolved_workers(self) -> int:
        return max(0, (os.cpu_count() or 1) - 1) if self.workers < 0 else self.workers

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["attributes"] is not None:
            d["attributes"] = list(d["attributes"])
        return d

    @classmethod
    def from_sources(cls, config_file: str | None, overrides: dict[str, Any]) -> TrainConfig:
        """Defaults, then the YAML file, then explicit overrides (flags given on the command line)."""
        values: dict[str, Any] = {}
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise ConfigError(f"config file {path} not found")
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path} must hold a mapping of setting: value")
            values.update({k.replace("-", "_"): v for k, v in loaded.items()})
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown settings {unknown}; known: {sorted(known)}")
        for required in ("data", "out"):
            if required not in values:
                raise ConfigError(f"'{required}' is required (flag --{required} or the config file)")
        return cls(**values)
