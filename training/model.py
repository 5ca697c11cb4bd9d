"""The multi-head model: a timm backbone shared by one classification head per attribute.

The model takes what the preprocessing contract produces — ``uint8`` images, NHWC — and does the cast,
normalisation and layout change itself. Training, evaluation and the exported ONNX graph therefore run
the very same normalisation, and a client of the served model sends 4× fewer bytes than float32.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from fashion.contract import Preprocessing
from fashion.schema import LabelSchema

log = logging.getLogger(__name__)

# Backbones the product supports, with the resize the published weights expect. timm's tiny test
# models (random weights, ~0.1 M parameters) keep CI fast; they are real timm architectures.
BACKBONES: dict[str, dict[str, str]] = {
    "efficientnet_b0": {"interpolation": "bicubic"},
    "tf_efficientnetv2_s": {"interpolation": "bicubic"},
    "swin_tiny_patch4_window7_224": {"interpolation": "bicubic"},
    "test_efficientnet": {"interpolation": "bicubic"},
    "test_vit": {"interpolation": "bicubic"},
}


class ModelError(RuntimeError):
    """A backbone cannot be built or its weights cannot be loaded; the message says what to do."""


def create_backbone(
    name: str, *, pretrained: bool = False, weights: str | None = None, image_size: int = 224
) -> nn.Module:
    """A timm model without its classifier (``num_classes=0``) returning pooled features.

    ``pretrained`` downloads timm's published weights (through the Hugging Face hub cache, so an offline
    machine with a warm cache works too); ``weights`` loads a local file instead — for clusters without
    internet — in timm's format (``.safetensors``, ``.pth``, ``.bin``).
    """
    import timm

    if name not in BACKBONES:
        raise ModelError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    kwargs: dict[str, object] = {}
    if name.startswith(("swin", "test_vit")):
        kwargs["img_size"] = image_size
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise ModelError(f"weights file {path} not found")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path.resolve())}
        pretrained = True
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        if weights is not None:
            raise ModelError(f"could not load weights from {weights} into {name}: {e}") from e
        hint = (
            "timm could not fetch the pretrained weights (no internet?). Download them where there is a "
            "network and pass --weights FILE, or train from scratch without --pretrained"
        )
        raise ModelError(f"{hint}: {e}") from e


class FashionNet(nn.Module):
    """Backbone + per-attribute heads. ``forward`` takes uint8 NHWC and returns logits per attribute."""

    def __init__(
        self,
        backbone: nn.Module,
        schema: LabelSchema,
        preprocessing: Preprocessing,
        dropout: float = 0.2,
        colour_grid: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.schema = schema
        self.preprocessing = preprocessing
        self.colour_grid = colour_grid
        features = int(backbone.num_features) + 3 * colour_grid * colour_grid
        self.heads = nn.ModuleDict(
            {
                a.tensor: nn.Sequential(nn.Dropout(dropout), nn.Linear(features, a.num_classes))
                for a in schema.attributes
            }
        )
        mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        # Per-head temperature for calibrated probabilities (1 = uncalibrated); saved in the state dict.
        self.register_buffer("temperature", torch.ones(len(schema.attributes)))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC → normalised float NCHW (channels-last memory, which is what the convs like)."""
        x = images.permute(0, 3, 1, 2).float()
        return (x - self.mean) / self.std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images)
        f = self.backbone(x)
        if not self.colour_grid:
            return f
        # Colour context: the mean colour of each cell of a coarse grid, next to the backbone's
        # features. A CNN trained from scratch learns shapes quickly but colour names slowly (its
        # batch norms and gates wash out absolute colour); the heads get it directly here.
        # Fixed kernel (not adaptive pooling) so that the ONNX graph is plain AveragePool.
        k = self.preprocessing.image_size // self.colour_grid
        grid = nn.functional.avg_pool2d(x[:, :, : k * self.colour_grid, : k * self.colour_grid], k)
        return torch.cat([f, grid.flatten(1)], dim=1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {a.name: self.heads[a.tensor](f) for a in self.schema.attributes}

    def probabilities(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Calibrated class probabilities per attribute (softmax of logits / temperature)."""
        logits = self(images)
        return {
            a.name: torch.softmax(logits[a.name] / self.temperature[i], dim=1)
            for i, a in enumerate(self.schema.attributes)
        }


class ProbabilityModel(nn.Module):
    """What is exported: uint8 NHWC in, one calibrated probability tensor per attribute out (a tuple)."""

    def __init__(self, net: FashionNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        probs = self.net.probabilities(images)
        return tuple(probs[a.name] for a in self.net.schema.attributes)


def build_model(
    backbone: str,
    schema: LabelSchema,
    preprocessing: Preprocessing,
    *,
    pretrained: bool = False,
    weights: str | None = None,
    dropout: float = 0.2,
    colour_grid: int = 0,
) -> FashionNet:
    body = create_backbone(
        backbone, pretrained=pretrained, weights=weights, image_size=preprocessing.image_size
    )
    return FashionNet(body, schema, preprocessing, dropout=dropout, colour_grid=colour_grid)
