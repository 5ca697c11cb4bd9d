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

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
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
from training.loss import Mix, Outputs
from training.model import FashionNet
from training.runtime import Run
from training.title import Titles

VALIDATION_BATCH = 64  # photos per validation forward pass
TRUNK_VALIDATION_BATCH = 128  # cached trunk activations per validation pass (no stem to run)


@dataclass(frozen=True)
class Batch:
    """One training step's input, on the device."""

    inputs: tuple[torch.Tensor, ...]  # what the source's ``logits`` reads: images, or cached activations
    targets: torch.Tensor  # (n, heads) class indices, MISSING where absent
    mix: Mix | None = None  # MixUp/CutMix applied to ``inputs``, for the loss
    titles: torch.Tensor | None = None  # (n, max_tokens) title ids, for a model with a title branch


class BatchSource(Protocol):
    """What the training loop needs from the photos (module docstring)."""

    @property
    def steps_per_epoch(self) -> int: ...

    def batches(self, epoch: int) -> Iterator[Batch]:
        """The batches of ``epoch`` (1-based), with the model in training mode."""
        ...

    def logits(self, batch: Batch) -> Outputs:
        """The training forward pass: logits per head (with and without titles, and of the titles alone,
        for a model with a title branch)."""
        ...

    def validation_probabilities(self, titles: bool = False) -> dict[str, np.ndarray]:
        """What the model serves for the validation photos (``FashionNet.served_probabilities``), per head,
        with their titles if ``titles`` (and the model has a title branch); leaves the model in eval mode."""
        ...


def check_settings(cfg: TrainConfig, world: int) -> None:
    """Refuse, before any photo is decoded, settings the chosen source cannot honour."""
    if cfg.freeze_blocks > 0 and (world > 1 or cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0):
        raise ConfigError("freeze_blocks works on one process without MixUp/CutMix; set freeze_blocks: 0")
    if cfg.title and world > 1:
        raise ConfigError("--title trains on one process (one GPU or the CPU); run it without torchrun")


@dataclass(frozen=True)
class Paths:
    """Which files the training and validation rows were decoded from (for ``--trunk-cache``)."""

    train: Sequence[str]
    val: Sequence[str]


def make_source(
    cfg: TrainConfig, run: Run, model: FashionNet, views: Sequence[np.ndarray], labels: np.ndarray,
    val_images: np.ndarray, titles: Titles | None = None, paths: Paths | None = None,
) -> BatchSource:
    """The source ``cfg`` asks for, over the training photos' ``views`` (uint8 NHWC, one array per aspect
    view, rows aligned with ``labels``), the validation photos and, for a model with a title branch, both
    splits' title ids. Puts the model in its training memory format; nothing else of it changes, except
    the frozen trunk's ``requires_grad``."""
    if cfg.freeze_blocks > 0:
        return TrunkSource.build(cfg, run, model, views, labels, val_images, titles, paths)
    return ImageSource.build(cfg, run, model, views, labels, val_images, titles)


def step_outputs(model: FashionNet, features: torch.Tensor) -> Outputs:
    """A training step's logits from the heads' input: as it is, and for a model with a title branch also
    with the title dropped (the same photos as image-only requests) and from the title alone."""
    fused = model.head_logits(features)
    if model.title is None:
        return Outputs(fused)
    has = model.has_title(features)
    return Outputs(fused, model.head_logits(model.without_title(features)), model.title_logits(features),
                   None if has is None else has[:, 0] > 0)


