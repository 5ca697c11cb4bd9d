"""A synthetic fashion catalogue in the Kaggle "Fashion Product Images" layout, for demos and CI.

``generate(out_dir, count, seed)`` writes ``out_dir/styles.csv`` and ``out_dir/images/<id>.jpg``. Every
product is a flat-lay drawing of one of eight article types (distinct silhouettes drawn as polygons with
``PIL.ImageDraw``) in one of twelve well-separated named colours, with a pattern overlay (stripes, checks,
dots or a print) in a contrasting shade that covers well under half of the product, so the named colour
stays the dominant one. Attributes are chosen so that a small CNN can learn ``articleType`` and
``baseColour`` from 96 px letterboxed inputs; the other columns follow the real file's habits (gender,
usage and season tied to the kind with noise, ``NA`` usage cells, empty season cells, names with commas).

Everything is a pure function of ``(seed, product id)``: a product's row and image come from their own
``numpy.random.SeedSequence(seed, spawn_key=(id, ...))``, so the same seed gives byte-identical files, a
larger ``count`` only appends products, and ``start_id`` selects other products of the same catalogue.
No global random state is read or changed.

``python -m training.synth`` runs a speed benchmark (1000 images into a temporary folder).
"""

from __future__ import annotations

import csv
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

COLUMNS: tuple[str, ...] = (
    "id",
    "gender",
    "masterCategory",
    "subCategory",
    "articleType",
    "baseColour",
    "season",
    "year",
    "usage",
    "productDisplayName",
    "pattern",
    "sleeveLength",
)

# Kaggle colour names → RGB, chosen far apart (the closest pairs, Navy Blue/Black and Orange/Yellow,
# differ by more than 90 units).
COLOURS: dict[str, tuple[int, int, int]] = {
    "Black": (25, 25, 25),
    "White": (248, 248, 248),
    "Grey": (128, 128, 128),
    "Red": (205, 25, 35),
    "Pink": (245, 140, 185),
    "Orange": (245, 120, 20),
    "Yellow": (250, 220, 30),
    "Green": (35, 145, 55),
    "Blue": (35, 100, 225),
    "Navy Blue": (25, 40, 115),
    "Purple": (125, 45, 160),
    "Brown": (115, 70, 35),
}
GENDERS: tuple[str, ...] = ("Men", "Women", "Unisex", "Boys", "Girls")
USAGES: tuple[str, ...] = ("Casual", "Formal", "Sports", "Ethnic")
SEASONS: tuple[str, ...] = ("Summer", "Winter", "Fall", "Spring")
PATTERNS: tuple[str, ...] = ("solid", "striped", "checked", "dotted", "printed")
SLEEVES: tuple[str, ...] = ("Short Sleeves", "Long Sleeves", "Sleeveless")
YEARS = (2010, 2018)
IMAGE_WIDTH = 512
HEIGHT_RANGE = (259, 1080)
PRODUCT_FRACTION = (0.45, 0.85)  # product's longer side / image's shorter side
MAX_ROTATION_DEG = 12.0
JPEG_QUALITY = (70, 95)

ATTRIBUTE_NOISE = 0.10  # gender / usage / season drawn uniformly instead of from the kind's habits
USAGE_NA = 0.03  # the real file has "NA" usage cells
SEASON_MISSING = 0.02  # ... and empty season cells
NAME_WITH_COMMA = 0.25

BRANDS: tuple[str, ...] = (
    "Acme",
    "Northwind",
    "Blue Heron",
    "Contoso",
    "Fabrikam",
    "Urban Loom",
    "Kestrel",
    "Tailspin",
    "Margie's Travel",
    "Red Pebble",
)
PATTERN_WORDS: dict[str, str] = {
    "solid": "",
    "striped": "Striped",
    "checked": "Checked",
    "dotted": "Polka Dot",
    "printed": "Printed",
}
NAME_SUFFIXES: tuple[str, ...] = ("Cotton", "Slim Fit", "Regular Fit", "Pack of 1", "Set of 1")

Points = np.ndarray  # (n, 2) float coordinates; x right, y down
RGB = tuple[int, int, int]


# ---------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class KindSpec:
    """An article type: its categories, its habits and how its name reads."""

    article_type: str
    master_category: str
    sub_category: str
    genders: dict[str, float]
    usages: dict[str, float]
    seasons: dict[str, float]
    patterns: dict[str, float]
    nouns: tuple[str, ...]
    sleeves: dict[str, float] = field(default_factory=dict)  # empty: the kind has no sleeves

    @property
    def has_sleeves(self) -> bool:
        return bool(self.sleeves)


