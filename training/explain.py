"""Grad-CAM heatmaps (``fashion explain``): where the model looks for one attribute's prediction.

Grad-CAM (Selvaraju et al., 2017) weights the feature maps of a late layer by the mean gradient of the
predicted class's logit and keeps the positive part. The layer is found from the backbone's structure,
not its name, and read with hooks (no retraining, no change to the model):

- CNNs (EfficientNet, EfficientNetV2, ResNet-like): the output of the last layer that produces a 4-D
  map before pooling — timm's ``bn2`` (head norm + activation) for EfficientNets, ``layer4`` otherwise;
- Swin: the final ``norm``, whose tokens are already laid out ``(B, H, W, C)``;
- ViT: the last block's ``norm1`` (the head reads only the class token, so later patch tokens get no
  gradient); the class/register tokens are dropped and the patch tokens reshaped to the patch grid.

The map is upsampled to the model's input, then mapped back onto the original photo by undoing the
resize of the preprocessing contract (letterbox padding, squash, centre crop), so the overlay PNG has
the photo's size. With ``trim`` on (plain margins cropped before resizing) the overlay is drawn on the
trimmed photo, at its full resolution: the part of the photo the model sees.

Only the backbone's features are explained: with ``colour_grid`` the heads also read a coarse grid of
mean colours, which has no gradient map of its own.

``explain`` also measures the maps (``summary.json`` in the output folder): a heatmap "peaks on the
product" when its peak lies inside the product's silhouette (``product_mask``) on the photo. The peak is
the centre of the strongest cell of the coarse map (at 96 px EfficientNet's last map is 3 × 3), found on
the upsampled map by ``heatmap_peak``. A map that is zero everywhere (the backbone's features speak
against the predicted class everywhere, e.g. when the colour grid decides the colour) has no peak and
counts as not on the product.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from fashion.contract import Preprocessing, preprocess_file, to_rgb, trim_background
from training.model import FashionNet, ModelError

log = logging.getLogger(__name__)


class ExplainError(ModelError):
    """The model's backbone has no layer Grad-CAM knows how to read."""


@dataclass(frozen=True)
class TargetLayer:
    module: nn.Module
    kind: str  # "nchw", "nhwc" (Swin) or "tokens" (ViT)
    prefix_tokens: int = 0
    grid: tuple[int, int] | None = None


def find_target_layer(backbone: nn.Module) -> TargetLayer:
    """The last spatial feature layer of a timm backbone (see the module docstring)."""
    name = type(backbone).__name__.lower()
    b: Any = backbone  # a timm model: which attributes it has is checked here
    if "swin" in name and hasattr(b, "norm"):
        return TargetLayer(b.norm, "nhwc")
    if hasattr(b, "patch_embed") and hasattr(b, "norm") and hasattr(b, "blocks"):
        rows, cols = (int(g) for g in b.patch_embed.grid_size)
        grid = (rows, cols)
        # The head reads the class token only, so the final norm's patch tokens get no gradient: take
        # the input norm of the last block, where attention still mixes patch tokens into the class token.
        last = b.blocks[-1]
        module = getattr(last, "norm1", last)
        return TargetLayer(module, "tokens", int(getattr(backbone, "num_prefix_tokens", 1)), grid)
    for attr in ("bn2", "conv_head", "layer4", "stages", "features"):
        if hasattr(backbone, attr) and isinstance(getattr(backbone, attr), nn.Module):
            return TargetLayer(getattr(backbone, attr), "nchw")
    raise ExplainError(f"no Grad-CAM target layer known for backbone {type(backbone).__name__}")


def _as_nchw(activation: torch.Tensor, target: TargetLayer) -> torch.Tensor:
    if target.kind == "nhwc":
        return activation.permute(0, 3, 1, 2)
    if target.kind == "tokens":
        tokens = activation[:, target.prefix_tokens :]
        h, w = target.grid or (0, 0)
        return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2)
    return activation


