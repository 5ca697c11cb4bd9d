"""The preprocessing contract: how the bytes of a photo become the model's input tensor.

This is the one definition that training's evaluation path, the export and the served model follow.
It turns an encoded image into a ``uint8`` array of shape ``(size, size, 3)`` (RGB, HWC). Everything
after that — the cast to float, mean/std normalisation, NHWC→NCHW — happens *inside* the model
(``training.model.FashionNet`` and therefore the exported ONNX graph), so a client cannot get it wrong.

The contract's parameters travel with the model: training stores ``Preprocessing.to_dict()`` in the
checkpoint, the export copies it into the model repository's ``metadata.json``, and the gateway reads
it from there. This module is torch-free (NumPy + Pillow) so the gateway's container can import it.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageOps, UnidentifiedImageError

from fashion.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESIZE_MODES = ("letterbox", "squash", "center_crop")
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
# Formats a client may send. GIF is refused on purpose: animated GIFs are not catalogue photos.
DEFAULT_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})


class ImageError(UserError, ValueError):
    """Base class for images that cannot be turned into a model input."""

    code = "invalid_image"


class UndecodableImage(ImageError):
    """The bytes are not a readable image (empty, truncated, text, corrupt)."""

    code = "undecodable_image"


class UnsupportedImageFormat(ImageError):
    """The bytes are an image, but in a format the service does not accept."""

    code = "unsupported_image_format"


class ImageTooLarge(ImageError):
    """Too many bytes or too many pixels (decompression bombs are refused before decoding)."""

    code = "image_too_large"


@dataclass(frozen=True)
class Preprocessing:
    """Parameters of the contract; stored with the checkpoint and in the model's metadata."""

    image_size: int = 224
    resize_mode: str = "letterbox"
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    fill: tuple[int, int, int] = (255, 255, 255)
    # Catalogue photos put the product on a plain light background with wide margins. With
    # ``trim > 0`` the margins whose pixels all lie within ``trim`` (0-255, per channel) of the
    # background are cropped away before resizing, so the product fills the input whatever its
    # framing; photos without a plain background are left as they are. 0 turns it off.
    trim: int = 0
    # Fixed by this implementation, recorded so that a reader knows the tensor it must send.
    layout: str = field(default="NHWC", init=False)
    dtype: str = field(default="uint8", init=False)

    def __post_init__(self) -> None:
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be between 16 and 1024, got {self.image_size}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {tuple(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        for name in ("mean", "std", "fill"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} must have 3 values (R, G, B)")
        if not 0 <= self.trim <= 128:
            raise ValueError(f"trim must be between 0 and 128, got {self.trim}")
        if min(self.std) <= 0:
            raise ValueError("std values must be positive")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "fill", tuple(int(v) for v in self.fill))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        known = {"image_size", "resize_mode", "interpolation", "mean", "std", "fill", "trim"}
        if data.get("layout", "NHWC") != "NHWC" or data.get("dtype", "uint8") != "uint8":
            raise ValueError("only the NHWC uint8 contract is implemented")
        values: dict[str, Any] = {
            k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known
        }
        return cls(**values)


@dataclass(frozen=True)
class DecodeLimits:
    """What a client may send; checked before any pixel is decoded."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    formats: frozenset[str] = DEFAULT_FORMATS


ORIENTATION = 0x0112  # the EXIF tag that says how the camera was held


def open_image(data: bytes, pre: Preprocessing, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Decode ``data`` into an upright RGB image, as small as the contract allows.

    Raises an ``ImageError`` subclass that says what was wrong; never anything else for bad bytes.
    """
    if not data:
        raise UndecodableImage("the image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"the image has {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise UndecodableImage("the bytes are not an image Pillow can read") from e
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(str(e)) from e
    except (OSError, ValueError, SyntaxError) as e:  # malformed headers
        raise UndecodableImage(f"the image header is malformed: {e}") from e
    if image.format not in limits.formats:
        allowed = ", ".join(sorted(limits.formats))
        raise UnsupportedImageFormat(f"image format {image.format} is not accepted; send one of: {allowed}")
    width, height = image.size
    if width < 1 or height < 1:
        raise UndecodableImage("the image has no pixels")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"the image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}"
        )
    if image.format == "JPEG":
        # DCT-domain downscale: decode at 1/2, 1/4 or 1/8 size when that still covers the target.
        image.draft("RGB", _draft_request(width, height, pre))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            # exif_transpose copies the whole image even when it is upright; most photos are.
            if image.getexif().get(ORIENTATION, 1) != 1:
                image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(str(e)) from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise UndecodableImage(f"the image data is truncated or corrupt: {e}") from e
    return to_rgb(image, pre.fill)


def _draft_request(width: int, height: int, pre: Preprocessing) -> tuple[int, int]:
    size = pre.image_size
    if pre.resize_mode == "squash":
        return (size, size)
    # letterbox scales the long side to `size`, center_crop the short side; both keep the aspect.
    side = max(width, height) if pre.resize_mode == "letterbox" else min(width, height)
    # Trimming keeps part of the image: decode at twice the size so the crop still covers the target.
    scale = min(1.0, size * (2 if pre.trim else 1) / side)
    return (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale)))