_APPAREL_PATTERNS = {"solid": 0.4, "striped": 0.15, "checked": 0.15, "dotted": 0.15, "printed": 0.15}
_ACCESSORY_PATTERNS = {"solid": 0.55, "striped": 0.1, "checked": 0.1, "dotted": 0.1, "printed": 0.15}

KINDS: tuple[KindSpec, ...] = (
    KindSpec(
        "Tshirts", "Apparel", "Topwear",
        genders={"Men": 0.55, "Women": 0.25, "Boys": 0.1, "Girls": 0.05, "Unisex": 0.05},
        usages={"Casual": 0.7, "Sports": 0.3},
        seasons={"Summer": 0.7, "Spring": 0.2, "Fall": 0.1},
        patterns=_APPAREL_PATTERNS,
        nouns=("Tshirts", "T-shirt", "Tshirt"),
        sleeves={"Short Sleeves": 0.5, "Long Sleeves": 0.25, "Sleeveless": 0.25},
    ),
    KindSpec(
        "Shirts", "Apparel", "Topwear",
        genders={"Men": 0.75, "Women": 0.15, "Boys": 0.1},
        usages={"Formal": 0.55, "Casual": 0.45},
        seasons={"Fall": 0.5, "Summer": 0.3, "Spring": 0.2},
        patterns=_APPAREL_PATTERNS,
        nouns=("Shirts", "Shirt"),
        sleeves={"Long Sleeves": 0.5, "Short Sleeves": 0.4, "Sleeveless": 0.1},
    ),
    KindSpec(
        "Dresses", "Apparel", "Dress",
        genders={"Women": 0.85, "Girls": 0.15},
        usages={"Casual": 0.6, "Ethnic": 0.2, "Formal": 0.2},
        seasons={"Summer": 0.6, "Spring": 0.3, "Fall": 0.1},
        patterns=_APPAREL_PATTERNS,
        nouns=("Dresses", "Dress"),
        sleeves={"Sleeveless": 0.45, "Short Sleeves": 0.35, "Long Sleeves": 0.2},
    ),
    KindSpec(
        "Trousers", "Apparel", "Bottomwear",
        genders={"Men": 0.6, "Women": 0.3, "Boys": 0.1},
        usages={"Formal": 0.5, "Casual": 0.5},
        seasons={"Winter": 0.5, "Fall": 0.4, "Spring": 0.1},
        patterns=_APPAREL_PATTERNS,
        nouns=("Trousers", "Trouser"),
    ),
    KindSpec(
        "Shorts", "Apparel", "Bottomwear",
        genders={"Men": 0.5, "Boys": 0.2, "Women": 0.2, "Girls": 0.1},
        usages={"Sports": 0.5, "Casual": 0.5},
        seasons={"Summer": 0.8, "Spring": 0.2},
        patterns=_APPAREL_PATTERNS,
        nouns=("Shorts",),
    ),
    KindSpec(
        "Skirts", "Apparel", "Bottomwear",
        genders={"Women": 0.8, "Girls": 0.2},
        usages={"Casual": 0.7, "Formal": 0.2, "Ethnic": 0.1},
        seasons={"Spring": 0.5, "Summer": 0.5},
        patterns=_APPAREL_PATTERNS,
        nouns=("Skirts", "Skirt"),
    ),
    KindSpec(
        "Casual Shoes", "Footwear", "Shoes",
        genders={"Men": 0.45, "Women": 0.3, "Unisex": 0.15, "Boys": 0.1},
        usages={"Casual": 0.85, "Sports": 0.15},
        seasons={"Fall": 0.5, "Winter": 0.3, "Summer": 0.2},
        patterns=_ACCESSORY_PATTERNS,
        nouns=("Casual Shoes", "Sneakers"),
    ),
    KindSpec(
        "Handbags", "Accessories", "Bags",
        genders={"Women": 0.9, "Unisex": 0.1},
        usages={"Casual": 0.7, "Formal": 0.3},
        seasons={"Fall": 0.4, "Winter": 0.3, "Summer": 0.3},
        patterns=_ACCESSORY_PATTERNS,
        nouns=("Handbags", "Handbag", "Tote Bag"),
    ),
)  # fmt: skip
KIND_BY_NAME: dict[str, KindSpec] = {k.article_type: k for k in KINDS}