class GradCAM:
    """``GradCAM(model)(images, attribute)`` → ``(B, H, W)`` maps in [0, 1] at the input's size, and the
    class index each map explains (the predicted one unless ``class_index`` is given)."""

    def __init__(self, model: FashionNet) -> None:
        self.model = model
        self.target = find_target_layer(model.backbone)

    def __call__(
        self, images: torch.Tensor, attribute: str, class_index: Sequence[int] | None = None
    ) -> tuple[np.ndarray, list[int]]:
        captured: list[torch.Tensor] = []
        handle = self.target.module.register_forward_hook(lambda _m, _i, out: captured.append(out))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                logits = self.model(images)[attribute]
                chosen = (logits.argmax(dim=1) if class_index is None
                          else torch.as_tensor(class_index, device=logits.device))
                score = logits.gather(1, chosen.view(-1, 1)).sum()
                activation = captured[-1]
                (grad,) = torch.autograd.grad(score, activation)
        finally:
            handle.remove()
            self.model.train(was_training)
        a = _as_nchw(activation.detach(), self.target).float()
        g = _as_nchw(grad.detach(), self.target).float()
        weights = g.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * a).sum(dim=1, keepdim=True))
        cam = nn.functional.interpolate(cam, size=images.shape[1:3], mode="bilinear", align_corners=False)
        cam = cam[:, 0]
        flat = cam.flatten(1)
        low, high = flat.min(dim=1).values, flat.max(dim=1).values
        cam = (cam - low.view(-1, 1, 1)) / (high - low).clamp(min=1e-12).view(-1, 1, 1)
        return cam.cpu().numpy(), [int(c) for c in chosen.cpu()]


# --- back to the photo ----------------------------------------------------------------------------


def heatmap_on_photo(heatmap: np.ndarray, photo_size: tuple[int, int], pre: Preprocessing) -> np.ndarray:
    """A heatmap over the model's input (``size × size``) mapped onto the original photo
    (``(width, height)``) by undoing the contract's resize; returns ``(height, width)`` in [0, 1]."""
    width, height = photo_size
    size = pre.image_size
    src = Image.fromarray(heatmap.astype(np.float32))
    if pre.resize_mode == "squash":
        return np.asarray(src.resize((width, height), Image.Resampling.BILINEAR))
    if pre.resize_mode == "center_crop":
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        canvas = np.zeros((new_h, new_w), dtype=np.float32)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        canvas[top : top + size, left : left + size] = heatmap
        return np.asarray(Image.fromarray(canvas).resize((width, height), Image.Resampling.BILINEAR))
    scale = size / max(width, height)  # letterbox
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = (size - new_w) // 2, (size - new_h) // 2
    inner = src.crop((left, top, left + new_w, top + new_h))
    return np.asarray(inner.resize((width, height), Image.Resampling.BILINEAR))


