"""Training configuration: a frozen dataclass; defaults < YAML file < command-line flags."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from fashion.errors import UserError
from fashion.host import usable_cores
from training.data import FORMATS
from training.model import BACKBONES

CLASS_WEIGHTS = ("none", "balanced", "effective")


class ConfigError(UserError, ValueError):
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
    image_size: int | None = None  # None: the backbone's pretrained input size (timm's pretrained config)
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
    colour_hist: int = 0  # and the product's colour histogram over colour_hist³ RGB bins; 0: off
    head_lr_scale: float = 10.0  # heads learn this many times faster than the backbone
    grad_clip: float = 5.0
    patience: int = 5  # early stopping: epochs without a better validation score
    min_class_count: int = 5  # rarer classes fold into "other"; 0 or 1 turns folding off
    val_fraction: float = 0.2
    # A split by period instead of a random one: rows whose ``split_by`` column (e.g. ``year``) is below
    # ``val_from`` train, the rest validate (``--split-by year --val-from 2012``); None: random split.
    split_by: str | None = None
    val_from: str | None = None
    seed: int = 0
    workers: int = -1  # DataLoader workers; -1: one per spare core
    device: str = "auto"
    amp: bool = True  # mixed precision, on CUDA only
    channels_last: bool = True
    resume: str | None = None
    time_budget_min: float | None = None  # stop after this many minutes (the last epoch finishes)
    max_samples: int | None = None  # use only the first N usable rows (quick experiments)
    # Fine-tuning on a CPU: the stem and the first ``freeze_blocks`` stages keep their pretrained values;
    # their output is computed once per training view and cached, and only the later stages and the
    # heads train (about 4x fewer FLOPs per step for EfficientNet-Lite0 with 4 of its 7 stages frozen).
    freeze_blocks: int = 0
    # Each training photo is decoded once per value, its height multiplied by it before the contract
    # (1.0: as it is; 1.3333: undoes a 3:4 photo stretched to a square). Every other view is mirrored.
    aspect_views: tuple[float, ...] = (1.0,)
    # Held-out classes ("attribute=class", e.g. "articleType=Watches"): their photos are left out of
    # training and validation and used to measure how often unseen product types are flagged uncertain.
    hold_out: tuple[str, ...] = ()
    # The novelty gate (training.novelty): photos farther from every known product type than this quantile
    # of the validation photos are flagged uncertain on ``novelty_heads`` (empty: the schema's product-type
    # head, ``fashion.schema.Role``: articleType in the Kaggle layout). 0 turns the gate off.
    novelty_quantile: float = 0.97
    novelty_heads: tuple[str, ...] = ()
    # The listing's title as a second input (training.title, fashion.text): hashed word and character
    # n-grams in ``title_buckets`` ids, an embedding bag of ``title_dim``. Every batch trains the heads
    # twice, with its titles and with them dropped, so one model serves image-only and image + title
    # requests; title-only heads (weight ``title_loss``) say when a photo and its title disagree.
    title: bool = False
    title_buckets: int = 8192
    title_dim: int = 64
    title_loss: float = 0.5
    # An image + title answer is the fused heads' calibrated logits plus this many times the title-only
    # heads' (a product of experts, set at calibration): 1 = the two weigh equally, 0 = the fused heads
    # alone, which follow the photo when a title is wrong (the model card measures both).
    title_blend: float = 1.0
    # Logit adjustment (Menon et al., ICLR 2021): the loss sees logits + tau * log(training prior), so the
    # served logits estimate the class from the photo with the training catalogue's class mix divided out
    # — what holds when a later catalogue has another mix of genders and categories. 0: off.
    logit_adjust: float = 0.0
    # Post-hoc prior correction (training.priors): after training, ``tau * log prior`` is subtracted from
    # every head's bias of best.pt (before calibration). 0: off.
    prior_correction: float = 0.0
    # Heads served as always ``uncertain`` (abstain threshold 1.0): kept trainable and reported, but never
    # presented as a confident tag — e.g. season, which in a catalogue is when the listing was made, not
    # something a photo shows (models/default/MODEL_CARD.md measures it on the split by year).
    always_uncertain: tuple[str, ...] = ()
    # Where the frozen trunk's activations are kept between runs (one row per photo and view; any run with
    # the same backbone, weights, frozen stages and contract reuses them). None: computed in memory per run.
    trunk_cache: str | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone must be one of {sorted(BACKBONES)}, got {self.backbone!r}")
        if self.class_weights not in CLASS_WEIGHTS:
            raise ConfigError(f"class_weights must be one of {CLASS_WEIGHTS}, got {self.class_weights!r}")
        for name in ("epochs", "batch_size", "image_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.attributes is not None:
            object.__setattr__(self, "attributes", tuple(self.attributes))
        if (self.split_by is None) != (self.val_from is None):
            raise ConfigError("split_by and val_from go together: --split-by year --val-from 2012")
        if self.val_from is not None:
            object.__setattr__(self, "val_from", str(self.val_from))
        if self.freeze_blocks < 0:
            raise ConfigError(f"freeze_blocks must be 0 or more, got {self.freeze_blocks}")
        object.__setattr__(self, "aspect_views", tuple(float(a) for a in self.aspect_views))
        if not self.aspect_views or not all(0.25 <= a <= 4 for a in self.aspect_views):
            raise ConfigError(f"aspect_views must be 1 to n values in [0.25, 4], got {self.aspect_views}")
        object.__setattr__(self, "hold_out", tuple(self.hold_out))
        object.__setattr__(self, "novelty_heads", tuple(self.novelty_heads))
        object.__setattr__(self, "always_uncertain", tuple(self.always_uncertain))
        if not 0 <= self.novelty_quantile < 1:
            raise ConfigError(f"novelty_quantile must be in [0, 1), got {self.novelty_quantile}")
        if self.title_buckets < 2 or self.title_dim < 1 or self.title_loss < 0 or self.title_blend < 0:
            raise ConfigError("title_buckets must be at least 2, title_dim positive, title_loss and "
                              "title_blend not negative")
        if self.title and self.title_loss == 0 and self.title_blend > 0:
            raise ConfigError("title_blend > 0 needs title_loss > 0: the title-only heads it adds to every "
                              "image + title answer would be untrained (set title_blend 0)")
        if self.logit_adjust < 0 or self.prior_correction < 0:
            raise ConfigError("logit_adjust and prior_correction must not be negative")
        if self.attributes is not None and not set(self.always_uncertain) <= set(self.attributes):
            raise ConfigError(f"always_uncertain names heads that are not trained: {self.always_uncertain}")
        for item in self.hold_out:
            if item.count("=") != 1 or not all(item.split("=")):
                raise ConfigError(f"hold_out entries are attribute=class, got {item!r}")

    @property
    def resolved_workers(self) -> int:
        return max(0, usable_cores() - 1) if self.workers < 0 else self.workers

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("attributes", "aspect_views", "hold_out", "novelty_heads", "always_uncertain"):
            if d[key] is not None:
                d[key] = list(d[key])
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