@dataclass(frozen=True)
class ProductRow:
    """One line of ``styles.csv``; ``None`` is an empty cell."""

    id: int
    gender: str
    master_category: str
    sub_category: str
    article_type: str
    base_colour: str
    season: str | None
    year: int
    usage: str
    product_display_name: str
    pattern: str
    sleeve_length: str | None

    def to_record(self) -> dict[str, str]:
        """The row as ``styles.csv`` writes it (column name → cell text)."""
        values = (
            self.id,
            self.gender,
            self.master_category,
            self.sub_category,
            self.article_type,
            self.base_colour,
            self.season,
            self.year,
            self.usage,
            self.product_display_name,
            self.pattern,
            self.sleeve_length,
        )
        return {c: "" if v is None else str(v) for c, v in zip(COLUMNS, values, strict=True)}


def _rng(seed: int, product_id: int, stream: int) -> np.random.Generator:
    """The random stream ``stream`` (0: row, 1: image) of one product."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(product_id, stream))))


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    p = np.asarray([weights[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _pick_noisy(rng: np.random.Generator, weights: dict[str, float], everything: Sequence[str]) -> str:
    """From the kind's habits, or (with probability ``ATTRIBUTE_NOISE``) from every value."""
    if rng.random() < ATTRIBUTE_NOISE:
        return everything[int(rng.integers(len(everything)))]
    return _pick(rng, weights)


def _display_name(rng: np.random.Generator, kind: KindSpec, gender: str, colour: str, pattern: str) -> str:
    brand = BRANDS[int(rng.integers(len(BRANDS)))]
    noun = kind.nouns[int(rng.integers(len(kind.nouns)))]
    words = [brand, gender, colour, PATTERN_WORDS[pattern], noun]
    name = " ".join(w for w in words if w)
    if rng.random() < NAME_WITH_COMMA:
        name += ", " + NAME_SUFFIXES[int(rng.integers(len(NAME_SUFFIXES)))]
    return name


