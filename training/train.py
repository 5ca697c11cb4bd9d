"""The training loop: masked multi-head cross-entropy, AdamW with warm-up + cosine, early stopping.

Single process by default; under ``torchrun`` (``LOCAL_RANK`` set) it runs DistributedDataParallel,
with rank 0 evaluating and writing the run directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from fashion.console import emit, table
from fashion.contract import Preprocessing
from fashion.schema import MISSING, LabelSchema
from training.calibrate import calibrate_in_memory
from training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from training.config import ConfigError, TrainConfig
from training.context import prepare_data, resolve_device
from training.data import (
    build_schema,
    encode,
    split_held_out,
)
from training.dataset import ImageCache, TrainDataset, colour_is_a_target
from training.inference import collect, head_widths, image_batches
from training.metrics import evaluate_arrays
from training.model import FashionNet, build_model, pretrained_preprocessing
from training.unseen import fit_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    best_score: float
    best_epoch: int
    epochs_run: int
    val_metrics: dict[str, dict[str, float]]


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


def class_weights(labels: np.ndarray, schema: LabelSchema, mode: str) -> list[torch.Tensor | None]:
    """Per-head class weights: inverse frequency ("balanced") or Cui et al.'s effective number."""
    out: list[torch.Tensor | None] = []
    for j, a in enumerate(schema.attributes):
        if mode == "none":
            out.append(None)
            continue
        y = labels[:, j]
        counts = np.bincount(y[y != MISSING], minlength=a.num_classes).astype(np.float64)
        counts = np.maximum(counts, 1.0)
        if mode == "balanced":
            w = counts.sum() / (len(counts) * counts)
        else:
            beta = 0.999
            w = (1.0 - beta) / (1.0 - np.power(beta, counts))
        w = w / w.mean()
        out.append(torch.tensor(w, dtype=torch.float32))
    return out


