"""Where training batches come from: one interface, two strategies.

``train`` asks a ``BatchSource`` for the batches of an epoch, the training forward pass of a batch, the
served probabilities of the validation photos and the number of steps per epoch, and never which strategy
it holds:

- ``ImageSource``: the decoded photos through a ``DataLoader`` with label-respecting augmentation
  (``training.dataset``), MixUp/CutMix, and DistributedDataParallel under torchrun;
- ``TrunkSource`` (``freeze_blocks > 0``, CPU fine-tuning): the stem and the first stages keep their
  pretrained values, their output for every photo of every view is computed once (``TrunkCache``), and
  only the later stages and the heads train, on batches drawn from that cache.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from training.config import ConfigError, TrainConfig
from training.dataset import TrainDataset, colour_is_a_target
from training.inference import collect, head_widths, image_batches
from training.loss import Mix
from training.model import FashionNet
from training.runtime import Run

VALIDATION_BATCH = 64  # photos per validation forward pass
TRUNK_VALIDATION_BATCH = 128  # cached trunk activations per validation pass (no stem to run)


@dataclass(frozen=True)
class Batch:
    """One training step's input, on the device."""

    inputs: tuple[torch.Tensor, ...]  # what the source's ``logits`` reads: images, or cached activations
    targets: torch.Tensor  # (n, heads) class indices, MISSING where absent
    mix: Mix | None = None  # MixUp/CutMix applied to ``inputs``, for the loss


class BatchSource(Protocol):
    """What the training loop needs from the photos (module docstring)."""

    @property
    def steps_per_epoch(self) -> int: ...

    def batches(self, epoch: int) -> Iterator[Batch]:
        """The batches of ``epoch`` (1-based), with the model in training mode."""
        ...

    def logits(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The training forward pass: logits per head."""
        ...

    def validation_probabilities(self) -> dict[str, np.ndarray]:
        """What the model serves for the validation photos (``FashionNet.served_probabilities``), per head;
        leaves the model in eval mode."""
        ...


def check_settings(cfg: TrainConfig, world: int) -> None:
    """Refuse, before any photo is decoded, settings the chosen source cannot honour."""
    if cfg.freeze_blocks > 0 and (world > 1 or cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0):
        raise ConfigError("freeze_blocks works on one process without MixUp/CutMix; set freeze_blocks: 0")


def make_source(
    cfg: TrainConfig, run: Run, model: FashionNet, views: Sequence[np.ndarray], labels: np.ndarray,
    val_images: np.ndarray,
) -> BatchSource:
    """The source ``cfg`` asks for, over the training photos' ``views`` (uint8 NHWC, one array per aspect
    view, rows aligned with ``labels``) and the validation photos. Puts the model in its training memory
    format; nothing else of it changes, except the frozen trunk's ``requires_grad``."""
    if cfg.freeze_blocks > 0:
        return TrunkSource.build(cfg, run, model, views, labels, val_images)
    return ImageSource.build(cfg, run, model, views, labels, val_images)


def _channels_last(model: FashionNet, cfg: TrainConfig) -> None:
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # a documented overload


# --- decoded photos ---------------------------------------------------------------------------------


def mix_batch(
    images: torch.Tensor, cfg: TrainConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, Mix | None]:
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