def to_rgb(image: Image.Image, fill: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any Pillow mode (L, P, RGBA, LA, CMYK, I;16, I, F, 1) to 8-bit RGB; transparency over ``fill``."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        array = np.clip(array / peak * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, fill)
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


TRIM_MARGIN = 0.04  # of the kept box's longer side, so that outlines are not cut


TRIM_PROBE_SIDE = 256  # the box is found on a copy whose long side is about this many pixels


def trim_background(image: Image.Image, threshold: int) -> Image.Image:
    """Crop plain margins: the box of pixels farther than ``threshold`` from the corner colour.

    The background colour is the brightest of the four corners (catalogue backgrounds are light;
    a product touching one corner does not fool it). The box is found on a box-filtered copy about
    ``TRIM_PROBE_SIDE`` pixels long: a block of the copy that holds a clear edge of the product still
    stands out, so the box loses at most the faint fringe of one block, inside the margin added around
    it. Found at full size, the box cost as much as the model at 224 px inputs (8 of 11 ms).
    Returns ``image`` itself when nothing would be cropped or when no pixel stands out.
    """
    width, height = image.size
    factor = max(1, max(width, height) // TRIM_PROBE_SIDE)
    probe = image.reduce(factor) if factor > 1 else image
    pw, ph = probe.size
    corners = [probe.getpixel(xy) for xy in ((0, 0), (pw - 1, 0), (0, ph - 1), (pw - 1, ph - 1))]
    background = max(corners, key=lambda c: sum(c))  # type: ignore[arg-type]
    diff = ImageChops.difference(probe, Image.new("RGB", probe.size, background))
    r, g, b = diff.split()
    mask = ImageChops.lighter(ImageChops.lighter(r, g), b).point(lambda v: 255 if v > threshold else 0)
    box = mask.getbbox()
    if box is None:
        return image
    x0, y0, x1, y1 = (box[0] * factor, box[1] * factor, box[2] * factor, box[3] * factor)
    pad = round(TRIM_MARGIN * max(x1 - x0, y1 - y0))
    x0, y0, x1, y1 = max(0, x0 - pad), max(0, y0 - pad), min(width, x1 + pad), min(height, y1 + pad)
    if (x0, y0, x1, y1) == (0, 0, width, height):
        return image
    return image.crop((x0, y0, x1, y1))


def resize(image: Image.Image, pre: Preprocessing) -> np.ndarray:
    """An RGB image to the contract's ``(size, size, 3)`` uint8 array."""
    if pre.trim:
        image = trim_background(image, pre.trim)
    size = pre.image_size
    resample = INTERPOLATIONS[pre.interpolation]
    width, height = image.size
    if pre.resize_mode == "squash":
        out = image.resize((size, size), resample)
    elif pre.resize_mode == "center_crop":
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        resized = image.resize((new_w, new_h), resample)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        out = resized.crop((left, top, left + size, top + size))
    else:  # letterbox: keep the whole product, pad with the background colour
        scale = size / max(width, height)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        resized = image.resize((new_w, new_h), resample)
        out = Image.new("RGB", (size, size), pre.fill)
        out.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
    return np.asarray(out, dtype=np.uint8)


def preprocess(data: bytes, pre: Preprocessing, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Encoded image bytes → ``(size, size, 3)`` uint8 RGB array, the model's input for one image."""
    return resize(open_image(data, pre, limits), pre)


def preprocess_file(path: str, pre: Preprocessing, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    with open(path, "rb") as f:
        return preprocess(f.read(), pre, limits)


def normalize(batch: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """NumPy reference of what the model does first: uint8 NHWC → normalised float32 NCHW."""
    x = batch.astype(np.float32) / 255.0
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