def overlay(photo: Image.Image, heatmap: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The photo with the heatmap blended on top (matplotlib's ``jet`` colours)."""
    from matplotlib import colormaps

    colours = (colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3] * 255).astype(np.uint8)
    return Image.blend(photo.convert("RGB"), Image.fromarray(colours).resize(photo.size), alpha)


@dataclass(frozen=True)
class Explanation:
    image: str
    attribute: str
    predicted: str
    confidence: float
    out: Path
    peak_xy: tuple[int, int] | None  # the heatmap's peak on the written image (x, y); None: a flat map
    peak_on_product: bool  # the peak lies inside the product's silhouette (``product_mask``)


def product_mask(photo: Image.Image, threshold: int = 30) -> np.ndarray:
    """The product's silhouette on a plain catalogue background; ``(height, width)`` bool.

    Pixels farther than ``threshold`` from the background colour (the brightest corner) stand out; the
    regions they enclose are filled, so that a white shirt drawn with a dark outline on a white
    background counts as product inside its outline. A measure for heatmaps, not a segmentation.
    """
    from scipy import ndimage

    a = np.asarray(photo.convert("RGB")).astype(np.int16)
    corners = [a[0, 0], a[0, -1], a[-1, 0], a[-1, -1]]
    background = max(corners, key=lambda c: int(c.sum()))
    return ndimage.binary_fill_holes(np.abs(a - background).max(axis=2) > threshold)


def heatmap_peak(heat: np.ndarray, tolerance: float = 1e-6) -> tuple[int, int] | None:
    """``(x, y)`` of the heatmap's peak, or ``None`` for a flat map (no positive evidence anywhere).

    Bilinear upsampling (``align_corners=False``) puts each cell's value at the cell's centre and holds
    the outer cells' values flat out to the edge, so when the strongest cell is on the border the maximum
    is a plateau reaching from that cell's centre to the edge of the photo. ``argmax`` returns the
    plateau's first pixel (the photo's top or left edge for a top or left cell); the peak is the cell's
    centre: the plateau's pixel nearest the middle of the map. An inner cell's peak is a point anyway.
    """
    from scipy import ndimage

    high, low = float(heat.max()), float(heat.min())
    if high - low <= tolerance:
        return None
    plateau, _ = ndimage.label(heat >= high - tolerance)
    first = np.unravel_index(int(np.argmax(heat)), heat.shape)
    ys, xs = np.nonzero(plateau == plateau[first])
    h, w = heat.shape
    k = int(np.argmin((ys - (h - 1) / 2) ** 2 + (xs - (w - 1) / 2) ** 2))
    return int(xs[k]), int(ys[k])


def peak_on_product(heat: np.ndarray, mask: np.ndarray) -> tuple[tuple[int, int] | None, bool]:
    """The heatmap's peak (``heatmap_peak``) and whether it lies on the product (``mask``, same shape)."""
    if heat.shape != mask.shape:
        raise ValueError(f"heatmap {heat.shape} and product mask {mask.shape} differ in shape")
    peak = heatmap_peak(heat)
    return peak, peak is not None and bool(mask[peak[1], peak[0]])


@dataclass(frozen=True)
class PeakSummary:
    """How many heatmaps peak on the product: overall, per attribute, and how many maps were flat."""

    on_product: int
    heatmaps: int
    flat: int
    attributes: dict[str, tuple[int, int]]  # attribute → (on product, heatmaps)

    @property
    def share(self) -> float:
        return self.on_product / self.heatmaps if self.heatmaps else float("nan")

    def line(self) -> str:
        flat = f"; {self.flat} flat maps without a peak" if self.flat else ""
        return (f"peak on product: {self.on_product}/{self.heatmaps} heatmaps "
                f"({100 * self.share:.0f} %){flat}")

    def to_dict(self) -> dict[str, object]:
        return {
            "peak_on_product": self.on_product,
            "heatmaps": self.heatmaps,
            "share": round(self.share, 4) if self.heatmaps else None,
            "flat": self.flat,
            "attributes": {name: {"peak_on_product": hit, "heatmaps": n, "share": round(hit / n, 4)}
                           for name, (hit, n) in self.attributes.items()},
        }


def summarise(results: Sequence[Explanation]) -> PeakSummary:
    """Count the maps of ``explain`` that peak on the product, overall and per attribute."""
    per: dict[str, tuple[int, int]] = {}
    for r in results:
        hit, n = per.get(r.attribute, (0, 0))
        per[r.attribute] = (hit + r.peak_on_product, n + 1)
    return PeakSummary(sum(r.peak_on_product for r in results), len(results),
                       sum(r.peak_xy is None for r in results), per)


def write_summary(path: str | Path, results: Sequence[Explanation]) -> PeakSummary:
    """``summary.json``: the peak-on-product counts and one record per heatmap."""

    summary = summarise(results)
    doc = {
        **summary.to_dict(),
        "definition": "peak = centre of the heatmap's strongest cell, on the photo; on product = "
                      "inside the product's silhouette (pixels more than 30 from the background colour, "
                      "holes filled)",
        "maps": [{"image": r.image, "attribute": r.attribute, "predicted": r.predicted,
                  "confidence": round(r.confidence, 4), "heatmap": str(r.out),
                  "peak_xy": list(r.peak_xy) if r.peak_xy else None, "peak_on_product": r.peak_on_product}
                 for r in results],
    }
    Path(path).write_text(json.dumps(doc, indent=1))
    return summary


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def explain(
    model: FashionNet,
    images: Sequence[str | Path],
    out_dir: str | Path,
    attributes: Sequence[str] | None = None,
    *,
    device: torch.device | str = "cpu",
) -> list[Explanation]:
    """One overlay PNG per image and attribute, ``<out>/<image stem>__<attribute>.png``, and
    ``<out>/summary.json`` (``write_summary``)."""
    pre = model.preprocessing
    names = list(attributes) if attributes else model.schema.names
    unknown = [n for n in names if n not in model.schema.names]
    if unknown:
        raise ExplainError(f"unknown attributes {unknown}; the model has {model.schema.names}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.to(device)
    cam = GradCAM(model)
    results: list[Explanation] = []
    for path in images:
        path = Path(path)
        x = torch.from_numpy(np.array(preprocess_file(str(path), pre)[None])).to(device)
        with torch.no_grad():
            probs = model.probabilities(x)
        with Image.open(path) as im:
            photo = to_rgb(ImageOps.exif_transpose(im), pre.fill)
        if pre.trim:
            photo = trim_background(photo, pre.trim)
        mask = product_mask(photo)
        for name in names:
            maps, chosen = cam(x, name)
            heat = heatmap_on_photo(maps[0], photo.size, pre)
            target = out / f"{_safe(path.stem)}__{_safe(model.schema[name].tensor)}.png"
            overlay(photo, heat).save(target)
            peak, on_product = peak_on_product(heat, mask)
            k = chosen[0]
            results.append(Explanation(str(path), name, model.schema[name].classes[k],
                                       float(probs[name][0, k]), target, peak, on_product))
    write_summary(out / "summary.json", results)
    return results