class ImageSource:
    """Augmented decoded photos through a DataLoader (a DistributedSampler under torchrun)."""

    def __init__(
        self, cfg: TrainConfig, run: Run, model: FashionNet, train_model: nn.Module,
        loader: DataLoader, sampler: DistributedSampler | None, val_images: np.ndarray,
    ) -> None:
        self.cfg, self.run, self.model, self.train_model = cfg, run, model, train_model
        self.loader, self.sampler, self.val_images = loader, sampler, val_images

    @classmethod
    def build(
        cls, cfg: TrainConfig, run: Run, model: FashionNet, views: Sequence[np.ndarray], labels: np.ndarray,
        val_images: np.ndarray,
    ) -> ImageSource:
        dataset = TrainDataset(
            np.concatenate(views) if len(views) > 1 else views[0],
            np.concatenate([labels] * len(views)),
            augment=True,
            colour_target=colour_is_a_target(model.schema),
        )
        sampler: DistributedSampler | None = None
        if run.world > 1:
            sampler = DistributedSampler(dataset, seed=cfg.seed)
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
        _channels_last(model, cfg)
        train_model: nn.Module = model
        if run.world > 1:
            device_ids = [run.local_rank] if run.device.type == "cuda" else None
            train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return cls(cfg, run, model, train_model, loader, sampler, val_images)

    @property
    def steps_per_epoch(self) -> int:
        return max(len(self.loader), 1)

    def batches(self, epoch: int) -> Iterator[Batch]:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self.train_model.train()
        device = self.run.device
        for images, targets in self.loader:
            targets = targets.to(device, non_blocking=True)
            mixed, mix = mix_batch(images.to(device, non_blocking=True), self.cfg, self.run.rng)
            yield Batch((mixed,), targets, mix)

    def logits(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.train_model(batch.inputs[0])

    def validation_probabilities(self) -> dict[str, np.ndarray]:
        model = self.model.eval()
        batches = image_batches(self.val_images, VALIDATION_BATCH, self.run.device)
        return collect(model.probabilities, batches, head_widths(model.schema))


# --- the frozen trunk's cached features ---------------------------------------------------------------


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
    views: Sequence[np.ndarray],
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
    b: Any = model.backbone  # an EfficientNet-style timm model (``FashionNet.supports_frozen_trunk``)
    for module in (b.conv_stem, b.bn1, *b.blocks[:blocks]):
        for p in module.parameters():
            p.requires_grad_(False)


def frozen_batches(
    cache: TrunkCache, labels: np.ndarray, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Shuffled batches of ((trunk activations, colour grid), labels), each sample in a random view."""
    order = rng.permutation(cache.n)
    views = rng.integers(cache.views, size=cache.n)
    targets = torch.from_numpy(labels)
    for start in range(0, cache.n - batch_size + 1, batch_size):
        i = order[start : start + batch_size]
        rows = torch.from_numpy(views[i] * cache.n + i)
        yield (cache.acts[rows], cache.grids[rows]), targets[torch.from_numpy(i)]


class TrunkSource:
    """Batches of the frozen trunk's cached output; the later stages and the heads train on them."""

    def __init__(
        self, cfg: TrainConfig, run: Run, model: FashionNet, train: TrunkCache, val: TrunkCache,
        labels: np.ndarray,
    ) -> None:
        self.cfg, self.run, self.model = cfg, run, model
        self.train, self.val, self.labels = train, val, labels
        self.blocks = cfg.freeze_blocks

    @classmethod
    def build(
        cls, cfg: TrainConfig, run: Run, model: FashionNet, views: Sequence[np.ndarray], labels: np.ndarray,
        val_images: np.ndarray,
    ) -> TrunkSource:
        blocks = cfg.freeze_blocks
        if not model.supports_frozen_trunk() or blocks >= len(cast(Any, model.backbone).blocks):
            raise ConfigError(f"freeze_blocks needs an EfficientNet-style backbone with more than "
                              f"{blocks} stages; {cfg.backbone} is not one")
        freeze_trunk(model, blocks)
        train = build_trunk_cache(model, views, blocks, run.device, "frozen trunk, train")
        val = build_trunk_cache(model, [val_images], blocks, run.device, "frozen trunk, val")
        _channels_last(model, cfg)
        return cls(cfg, run, model, train, val, labels)

    @property
    def steps_per_epoch(self) -> int:
        return max(len(self.labels) // self.cfg.batch_size, 1)

    def batches(self, epoch: int) -> Iterator[Batch]:
        self.model.train()
        device = self.run.device
        for (h, grid), targets in frozen_batches(self.train, self.labels, self.cfg.batch_size, self.run.rng):
            h = h.to(device).float()
            if self.cfg.channels_last:
                h = h.contiguous(memory_format=torch.channels_last)
            yield Batch((h, grid.to(device)), targets.to(device, non_blocking=True))

    def logits(self, batch: Batch) -> dict[str, torch.Tensor]:
        h, grid = batch.inputs
        return self.model.from_trunk(h, grid, self.blocks)

    def validation_probabilities(self) -> dict[str, np.ndarray]:
        model, cache, device = self.model.eval(), self.val, self.run.device

        def step(start: int) -> dict[str, torch.Tensor]:
            h = cache.acts[start : min(start + TRUNK_VALIDATION_BATCH, cache.n)].to(device).float()
            grid = cache.grids[start : start + len(h)].to(device)
            pooled, features = model.embed_from_trunk(h, grid, self.blocks)
            return model.served_probabilities(model.head_logits(features), pooled)

        return collect(step, range(0, cache.n, TRUNK_VALIDATION_BATCH), head_widths(model.schema))

