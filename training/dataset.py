"""Images for training: decoded once through the preprocessing contract, augmented per sample.

Decoding a catalogue JPEG costs more than a training step on small inputs, so every image is decoded
once (``ImageCache``) into the contract's uint8 array and kept in memory; augmentations then work on
those arrays. Augmentations respect the labels: no vertical flips (a skirt upside down is not a
skirt), horizontal flips only (they change no attribute), small affine moves with the background
colour as fill, and no colour jitter at all when a colour is one of the targets.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from fashion.contract import ImageError, Preprocessing, open_image, resize
from fashion.schema import LabelSchema, Role

log = logging.getLogger(__name__)


def colour_is_a_target(schema: LabelSchema) -> bool:
    """Whether a head names colours (``Role.COLOUR``): then no augmentation may change colours."""
    return bool(schema.with_role(Role.COLOUR))


@dataclass
class ImageCache:
    images: np.ndarray  # (n, size, size, 3) uint8
    failed: list[tuple[str, str]]  # (path, reason) of images that could not be decoded

    @classmethod
    def build(
        cls,
        paths: Sequence[str],
        pre: Preprocessing,
        *,
        desc: str = "decode",
        threads: int = 2,
        aspect: float = 1.0,
        mirror: bool = False,
    ) -> ImageCache:
        """Decode ``paths`` through the contract; ``aspect`` multiplies each photo's height first (a view
        with another aspect ratio) and ``mirror`` flips it left-right."""
        size = pre.image_size
        out = np.full((len(paths), size, size, 3), 255, dtype=np.uint8)
        failed: list[tuple[str, str]] = []

        def load(i: int) -> None:
            try:
                out[i] = load_view(paths[i], pre, aspect, mirror)
            except (ImageError, OSError) as e:
                failed.append((paths[i], str(e)))

        with ThreadPoolExecutor(threads) as pool:
            list(tqdm(pool.map(load, range(len(paths))), total=len(paths), desc=desc, leave=False))
        for path, reason in failed:
            log.warning("could not decode %s (%s); it is used as a blank image", path, reason)
        return cls(out, failed)


def load_view(path: str, pre: Preprocessing, aspect: float = 1.0, mirror: bool = False) -> np.ndarray:
    """One photo through the contract, its height first scaled by ``aspect`` and mirrored if asked."""
    with open(path, "rb") as f:
        image = open_image(f.read(), pre)
    if aspect != 1.0:
        width, height = image.size
        image = image.resize((width, max(1, round(height * aspect))), Image.Resampling.BICUBIC)
    if mirror:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return resize(image, pre)


class TrainDataset(Dataset):
    """(uint8 HWC image, int64 labels with MISSING) pairs, with label-respecting augmentation."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        augment: bool,
        colour_target: bool,
        titles: np.ndarray | None = None,
    ):
        self.images = images
        self.labels = torch.from_numpy(labels)
        # (n, max_tokens) title ids: items become (image, labels, title ids)
        self.titles = torch.from_numpy(titles) if titles is not None else None
        fill = [255, 255, 255]
        steps: list[v2.Transform] = [
            v2.RandomHorizontalFlip(),
            v2.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.85, 1.1), fill=fill),
        ]
        if not colour_target:
            steps.append(v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2))
        self.transform = v2.Compose(steps) if augment else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        image = torch.from_numpy(self.images[i])
        if self.transform is not None:
            image = self.transform(image.permute(2, 0, 1)).permute(1, 2, 0).contiguous()
        if self.titles is not None:
            return image, self.labels[i], self.titles[i]
        return image, self.labels[i]