def validation_titles(titles: Titles | None, with_titles: bool) -> np.ndarray | None:
    return titles.val if titles is not None and with_titles else None


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
        titles: Titles | None = None,
    ) -> None:
        self.cfg, self.run, self.model, self.train_model = cfg, run, model, train_model
        self.loader, self.sampler, self.val_images = loader, sampler, val_images
        self.titles = titles

    @classmethod
    def build(
        cls, cfg: TrainConfig, run: Run, model: FashionNet, views: Sequence[np.ndarray], labels: np.ndarray,
        val_images: np.ndarray, titles: Titles | None = None,
    ) -> ImageSource:
        dataset = TrainDataset(
            np.concatenate(views) if len(views) > 1 else views[0],
            np.concatenate([labels] * len(views)),
            augment=True,
            colour_target=colour_is_a_target(model.schema),
            titles=np.concatenate([titles.train] * len(views)) if titles is not None else None,
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
        return cls(cfg, run, model, train_model, loader, sampler, val_images, titles)

    @property
    def steps_per_epoch(self) -> int:
        return max(len(self.loader), 1)

    def batches(self, epoch: int) -> Iterator[Batch]:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self.train_model.train()
        device = self.run.device
        for images, targets, *titles in self.loader:
            targets = targets.to(device, non_blocking=True)
            mixed, mix = mix_batch(images.to(device, non_blocking=True), self.cfg, self.run.rng)
            # A mixed photo has no one title: mixed batches train as image-only requests.
            ids = titles[0].to(device) if titles and mix is None else None
            yield Batch((mixed,), targets, mix, ids)

    def logits(self, batch: Batch) -> Outputs:
        if self.model.title is None:
            return Outputs(self.train_model(batch.inputs[0]))
        _, features = self.model.embed(batch.inputs[0], batch.titles)  # one process: no DDP wrapper here
        return step_outputs(self.model, features)

    def validation_probabilities(self, titles: bool = False) -> dict[str, np.ndarray]:
        model = self.model.eval()
        ids = validation_titles(self.titles, titles)
        batches = image_batches(self.val_images, VALIDATION_BATCH, self.run.device)
        if ids is None:
            return collect(model.probabilities, batches, head_widths(model.schema))
        with_ids = zip(batches, image_batches(ids, VALIDATION_BATCH, self.run.device), strict=True)
        return collect(lambda b: model.probabilities(*b), with_ids, head_widths(model.schema))


# --- the frozen trunk's cached features ---------------------------------------------------------------


@dataclass
class TrunkCache:
    """The frozen trunk's output for every image of every view, computed once: ``acts[v * n + i]``."""

    acts: torch.Tensor  # (views * n, C, H, W) float16
    grids: torch.Tensor  # (views * n, G) float32, the colour grid of the same input
    n: int
    views: int
    titles: torch.Tensor | None = None  # (n, max_tokens) title ids of the n photos (every view)


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


class TrunkStore:
    """The frozen trunk's activations kept on disk between runs (``--trunk-cache DIR``), one row per photo
    and view: a tuning study, a drift experiment and the final run on the same catalogue compute each row
    once. Rows live under a key of everything that determines them (backbone, frozen stages and their
    weights, the contract); a row's id names the file (path, size, mtime) and the view. The colour
    features are not stored: they are cheap, and models that differ only in them share the rows."""

    def __init__(self, folder: str | Path, model: FashionNet, blocks: int) -> None:
        digest = hashlib.sha256()
        b: Any = model.backbone
        for module in (b.conv_stem, b.bn1, *b.blocks[:blocks]):
            for name, tensor in sorted(module.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        meta = {"blocks": blocks, "pre": model.preprocessing.to_dict()}
        digest.update(json.dumps(meta, sort_keys=True).encode())
        self.folder = Path(folder) / digest.hexdigest()[:24]

    @staticmethod
    def row_ids(paths: Sequence[str], view: int, aspect: float) -> list[str]:
        out = []
        for path in paths:
            stat = os.stat(path)
            out.append(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{view}|{aspect}")
        return out

    def rows(
        self, model: FashionNet, images: np.ndarray, ids: Sequence[str], blocks: int, device: torch.device,
        desc: str,
    ) -> torch.Tensor:
        """The activations of ``images`` (rows named ``ids``): stored rows read back, the rest computed and
        stored as a new chunk."""
        known: dict[str, torch.Tensor] = {}
        wanted = set(ids)
        for chunk in sorted(self.folder.glob("chunk-*.pt")):
            stored = torch.load(chunk, weights_only=True)
            for k, row in enumerate(stored["ids"]):
                if row in wanted:
                    known[row] = stored["acts"][k]
        missing = [i for i, row in enumerate(ids) if row not in known]
        if missing:
            fresh = build_trunk_cache(model, [images[missing]], blocks, device, desc)
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".chunk-{os.getpid()}.tmp"
            torch.save({"ids": [ids[i] for i in missing], "acts": fresh.acts}, tmp)
            count = len(list(self.folder.glob("chunk-*.pt")))
            tmp.replace(self.folder / f"chunk-{count:05d}-{os.getpid()}.pt")
            for k, i in enumerate(missing):
                known[ids[i]] = fresh.acts[k]
        return torch.stack([known[row] for row in ids])


@torch.no_grad()
def colour_rows(
    model: FashionNet, images: np.ndarray, device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """The colour features (``FashionNet.colour_features``) of uint8 NHWC images; ``(n, 0)`` without."""
    if not model.colour_width:
        return torch.zeros((len(images), 0))
    out = [
        model.colour_features(model.normalize(batch)).float().cpu()
        for batch in image_batches(images, batch_size, device)
    ]
    return torch.cat(out) if out else torch.zeros((0, model.colour_width))


def trunk_cache(
    model: FashionNet, views: Sequence[np.ndarray], blocks: int, device: torch.device, desc: str,
    store: TrunkStore | None = None, paths: Sequence[str] = (), aspects: Sequence[float] = (1.0,),
) -> TrunkCache:
    """``build_trunk_cache``, through ``store`` when there is one (``paths`` name the photos, ``aspects``
    the views)."""
    if store is None:
        return build_trunk_cache(model, views, blocks, device, desc)
    acts = [
        store.rows(model, images, TrunkStore.row_ids(paths, v, aspects[v]), blocks, device, f"{desc} {v}")
        for v, images in enumerate(views)
    ]
    grids = [colour_rows(model, images, device) for images in views]
    return TrunkCache(torch.cat(acts), torch.cat(grids), len(views[0]), len(views))


def freeze_trunk(model: FashionNet, blocks: int) -> None:
    """The stem and the first ``blocks`` stages keep their values (and their batch-norm statistics)."""
    b: Any = model.backbone  # an EfficientNet-style timm model (``FashionNet.supports_frozen_trunk``)
    for module in (b.conv_stem, b.bn1, *b.blocks[:blocks]):
        for p in module.parameters():
            p.requires_grad_(False)


def frozen_batches(
    cache: TrunkCache, labels: np.ndarray, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor | None]]:
    """Shuffled batches of ((trunk activations, colour grid), labels, title ids or None), each sample in a
    random view."""
    order = rng.permutation(cache.n)
    views = rng.integers(cache.views, size=cache.n)
    targets = torch.from_numpy(labels)
    for start in range(0, cache.n - batch_size + 1, batch_size):
        i = order[start : start + batch_size]
        rows = torch.from_numpy(views[i] * cache.n + i)
        index = torch.from_numpy(i)
        titles = cache.titles[index] if cache.titles is not None else None
        yield (cache.acts[rows], cache.grids[rows]), targets[index], titles


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
        val_images: np.ndarray, titles: Titles | None = None, paths: Paths | None = None,
    ) -> TrunkSource:
        blocks = cfg.freeze_blocks
        if not model.supports_frozen_trunk() or blocks >= len(cast(Any, model.backbone).blocks):
            raise ConfigError(f"freeze_blocks needs an EfficientNet-style backbone with more than "
                              f"{blocks} stages; {cfg.backbone} is not one")
        freeze_trunk(model, blocks)
        store = TrunkStore(cfg.trunk_cache, model, blocks) if cfg.trunk_cache and paths else None
        train = trunk_cache(model, views, blocks, run.device, "frozen trunk, train", store,
                            paths.train if paths else (), cfg.aspect_views)
        val = trunk_cache(model, [val_images], blocks, run.device, "frozen trunk, val", store,
                          paths.val if paths else ())
        if titles is not None:
            train.titles, val.titles = torch.from_numpy(titles.train), torch.from_numpy(titles.val)
        _channels_last(model, cfg)
        return cls(cfg, run, model, train, val, labels)

    @property
    def steps_per_epoch(self) -> int:
        return max(len(self.labels) // self.cfg.batch_size, 1)

    def batches(self, epoch: int) -> Iterator[Batch]:
        self.model.train()
        device = self.run.device
        batches = frozen_batches(self.train, self.labels, self.cfg.batch_size, self.run.rng)
        for (h, grid), targets, titles in batches:
            h = h.to(device).float()
            if self.cfg.channels_last:
                h = h.contiguous(memory_format=torch.channels_last)
            ids = titles.to(device) if titles is not None else None
            yield Batch((h, grid.to(device)), targets.to(device, non_blocking=True), None, ids)

    def logits(self, batch: Batch) -> Outputs:
        h, grid = batch.inputs
        _, features = self.model.embed_from_trunk(h, grid, self.blocks, batch.titles)
        return step_outputs(self.model, features)

    def validation_probabilities(self, titles: bool = False) -> dict[str, np.ndarray]:
        model, cache, device = self.model.eval(), self.val, self.run.device
        ids = cache.titles if titles else None

        def step(start: int) -> dict[str, torch.Tensor]:
            h = cache.acts[start : min(start + TRUNK_VALIDATION_BATCH, cache.n)].to(device).float()
            grid = cache.grids[start : start + len(h)].to(device)
            title_ids = ids[start : start + len(h)].to(device) if ids is not None else None
            pooled, features = model.embed_from_trunk(h, grid, self.blocks, title_ids)
            return model.features_probabilities(pooled, features)

        return collect(step, range(0, cache.n, TRUNK_VALIDATION_BATCH), head_widths(model.schema))