def masked_loss(
    logits: dict[str, torch.Tensor],
    targets: torch.Tensor,
    schema: LabelSchema,
    weights: list[torch.Tensor | None],
    smoothing: float,
    mix: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Mean over heads of the cross-entropy over the samples that have a label for that head.

    With MixUp/CutMix (``mix = (permutation, lam)``) every head mixes its two labels with the same
    ``lam``; a missing label on one side leaves only the other side's term, weighted accordingly.
    """
    total = logits[schema.attributes[0].name].new_zeros(())
    heads = 0
    for j, a in enumerate(schema.attributes):
        y = targets[:, j]
        w = weights[j].to(y.device) if weights[j] is not None else None
        ce = nn.functional.cross_entropy(
            logits[a.name], y.clamp(min=0), weight=w, label_smoothing=smoothing, reduction="none"
        )
        present = (y != MISSING).float()
        if mix is None:
            num, den = (ce * present).sum(), present.sum()
        else:
            perm, lam = mix
            y2 = y[perm]
            ce2 = nn.functional.cross_entropy(
                logits[a.name], y2.clamp(min=0), weight=w, label_smoothing=smoothing, reduction="none"
            )
            present2 = (y2 != MISSING).float()
            num = (lam * ce * present + (1 - lam) * ce2 * present2).sum()
            den = (lam * present + (1 - lam) * present2).sum()
        if den > 0:
            total = total + num / den
            heads += 1
    return total / max(heads, 1)


def mix_batch(images: torch.Tensor, cfg: TrainConfig, rng: np.random.Generator) -> tuple[torch.Tensor, Any]:
    """MixUp or CutMix on a uint8 NHWC batch (one of them per batch when both are on)."""
    use_mixup = cfg.mixup_alpha > 0
    use_cutmix = cfg.cutmix_alpha > 0
    if not (use_mixup or use_cutmix) or len(images) < 2:
        return images, None
    perm = torch.from_numpy(rng.permutation(len(images))).to(images.device)
    if use_cutmix and (not use_mixup or rng.random() < 0.5):
        lam = float(rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha))
        h, w = images.shape[1:3]
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        mixed = images.clone()
        mixed[:, y0:y1, x0:x1] = images[perm, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
        return mixed, (perm, lam)
    lam = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
    mixed = (lam * images.float() + (1 - lam) * images[perm].float()).round().clamp(0, 255).to(torch.uint8)
    return mixed, (perm, lam)


def predict_probs(
    model: FashionNet, images: np.ndarray, device: torch.device, batch_size: int = 64
) -> dict[str, np.ndarray]:
    """Calibrated probabilities per head for a uint8 NHWC array (no augmentation)."""
    model.eval()
    return collect(model.probabilities, image_batches(images, batch_size, device), head_widths(model.schema))


def _warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _distributed() -> tuple[int, int, int]:
    if "LOCAL_RANK" not in os.environ:
        return 0, 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ["LOCAL_RANK"]), dist.get_rank(), dist.get_world_size()


# --- frozen trunk (cfg.freeze_blocks > 0) -------------------------------------------------------------


@dataclass
class TrunkCache:
    """The frozen trunk's output for every image of every view, computed once: ``acts[v * n + i]``."""

    acts: torch.Tensor  # (views * n, C, H, W) float16
    grids: torch.Tensor  # (views * n, G) float32, the colour grid of the same input
    n: int
    views: int


@torch.no_grad()
def build_trunk_cache(
    model: FashionNet,
    views: list[np.ndarray],
    blocks: int,
    device: torch.device,
    desc: str,
    batch_size: int = 64,
) -> TrunkCache:
    model.eval()
    acts: list[torch.Tensor] = []
    grids: list[torch.Tensor] = []
    total = sum(len(v) for v in views)
    with tqdm(total=total, desc=desc, leave=False) as bar:
        for images in views:
            for start in range(0, len(images), batch_size):
                h, g = model.trunk(torch.from_numpy(images[start : start + batch_size]).to(device), blocks)
                acts.append(h.to(torch.float16).cpu())
                grids.append(g.float().cpu())
                bar.update(len(h))
    return TrunkCache(torch.cat(acts), torch.cat(grids), len(views[0]), len(views))


def freeze_trunk(model: FashionNet, blocks: int) -> None:
    """The stem and the first ``blocks`` stages keep their values (and their batch-norm statistics)."""
    b = model.backbone
    for module in (b.conv_stem, b.bn1, *b.blocks[:blocks]):
        for p in module.parameters():
            p.requires_grad_(False)


def probs_from_trunk(
    model: FashionNet, cache: TrunkCache, blocks: int, device: torch.device
) -> dict[str, np.ndarray]:
    """Calibrated probabilities for view 0 of a trunk cache (validation during frozen-trunk training)."""
    model.eval()

    def step(start: int) -> dict[str, torch.Tensor]:
        h = cache.acts[start : min(start + 128, cache.n)].to(device).float()
        logits = model.from_trunk(h, cache.grids[start : start + len(h)].to(device), blocks)
        return {
            a.name: torch.softmax(logits[a.name] / model.temperature[i], dim=1)
            for i, a in enumerate(model.schema.attributes)
        }

    return collect(step, range(0, cache.n, 128), head_widths(model.schema))


def _frozen_batches(cache: TrunkCache, labels: np.ndarray, batch_size: int, rng: np.random.Generator):
    """Shuffled batches of ((trunk activations, colour grid), labels), each sample in a random view."""
    order = rng.permutation(cache.n)
    views = rng.integers(cache.views, size=cache.n)
    targets = torch.from_numpy(labels)
    for start in range(0, cache.n - batch_size + 1, batch_size):
        i = order[start : start + batch_size]
        rows = torch.from_numpy(views[i] * cache.n + i)
        yield (cache.acts[rows], cache.grids[rows]), targets[torch.from_numpy(i)]


def train(cfg: TrainConfig) -> TrainResult:
    """Train a model as ``cfg`` says and write the run directory; returns the best validation result."""
    local_rank, rank, world = _distributed()
    main_process = rank == 0
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    torch.manual_seed(cfg.seed + rank)
    rng = np.random.default_rng(cfg.seed + rank)
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)

    cat, train_samples, val_samples = prepare_data(cfg)
    resumed: Checkpoint | None = load_checkpoint(cfg.resume) if cfg.resume else None
    if resumed is not None:
        schema, pre = resumed.schema, resumed.preprocessing
    else:
        schema = build_schema(cat, train_samples, cfg.min_class_count)
        pre = preprocessing_for(cfg)
    if main_process:
        log.info("%s", cat.summary())
        log.info("split: %d train, %d validation", len(train_samples), len(val_samples))
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (run_dir / "schema.json").write_text(json.dumps(schema.to_dict(), indent=1))
        if cat.problems:
            with (run_dir / "problems.txt").open("w") as f:
                f.writelines(f"{p}\n" for p in cat.problems)

    y_train, y_val = encode(schema, train_samples), encode(schema, val_samples)
    train_paths = [s.image_path for s in train_samples]
    views = [
        ImageCache.build(
            train_paths, pre, desc=f"decode train view {v}", aspect=aspect, mirror=v % 2 == 1
        ).images
        for v, aspect in enumerate(cfg.aspect_views)
    ]
    cache_val = ImageCache.build([s.image_path for s in val_samples], pre, desc="decode val")
    train_images = views[0]  # the photos as they are: what the novelty gate is fitted on
    frozen = cfg.freeze_blocks > 0
    loader: DataLoader | None = None
    sampler = None
    if frozen:
        if world > 1 or cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
            raise ConfigError("freeze_blocks works on one process without MixUp/CutMix; set freeze_blocks: 0")
    else:
        dataset = TrainDataset(
            np.concatenate(views) if len(views) > 1 else views[0],
            np.concatenate([y_train] * len(views)),
            augment=True,
            colour_target=colour_is_a_target(schema),
        )
        sampler = (
            torch.utils.data.distributed.DistributedSampler(dataset, seed=cfg.seed) if world > 1 else None
        )
        loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            num_workers=cfg.resolved_workers,
            drop_last=len(dataset) > cfg.batch_size,
            persistent_workers=cfg.resolved_workers > 0,
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    if resumed is not None:
        model = resumed.model
    else:
        model = build_model(
            cfg.backbone,
            schema,
            pre,
            pretrained=cfg.pretrained,
            weights=cfg.weights,
            dropout=cfg.dropout,
            colour_grid=cfg.colour_grid,
        )
    model.to(device)
    trunk_train = trunk_val = None
    if frozen:
        if not model.supports_frozen_trunk() or cfg.freeze_blocks >= len(model.backbone.blocks):
            raise ConfigError(f"freeze_blocks needs an EfficientNet-style backbone with more than "
                              f"{cfg.freeze_blocks} stages; {cfg.backbone} is not one")
        freeze_trunk(model, cfg.freeze_blocks)
        trunk_train = build_trunk_cache(model, views, cfg.freeze_blocks, device, "frozen trunk, train")
        trunk_val = build_trunk_cache(
            model, [cache_val.images], cfg.freeze_blocks, device, "frozen trunk, val"
        )
    del views  # the other views live on in the loader's dataset or the trunk cache
    use_channels_last = cfg.channels_last
    if use_channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None
        )
    # The heads are small linear layers on top of a shared backbone: they converge faster with a larger
    # step (the usual fine-tuning recipe, and it matters most when the backbone starts from scratch).
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in model.backbone.parameters() if p.requires_grad]},
            {"params": model.heads.parameters(), "lr": cfg.lr * cfg.head_lr_scale},
        ],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    steps_per_epoch = max(len(loader), 1) if loader is not None else max(len(y_train) // cfg.batch_size, 1)
    scheduler = _warmup_cosine(
        optimizer, int(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch
    )
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    weights = class_weights(y_train, schema, cfg.class_weights)

    start_epoch, best_score, best_epoch = 1, -1.0, 0
    best_metrics: dict[str, dict[str, float]] = {}
    if resumed is not None and resumed.extra:
        optimizer.load_state_dict(resumed.extra["optimizer"])
        scheduler.load_state_dict(resumed.extra["scheduler"])
        start_epoch = resumed.epoch + 1
        best_score = resumed.extra.get("best_score", -1.0)
        best_epoch = resumed.extra.get("best_epoch", 0)
    started = time.monotonic()
    epochs_run = 0
    metrics_path = run_dir / "metrics.jsonl"
    for epoch in range(start_epoch, cfg.epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        train_model.train()
        losses = []
        if trunk_train is not None:
            batches = _frozen_batches(trunk_train, y_train, cfg.batch_size, rng)
        else:
            assert loader is not None  # built above whenever the trunk is not frozen
            batches = iter(loader)
        bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", total=steps_per_epoch,
                   disable=not main_process, leave=False)
        for inputs, targets in bar:
            targets = targets.to(device, non_blocking=True)
            mix = None
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                if trunk_train is not None:
                    h, grid = inputs
                    h = h.to(device).float()
                    if use_channels_last:
                        h = h.contiguous(memory_format=torch.channels_last)
                    logits = model.from_trunk(h, grid.to(device), cfg.freeze_blocks)
                else:
                    images, mix = mix_batch(inputs.to(device, non_blocking=True), cfg, rng)
                    logits = train_model(images)
                loss = masked_loss(logits, targets, schema, weights, cfg.label_smoothing, mix)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        epochs_run += 1
        stop = False
        if main_process:
            if trunk_val is not None:
                probs = probs_from_trunk(model, trunk_val, cfg.freeze_blocks, device)
            else:
                probs = predict_probs(model, cache_val.images, device)
            score, per = evaluate_arrays(schema, y_val, probs)
            record = {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)) if losses else float("nan"),
                "val_score": score,
                "lr": scheduler.get_last_lr()[0],
                "val": {k: {"accuracy": v["accuracy"], "macro_f1": v["macro_f1"]} for k, v in per.items()},
            }
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            log.info("epoch %d: train_loss %.4f val_score %.4f", epoch, record["train_loss"], score)
            extra = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "best_score": max(best_score, score),
                "best_epoch": epoch if score > best_score else best_epoch,
            }
            ckpt = Checkpoint(model, cfg.backbone, cfg.to_dict(), epoch, score, per, extra=extra)
            if score > best_score:
                best_score, best_epoch, best_metrics = score, epoch, per
                best = Checkpoint(model, cfg.backbone, cfg.to_dict(), epoch, score, per)
                save_checkpoint(run_dir / "best.pt", best)
            save_checkpoint(run_dir / "last.pt", ckpt)
            out_of_patience = cfg.patience > 0 and epoch - best_epoch >= cfg.patience
            out_of_time = (
                cfg.time_budget_min is not None and time.monotonic() - started > 60 * cfg.time_budget_min
            )
            if out_of_patience:
                log.info("early stop: no better validation score for %d epochs", cfg.patience)
            if out_of_time:
                log.info("stopping: the time budget of %.1f min is spent", cfg.time_budget_min)
            stop = out_of_patience or out_of_time
        if world > 1:
            flag = torch.tensor([int(stop)], device=device)
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        if stop:
            break
    if main_process:
        rows = [
            [name, m["support"], f"{m['accuracy']:.3f}", f"{m['macro_f1']:.3f}", f"{m['harmonic_f1']:.3f}"]
            for name, m in best_metrics.items()
        ]
        emit(table(["attribute", "val n", "accuracy", "macro F1", "harmonic F1"], rows))
        emit(f"best validation score {best_score:.4f} at epoch {best_epoch}; run directory {run_dir}")
        if (run_dir / "best.pt").is_file():
            # Per-head temperatures and abstain thresholds for best.pt, fitted on the validation split.

            calibrate_in_memory(run_dir / "best.pt", cache_val.images, y_val, device=device)
            if cfg.novelty_quantile > 0:
                # The gate against unseen product types, measured on the held-out classes if any.

                held = [s.image_path for s in split_held_out(cat.samples, cfg.hold_out)[1]]
                held_images = ImageCache.build(held, pre, desc="decode held-out").images
                fit_checkpoint(run_dir / "best.pt", run_dir / "best.pt", train_images, y_train,
                               cache_val.images, held_images, quantile=cfg.novelty_quantile,
                               heads=cfg.novelty_heads or None, device=device)
    if world > 1:
        dist.destroy_process_group()
    return TrainResult(run_dir, best_score, best_epoch, epochs_run, best_metrics)
