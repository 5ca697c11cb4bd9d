"""``fashion train``: a short sequence of typed steps.

1. ``start_run`` (``training.runtime``): process group, device, seeds, run directory;
2. ``prepare``: the split, the label schema and the preprocessing contract (or those of ``--resume``'s
   checkpoint), written into the run directory;
3. ``decode``: the training photos once per aspect view and the validation photos, through the contract;
4. ``build_or_resume``: a new model, or the resumed one, on the device;
5. ``make_source`` (``training.sources``): where batches come from — decoded photos through a DataLoader,
   or the frozen trunk's cached features;
6. ``make_optimisation`` and ``Progress.resume``, then ``run_epochs`` (``training.loop``): AdamW with
   warm-up + cosine, masked multi-head cross-entropy, validation, ``best.pt``/``last.pt``, early stopping;
7. on the main process: the summary table, then ``correct_best`` (``prior_correction``: the training class
   mix divided out), ``calibrate_best`` (per-head temperatures and abstain thresholds; a title model's
   title temperatures and conflict thresholds) and ``fit_gate`` (the novelty gate against unseen product
   types) on ``best.pt``.

Single process by default; under ``torchrun`` (``LOCAL_RANK`` set) it runs DistributedDataParallel,
with rank 0 evaluating and writing the run directory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from fashion.console import emit, table
from fashion.contract import Preprocessing
from fashion.schema import LabelSchema
from fashion.text import TitleTokenizer, tokenize_all
from training.calibrate import HeadCalibration, calibrate_in_memory
from training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from training.config import ConfigError, TrainConfig
from training.context import prepare_data
from training.data import Catalogue, Sample, build_schema, encode, split_held_out
from training.dataset import ImageCache
from training.loop import EpochCallback, Metrics, Progress, make_optimisation, run_epochs
from training.model import FashionNet, build_model, pretrained_preprocessing
from training.priors import correct_priors
from training.runtime import Run, end_run, start_run
from training.sources import Paths, check_settings, make_source
from training.title import TitleEncoder, Titles
from training.unseen import NoveltyReport, fit_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    best_score: float
    best_epoch: int
    epochs_run: int
    val_metrics: Metrics  # of the best epoch
    calibration: tuple[HeadCalibration, ...] = ()  # of best.pt, on the validation split
    novelty: NoveltyReport | None = None  # the gate fitted into best.pt, if any


def preprocessing_for(cfg: TrainConfig) -> Preprocessing:
    """The contract: size, mean/std and interpolation from the backbone's pretrained config (what its
    weights expect), unless the configuration sets the size or interpolation; resize and trim from it."""
    base = pretrained_preprocessing(cfg.backbone)
    return Preprocessing(
        image_size=cfg.image_size or base["image_size"],
        resize_mode=cfg.resize_mode,
        interpolation=cfg.interpolation or base["interpolation"],
        mean=base["mean"],
        std=base["std"],
        trim=cfg.trim,
    )


@dataclass(frozen=True)
class Prepared:
    """The split and what the model is built from."""

    catalogue: Catalogue
    train_paths: list[str]
    val_paths: list[str]
    y_train: np.ndarray  # (n, heads) class indices, MISSING where absent
    y_val: np.ndarray
    schema: LabelSchema
    preprocessing: Preprocessing
    resumed: Checkpoint | None  # ``--resume``'s checkpoint: its schema, contract and model are kept
    titles: Titles | None = None  # ``cfg.title``: the title ids of both splits


def read_titles(
    cfg: TrainConfig, train: list[Sample], val: list[Sample], resumed: Checkpoint | None
) -> Titles:
    """Tokenise both splits' titles (the resumed model's tokenizer, or a new one as ``cfg`` says)."""
    if resumed is not None and resumed.model.title is not None:
        tokenizer = resumed.model.title.tokenizer
    else:
        tokenizer = TitleTokenizer(buckets=cfg.title_buckets)
    if not any(s.title for s in train):
        raise ConfigError(
            f"--title: no training row of {cfg.data} has a title (styles.csv's productDisplayName, or a "
            f"'title' column in a plain CSV); the Meesho layout has none: train without --title"
        )
    return Titles(tokenizer, tokenize_all(tokenizer, [s.title for s in train]),
                  tokenize_all(tokenizer, [s.title for s in val]))


def prepare(cfg: TrainConfig, run: Run) -> Prepared:
    """Read and split the catalogue; the schema and contract (new, or the resumed checkpoint's); on the main
    process, ``config.yaml``, ``schema.json`` and ``problems.txt`` in the run directory."""
    cat, train_samples, val_samples = prepare_data(cfg)
    resumed = load_checkpoint(cfg.resume) if cfg.resume else None
    if resumed is not None:
        schema, pre = resumed.schema, resumed.preprocessing
    else:
        schema, pre = build_schema(cat, train_samples, cfg.min_class_count), preprocessing_for(cfg)
    if run.main:
        log.info("%s", cat.summary())
        log.info("split: %d train, %d validation", len(train_samples), len(val_samples))
        (run.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (run.run_dir / "schema.json").write_text(json.dumps(schema.to_dict(), indent=1))
        if cat.problems:
            with (run.run_dir / "problems.txt").open("w") as f:
                f.writelines(f"{p}\n" for p in cat.problems)
    titles = read_titles(cfg, train_samples, val_samples, resumed) if cfg.title else None
    return Prepared(cat, [s.image_path for s in train_samples], [s.image_path for s in val_samples],
                    encode(schema, train_samples), encode(schema, val_samples), schema, pre, resumed, titles)


@dataclass(frozen=True)
class Photos:
    """The decoded photos (uint8 NHWC). ``views[0]`` is the training photos as they are."""

    views: list[np.ndarray]  # one per ``cfg.aspect_views``, rows aligned with ``Prepared.y_train``
    val: np.ndarray


def decode(cfg: TrainConfig, data: Prepared) -> Photos:
    pre = data.preprocessing
    views = [
        ImageCache.build(
            data.train_paths, pre, desc=f"decode train view {v}", aspect=aspect, mirror=v % 2 == 1
        ).images
        for v, aspect in enumerate(cfg.aspect_views)
    ]
    return Photos(views, ImageCache.build(data.val_paths, pre, desc="decode val").images)


def build_or_resume(cfg: TrainConfig, data: Prepared, run: Run) -> FashionNet:
    """The resumed model, or a new one as ``cfg`` says; on the run's device."""
    if data.resumed is not None:
        model = data.resumed.model
    else:
        title = TitleEncoder(data.titles.tokenizer, cfg.title_dim) if data.titles is not None else None
        model = build_model(cfg.backbone, data.schema, data.preprocessing, pretrained=cfg.pretrained,
                            weights=cfg.weights, dropout=cfg.dropout, colour_grid=cfg.colour_grid,
                            title=title, colour_hist=cfg.colour_hist)
    return model.to(run.device)


def emit_summary(progress: Progress, run_dir: Path) -> None:
    rows = [
        [name, m["support"], f"{m['accuracy']:.3f}", f"{m['macro_f1']:.3f}", f"{m['harmonic_f1']:.3f}"]
        for name, m in progress.best_metrics.items()
    ]
    emit(table(["attribute", "val n", "accuracy", "macro F1", "harmonic F1"], rows))
    best = f"best validation score {progress.best_score:.4f} at epoch {progress.best_epoch}"
    emit(f"{best}; run directory {run_dir}")


def correct_best(cfg: TrainConfig, best: Path, data: Prepared) -> None:
    """``cfg.prior_correction`` folded into ``best.pt``'s heads (``training.priors``), before calibration."""
    if cfg.prior_correction > 0:
        ckpt = load_checkpoint(best)
        correct_priors(ckpt, cfg.prior_correction, data.y_train)
        save_checkpoint(best, ckpt)


def calibrate_best(
    cfg: TrainConfig, best: Path, data: Prepared, val_images: np.ndarray, run: Run
) -> list[HeadCalibration]:
    """Per-head temperatures and abstain thresholds for ``best.pt``, fitted on the validation split (and,
    with titles, the temperatures of image + title requests on the same photos with their titles)."""
    titles = data.titles.val if data.titles is not None else None
    # cfg.always_uncertain (recorded in the checkpoint's config) is applied by the calibration itself
    return calibrate_in_memory(best, val_images, data.y_val, device=run.device, titles=titles)


def fit_gate(
    cfg: TrainConfig, best: Path, data: Prepared, train_images: np.ndarray, val_images: np.ndarray, run: Run
) -> NoveltyReport | None:
    """The novelty gate against unseen product types, fitted into ``best.pt`` and measured on the held-out
    classes if any (``cfg.novelty_quantile`` 0: no gate)."""
    if cfg.novelty_quantile <= 0:
        return None
    held = [s.image_path for s in split_held_out(data.catalogue.samples, cfg.hold_out)[1]]
    held_images = ImageCache.build(held, data.preprocessing, desc="decode held-out").images
    return fit_checkpoint(best, best, train_images, data.y_train, val_images, held_images,
                          quantile=cfg.novelty_quantile, heads=cfg.novelty_heads or None, device=run.device)


def train(cfg: TrainConfig, on_epoch: EpochCallback | None = None) -> TrainResult:
    """Train a model as ``cfg`` says and write the run directory; returns the best validation result.
    ``on_epoch`` (``training.loop.EpochCallback``) sees each epoch's validation record and may stop it."""
    run = start_run(cfg)
    check_settings(cfg, run.world)
    data = prepare(cfg, run)
    photos = decode(cfg, data)
    model = build_or_resume(cfg, data, run)
    source = make_source(cfg, run, model, photos.views, data.y_train, photos.val, data.titles,
                         Paths(data.train_paths, data.val_paths))
    train_images, val_images = photos.views[0], photos.val  # the gate is fitted on the photos as they are
    del photos  # the other views live on in the source (its dataset or its trunk cache) only
    opt = make_optimisation(cfg, model, data.y_train, source.steps_per_epoch, run.device)
    progress = run_epochs(cfg, run, model, source, opt, Progress.resume(data.resumed, opt), data.y_val,
                          on_epoch)
    calibration: list[HeadCalibration] = []
    novelty = None
    best = run.run_dir / "best.pt"
    if run.main:
        emit_summary(progress, run.run_dir)
        if best.is_file():
            correct_best(cfg, best, data)
            calibration = calibrate_best(cfg, best, data, val_images, run)
            novelty = fit_gate(cfg, best, data, train_images, val_images, run)
    end_run(run)
    return TrainResult(run.run_dir, progress.best_score, progress.best_epoch, progress.epochs_run,
                       progress.best_metrics, tuple(calibration), novelty)