def sample_row(product_id: int, seed: int) -> ProductRow:
    """The catalogue row of product ``product_id`` under ``seed`` (no image)."""
    rng = _rng(seed, product_id, 0)
    kind = KINDS[int(rng.integers(len(KINDS)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    pattern = _pick(rng, kind.patterns)
    sleeve = _pick(rng, kind.sleeves) if kind.has_sleeves else None
    gender = _pick_noisy(rng, kind.genders, GENDERS)
    usage = _pick_noisy(rng, kind.usages, USAGES)
    season: str | None = _pick_noisy(rng, kind.seasons, SEASONS)
    if rng.random() < USAGE_NA:
        usage = "NA"
    if rng.random() < SEASON_MISSING:
        season = None
    return ProductRow(
        id=product_id,
        gender=gender,
        master_category=kind.master_category,
        sub_category=kind.sub_category,
        article_type=kind.article_type,
        base_colour=colour,
        season=season,
        year=int(rng.integers(YEARS[0], YEARS[1] + 1)),
        usage=usage,
        product_display_name=_display_name(rng, kind, gender, colour, pattern),
        pattern=pattern,
        sleeve_length=sleeve,
    )


def sample_rows(count: int, seed: int = 0, *, start_id: int = 1) -> list[ProductRow]:
    """The rows ``generate`` writes, without drawing any image: ids ``start_id .. start_id+count-1``."""
    _check_arguments(count, seed, start_id)
    return [sample_row(pid, seed) for pid in range(start_id, start_id + count)]


def _check_arguments(count: int, seed: int, start_id: int) -> None:
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if start_id < 0:
        raise ValueError(f"start_id must be >= 0, got {start_id}")


# ------------------------------------------------------------------------------------------ geometry


@dataclass(frozen=True)
class Mark:
    """A detail drawn over the product: a filled polygon (``width == 0``) or a polyline (local units)."""

    points: Points
    role: str  # a key of ``_Palette.roles``
    width: float = 0.0
    outlined: bool = False  # a thin outline, for details that must stand out (a shirt's collar)


@dataclass(frozen=True)
class Shape:
    """A product in local units: ``body`` polygons carry the colour and pattern; all of it is outlined.

    ``trim`` polygons belong to the silhouette (outlined, shadowed) but are filled with the detail shade
    and never patterned (a bag's handle).
    """

    body: list[Points]
    marks: list[Mark] = field(default_factory=list)
    trim: list[Points] = field(default_factory=list)

    def all_points(self) -> Points:
        return np.concatenate(self.body + self.trim + [m.points for m in self.marks])


def _pts(*xy: tuple[float, float]) -> Points:
    return np.asarray(xy, dtype=float)


def _mirror(points: Points) -> Points:
    """The left-hand side of a symmetric outline given its right-hand side (reversed order)."""
    return (points * np.array([-1.0, 1.0]))[::-1]


def _arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int = 9) -> Points:
    t = np.radians(np.linspace(a0, a1, n))
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> Points:
    return _pts((x0, y0), (x1, y0), (x1, y1), (x0, y1))


def _circle(cx: float, cy: float, r: float) -> Points:
    return _arc(cx, cy, r, r, 0, 360, n=10)[:-1]


def _symmetric(neck: Points, right: Points) -> Points:
    """A closed outline from a neckline (left → right) and the right side (shoulder → hem centre)."""
    return np.concatenate([neck, right, _mirror(right)])


def _sleeve(
    shoulder: tuple[float, float], armpit: tuple[float, float], kind: str, length: float, neck: float
) -> Points:
    """Right sleeve points from the shoulder to the armpit.

    ``length`` is where a long sleeve's cuff is; ``neck`` is the neckline's half width (a sleeveless
    garment has a strap next to it and a deep armhole instead of a sleeve).
    """
    sx, sy = shoulder
    ax, ay = armpit
    if kind == "Short Sleeves":
        return _pts((sx, sy), (sx + 0.21, sy + 0.2), (sx + 0.12, sy + 0.33), (ax, ay))
    if kind == "Long Sleeves":
        return _pts((sx, sy), (sx + 0.24, length), (sx + 0.12, length + 0.03), (ax, ay))
    return _pts((neck + 0.09, sy - 0.04), (neck + 0.08, sy + 0.08), (ax - 0.03, ay - 0.05), (ax, ay))


def _top(sleeve: str, rng: np.random.Generator, *, collar: bool) -> Shape:
    """A T-shirt (round neck, straight hem) or a shirt (collar, button placket, curved tails)."""
    half = 0.3 * rng.uniform(0.93, 1.07)
    # Shirts are long (tails below the hips), T-shirts short and boxy: the silhouette alone tells them apart.
    length = (1.3 if collar else 0.82) * rng.uniform(0.95, 1.05)
    neck_w = 0.1
    neck = _arc(0, 0, neck_w, 0.1 if collar else 0.09, 180, 0)  # left → right, dipping in the middle
    arm = _sleeve((half, 0.05), (half, 0.3), sleeve, length - 0.08, neck_w)
    hem = _pts((half + 0.01, length), (0.0, length)) if not collar else _pts(
        (half + 0.01, length - 0.06), (half * 0.6, length), (0.0, length + 0.04)
    )
    body = _symmetric(neck, np.concatenate([arm, hem]))
    marks: list[Mark] = []
    if collar:
        # Collar and placket in the detail shade, large enough to read at 96 px: they are what tells
        # a shirt from a T-shirt once the photo is small.
        leaf = _pts((neck_w - 0.02, -0.05), (neck_w + 0.1, 0.02), (0.1, 0.26), (0.0, 0.11))
        marks.append(Mark(_rect(-0.055, 0.1, 0.055, length + 0.03), "detail", outlined=True))
        marks += [Mark(leaf, "detail", outlined=True), Mark(_mirror(leaf), "detail", outlined=True)]
        marks += [Mark(_circle(0.0, y, 0.02), "light") for y in np.arange(0.2, length - 0.02, 0.13)]
        marks.append(Mark(_pts((0.1, 0.26), (0.1, 0.4), (0.22, 0.4), (0.22, 0.26)), "detail", width=0.014))
    else:
        marks.append(Mark(neck, "detail", width=0.035))
    return Shape([body], marks)


def _tshirt(sleeve: str | None, rng: np.random.Generator) -> Shape:
    return _top(sleeve or "Short Sleeves", rng, collar=False)


def _shirt(sleeve: str | None, rng: np.random.Generator) -> Shape:
    return _top(sleeve or "Long Sleeves", rng, collar=True)


def _dress(sleeve: str | None, rng: np.random.Generator) -> Shape:
    """Fitted bodice, belt at the waist, skirt flaring to a curved hem."""
    flare = 0.44 * rng.uniform(0.9, 1.1)
    hem_y = 1.55 * rng.uniform(0.95, 1.05)
    neck = _arc(0, 0, 0.1, 0.12, 180, 0)
    arm = _sleeve((0.21, 0.04), (0.19, 0.24), sleeve or "Sleeveless", 0.78, 0.1)
    right = np.concatenate(
        [arm, _pts((0.15, 0.55), (0.16, 0.6)), _arc(0, hem_y - 0.08, flare, 0.1, 0, 90, n=6)]
    )
    body = _symmetric(neck, right)
    marks = [Mark(_rect(-0.155, 0.53, 0.155, 0.61), "base", outlined=True)]
    return Shape([body], marks)


def _legwear(rng: np.random.Generator, *, length: float, waist: float, hem: float, crotch: float) -> Shape:
    """Trousers and shorts: a waistband, two legs and a visible gap between them."""
    waist *= rng.uniform(0.94, 1.06)
    gap = 0.075
    right = _pts((waist, 0.0), (hem, length), (gap, length + 0.02), (0.0, crotch))
    body = np.concatenate([right, _mirror(right)[1:]])
    marks = [
        Mark(_rect(-waist, 0.0, waist, 0.065), "base", outlined=True),
        Mark(_pts((0.0, 0.065), (0.0, crotch - 0.04)), "detail", width=0.015),
        Mark(_pts((waist - 0.13, 0.065), (waist - 0.02, 0.2)), "detail", width=0.015),
        Mark(_pts((-waist + 0.13, 0.065), (-waist + 0.02, 0.2)), "detail", width=0.015),
    ]
    return Shape([body], marks)


def _trousers(sleeve: str | None, rng: np.random.Generator) -> Shape:
    return _legwear(rng, length=1.0 * rng.uniform(0.95, 1.05), waist=0.26, hem=0.3, crotch=0.3)


def _shorts(sleeve: str | None, rng: np.random.Generator) -> Shape:
    return _legwear(rng, length=0.5 * rng.uniform(0.92, 1.08), waist=0.3, hem=0.38, crotch=0.28)


def _skirt(sleeve: str | None, rng: np.random.Generator) -> Shape:
    """A trapezoid with a waistband, a curved hem and pleat lines."""
    hem = 0.44 * rng.uniform(0.9, 1.1)
    length = 0.85 * rng.uniform(0.92, 1.08)
    right = np.concatenate([_pts((0.2, 0.0)), _arc(0, length - 0.06, hem, 0.08, 0, 90, n=6)])
    body = np.concatenate([right, _mirror(right)[1:]])
    marks = [Mark(_rect(-0.2, 0.0, 0.2, 0.07), "base", outlined=True)]
    marks += [
        Mark(_pts((x * 0.2, 0.07), (x * (hem - 0.04), length - 0.02)), "detail", width=0.014)
        for x in (-0.5, 0.0, 0.5)
    ]
    return Shape([body], marks)


def _shoe(sleeve: str | None, rng: np.random.Generator) -> Shape:
    """A sneaker seen from the side, toe to the right: low upper, thick sole, laces."""
    h = 0.45 * rng.uniform(0.92, 1.08)
    top = h - 0.45  # shifts the upper when the shoe is taller or lower
    upper = _pts(
        (0.0, 0.42), (0.0, 0.2 + top), (0.04, 0.04 + top), (0.13, 0.0 + top), (0.32, 0.06 + top),
        (0.5, 0.13 + top), (0.66, 0.2), (0.85, 0.24), (0.96, 0.29), (1.0, 0.35), (1.0, 0.42),
    )  # fmt: skip
    body = np.concatenate([upper, _pts((1.0, 0.45), (0.0, 0.45))])
    sole = _pts((-0.01, 0.36), (1.01, 0.36), (1.01, 0.47), (-0.01, 0.47))
    marks = [Mark(sole, "sole")]
    marks += [
        Mark(_pts((0.36 + 0.07 * i, 0.1 + top * 0.5 + 0.03 * i), (0.41 + 0.07 * i, 0.19 + 0.02 * i)),
             "light", width=0.025)
        for i in range(3)
    ]  # fmt: skip
    marks.append(Mark(_pts((0.1, 0.08 + top), (0.12, 0.3)), "detail", width=0.02))
    return Shape([body], marks)


def _handbag(sleeve: str | None, rng: np.random.Generator) -> Shape:
    """A tote: trapezoid body, flap with a clasp, and a ring-shaped handle."""
    w = 0.43 * rng.uniform(0.92, 1.08)
    body = _pts((0.3, 0.38), (w, 0.88), (w - 0.04, 0.97), (-w + 0.04, 0.97), (-w, 0.88), (-0.3, 0.38))
    outer = _arc(0, 0.4, 0.23, 0.36, 180, 360)
    inner = _arc(0, 0.4, 0.17, 0.29, 360, 180)
    flap = _pts((-0.3, 0.38), (0.3, 0.38), (0.31, 0.5), (0.0, 0.6), (-0.31, 0.5))
    marks = [Mark(flap, "base", outlined=True), Mark(_rect(-0.04, 0.55, 0.04, 0.63), "light")]
    return Shape([body], marks, trim=[np.concatenate([outer, inner])])


SHAPES: dict[str, Callable[[str | None, np.random.Generator], Shape]] = {
    "Tshirts": _tshirt,
    "Shirts": _shirt,
    "Dresses": _dress,
    "Trousers": _trousers,
    "Shorts": _shorts,
    "Skirts": _skirt,
    "Casual Shoes": _shoe,
    "Handbags": _handbag,
}


def _normalised(shape: Shape, flip: bool) -> Shape:
    """Centre the shape on the origin and scale its longer side to 1 (optionally mirrored)."""
    pts = shape.all_points()
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    centre, scale = (lo + hi) / 2, 1.0 / float((hi - lo).max())
    sign = np.array([-1.0 if flip else 1.0, 1.0])

    def fix(p: Points) -> Points:
        return (p - centre) * scale * sign

    return Shape(
        [fix(p) for p in shape.body],
        [Mark(fix(m.points), m.role, m.width * scale, m.outlined) for m in shape.marks],
        [fix(p) for p in shape.trim],
    )


# ------------------------------------------------------------------------------------------ patterns


def _pattern(pattern: str, body: list[Points], rng: np.random.Generator) -> list[Points]:
    """Pattern polygons (local units) that cover a quarter to a third of the ``body``."""
    period = rng.uniform(0.17, 0.22)
    phase = rng.uniform(0, period)
    steps = np.arange(-0.6 + phase, 0.6, period)
    if pattern == "striped":
        w = 0.3 * period
        bands = [_rect(-0.6, y, 0.6, y + w) for y in steps]
        if rng.random() < 0.3:  # vertical stripes
            bands = [b[:, ::-1] for b in bands]
        return bands
    if pattern == "checked":
        w = 0.15 * period
        return [_rect(-0.6, y, 0.6, y + w) for y in steps] + [_rect(x, -0.6, x + w, 0.6) for x in steps]
    if pattern == "dotted":
        r = 0.27 * period
        return [
            _circle(x + (period / 2 if i % 2 else 0.0), y, r)
            for i, y in enumerate(steps)
            for x in steps
        ]
    if pattern == "printed":
        pts = np.concatenate(body)
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        count = max(2, round(float(np.prod(hi - lo)) * rng.uniform(8, 12)))
        return [_print_motif(rng, lo, hi) for _ in range(count)]
    return []


def _print_motif(rng: np.random.Generator, lo: Points, hi: Points) -> Points:
    """A triangle, square, pentagon or disc somewhere inside the box ``lo``–``hi``."""
    cx, cy = rng.uniform(lo + 0.06, np.maximum(hi - 0.06, lo + 0.06))
    r = rng.uniform(0.045, 0.075)
    sides = int(rng.choice([3, 4, 5, 10]))
    start = rng.uniform(0, 360)
    return _arc(cx, cy, r, r, start, start + 360, n=sides + 1)[:-1]


# ---------------------------------------------------------------------------------------- rendering


def _mix(rgb: Sequence[float], target: float, amount: float) -> RGB:
    r, g, b = (round(c + (target - c) * amount) for c in rgb)
    return (r, g, b)


def _luminance(rgb: Sequence[float]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


@dataclass(frozen=True)
class _Palette:
    """Colours of one product: the base and shades derived from it."""

    roles: dict[str, RGB]

    @classmethod
    def of(cls, base: RGB) -> _Palette:
        light = _luminance(base) >= 140
        toward = 0.0 if light else 255.0
        return cls(
            {
                "base": base,
                "shade": _mix(base, toward, 0.45),  # pattern overlay
                "detail": _mix(base, toward, 0.32),  # collar, placket, waistband, flap, handle
                "light": (40, 40, 40) if light else (238, 238, 238),  # buttons, laces, clasp
                "sole": (195, 195, 195) if _luminance(base) >= 230 else (238, 238, 238),
                "outline": _mix(base, 0.0, 0.55),
            }
        )


@dataclass(frozen=True)
class _Placement:
    """Local units → pixels: scale, rotate, translate."""

    size_px: float
    angle_rad: float
    centre: tuple[float, float]

    def __call__(self, points: Points) -> Points:
        c, s = math.cos(self.angle_rad), math.sin(self.angle_rad)
        rot = np.array([[c, s], [-s, c]]) * self.size_px
        return points @ rot + np.asarray(self.centre)


def _image_height(rng: np.random.Generator) -> int:
    """Mostly portrait catalogue shots (3:4-ish), sometimes anything in the allowed range."""
    if rng.random() < 0.6:
        return int(rng.integers(560, 760))
    return int(rng.integers(HEIGHT_RANGE[0], HEIGHT_RANGE[1] + 1))


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A light background with a faint vertical gradient and tint, every channel within 235–255."""
    top = rng.uniform(241, 255, size=3)
    bottom = np.clip(top - rng.uniform(0, 8) + rng.uniform(-2, 2, size=3), 235, 255)
    column = np.linspace(top, bottom, height).round().astype(np.uint8)[:, None, :]
    return Image.fromarray(column, "RGB").resize((width, height), Image.Resampling.NEAREST)


def _place(shape: Shape, rng: np.random.Generator, width: int, height: int) -> _Placement:
    """Random scale, rotation and position that keep the whole product inside the image."""
    short = min(width, height)
    margin = 0.03 * short
    size = rng.uniform(*PRODUCT_FRACTION) * short
    angle = math.radians(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    pts = _Placement(1.0, angle, (0.0, 0.0))(shape.all_points())
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    extent = hi - lo
    room = np.array([width, height], dtype=float) - 2 * margin
    size = min(size, float((room / extent).min()))
    free = room - extent * size
    corner = margin + rng.uniform(0, 1, size=2) * free - lo * size
    return _Placement(size, angle, (float(corner[0]), float(corner[1])))


def _xy(points: Points, offset: Sequence[float] = (0.0, 0.0)) -> list[float]:
    """Flat ``[x0, y0, x1, y1, ...]`` as ImageDraw takes it."""
    return (points - np.asarray(offset)).ravel().tolist()


def _draw_pattern(img: Image.Image, body: list[Points], pattern: list[Points], colour: RGB) -> None:
    """Paint ``pattern`` in ``colour``, clipped to the ``body`` polygons (all already in pixels)."""
    pts = np.concatenate(body)
    x0, y0 = np.floor(pts.min(axis=0)).astype(int)
    x1, y1 = np.ceil(pts.max(axis=0)).astype(int) + 1
    size = (int(x1 - x0), int(y1 - y0))
    silhouette, overlay = Image.new("L", size, 0), Image.new("L", size, 0)
    for poly in body:
        ImageDraw.Draw(silhouette).polygon(_xy(poly, (x0, y0)), fill=255)
    draw = ImageDraw.Draw(overlay)
    for poly in pattern:
        draw.polygon(_xy(poly, (x0, y0)), fill=255)
    img.paste(colour, (int(x0), int(y0), int(x1), int(y1)), ImageChops.multiply(silhouette, overlay))


def _jitter(rgb: RGB, rng: np.random.Generator) -> RGB:
    r, g, b = (int(v) for v in np.clip(np.asarray(rgb) + rng.integers(-4, 5, size=3), 0, 255))
    return (r, g, b)


def _draw_shadow(img: Image.Image, polygons: list[Points], size_px: float) -> None:
    """A faint drop shadow to the lower right, a few units darker than the background."""
    offset = 0.025 * size_px
    bg = img.getpixel((0, img.height - 1))
    shadow = _mix(bg if isinstance(bg, tuple) else (float(bg or 0),) * 3, 0.0, 0.06)
    draw = ImageDraw.Draw(img)
    for poly in polygons:
        draw.polygon(_xy(poly, (-offset, -offset)), fill=shadow)


def _draw_marks(img: Image.Image, shape: Shape, place: _Placement, palette: dict[str, RGB]) -> None:
    """Collars, plackets, buttons, waistbands, soles, laces, flaps."""
    draw = ImageDraw.Draw(img)
    outline_w = max(1, round(0.009 * place.size_px))
    for mark in shape.marks:
        pts = _xy(place(mark.points))
        if mark.width > 0:
            draw.line(pts, fill=palette[mark.role], width=max(2, round(mark.width * place.size_px)))
        else:
            draw.polygon(pts, fill=palette[mark.role])
        if mark.outlined:
            draw.line([*pts, *pts[:2]], fill=palette["outline"], width=outline_w)


def _draw_outlines(img: Image.Image, polygons: list[Points], colour: RGB, size_px: float) -> None:
    """A darker outline around the silhouette: it keeps white products visible on white."""
    draw = ImageDraw.Draw(img)
    width = max(2, round(0.018 * size_px))
    for poly in polygons:
        pts = _xy(poly)
        draw.line([*pts, *pts[:2]], fill=colour, width=width, joint="curve")


def render(row: ProductRow, seed: int) -> tuple[Image.Image, int]:
    """The product photo of ``row`` and the JPEG quality to save it with."""
    rng = _rng(seed, row.id, 1)
    width, height = IMAGE_WIDTH, _image_height(rng)
    img = _background(rng, width, height)
    shape = _normalised(SHAPES[row.article_type](row.sleeve_length, rng), flip=bool(rng.random() < 0.5))
    place = _place(shape, rng, width, height)
    palette = _Palette.of(_jitter(COLOURS[row.base_colour], rng)).roles
    body = [place(p) for p in shape.body]
    trim = [place(p) for p in shape.trim]

    if rng.random() < 0.7:
        _draw_shadow(img, body + trim, place.size_px)
    draw = ImageDraw.Draw(img)
    for poly in body:
        draw.polygon(_xy(poly), fill=palette["base"])
    for poly in trim:
        draw.polygon(_xy(poly), fill=palette["detail"])
    if row.pattern != "solid":
        motifs = [place(p) for p in _pattern(row.pattern, shape.body, rng)]
        _draw_pattern(img, body, motifs, palette["shade"])
    _draw_marks(img, shape, place, palette)
    _draw_outlines(img, body + trim, palette["outline"], place.size_px)
    quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    return img, quality


# --------------------------------------------------------------------------------------------- files


@dataclass(frozen=True)
class SynthSummary:
    """What ``generate`` wrote and how fast."""

    out_dir: Path
    count: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


# Written next to styles.csv: a catalogue of renders, which must never pass for real photos (export.images).
MARKER = "SYNTHETIC.txt"


def write_styles(path: Path, rows: Sequence[ProductRow]) -> None:
    """Write ``styles.csv`` (commas in names are quoted by the csv module)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(r.to_record() for r in rows)


def generate(
    out_dir: str | Path,
    count: int,
    seed: int = 0,
    *,
    start_id: int = 1,
    on_progress: Callable[[int], None] | None = None,
) -> SynthSummary:
    """Write ``count`` products to ``out_dir/styles.csv`` and ``out_dir/images/<id>.jpg``.

    Args:
        out_dir: target folder, created if missing; existing files of the same ids are overwritten.
        count: number of products.
        seed: catalogue seed (>= 0); the same seed gives byte-identical files.
        start_id: id of the first product; ids are consecutive.
        on_progress: called with the number of images written so far after each image.
    """
    started = time.perf_counter()
    rows = sample_rows(count, seed, start_id=start_id)
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for done, row in enumerate(rows, start=1):
        img, quality = render(row, seed)
        img.save(images / f"{row.id}.jpg", "JPEG", quality=quality)
        if on_progress is not None:
            on_progress(done)
    write_styles(out / "styles.csv", rows)
    (out / MARKER).write_text(f"Renders of `fashion synth` (training.synth), seed {seed}: not photos.\n")
    return SynthSummary(out_dir=out, count=count, seconds=time.perf_counter() - started)


def _benchmark(count: int = 1000) -> SynthSummary:

    with tempfile.TemporaryDirectory() as tmp:
        return generate(tmp, count, seed=0)


if __name__ == "__main__":
    summary = _benchmark()
    print(f"{summary.count} images in {summary.seconds:.2f} s: {summary.images_per_s:.0f} images/s")  # noqa: T201
