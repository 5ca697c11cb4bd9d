"""Dataset readers, the label schema built from a training split, and the split itself.

Three layouts, chosen from the folder's contents or explicitly with ``format``:

- ``kaggle``: Kaggle "Fashion Product Images" — ``styles.csv`` + ``images/<id>.jpg``.
- ``meesho``: Meesho "Visual Taxonomy" — ``train.csv`` (``id, Category, len, attr_1..attr_10``) +
  ``category_attributes.parquet`` + ``train_images/<id:06d>.jpg``; slot ``attr_k`` means a different
  attribute in each category, so every (category, attribute) pair is its own head and heads of other
  categories are masked (not applicable), never learned as a class.
- ``csv``: a plain CSV file with an image-path column and attribute columns.

Rows that cannot be used (malformed, image missing) are returned as ``Problem`` records with file,
row and reason; a reader never raises for one bad row and never drops one silently.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fashion.errors import UserError
from fashion.schema import MISSING, OTHER, Attribute, LabelSchema, Role

log = logging.getLogger(__name__)

FORMATS = ("auto", "kaggle", "meesho", "csv")
KAGGLE_DEFAULT_ATTRIBUTES = (
    "gender",
    "masterCategory",
    "subCategory",
    "articleType",
    "baseColour",
    "season",
    "usage",
)
# What the Kaggle columns are (``fashion.schema.Role``); the other columns' roles are inferred.
KAGGLE_ROLES = {"articleType": Role.PRODUCT_TYPE, "baseColour": Role.COLOUR}
# Columns of styles.csv that are not attributes to learn.
KAGGLE_NON_ATTRIBUTES = {"id", "year", "productDisplayName"}
TITLE = "title"  # Sample.extra key of the listing's title: styles.csv's productDisplayName, a CSV's title
TITLE_COLUMNS = ("title", "productDisplayName", "product_title", "name")  # a plain CSV's title column
MISSING_TEXT = {"", "NA", "N/A", "nan", "NaN", "None", "null", "dummy"}
IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename", "image_file")


class DatasetError(UserError, ValueError):
    """The dataset as a whole cannot be read (missing files, unknown layout, bad attribute names)."""


@dataclass(frozen=True)
class Problem:
    file: str
    row: int  # 1-based line number in the file (header = line 1)
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.row}: {self.reason}"


@dataclass(frozen=True)
class Sample:
    id: str
    image_path: str
    labels: dict[str, str | None]  # head name → class text, None when missing or not applicable
    category: str | None = None
    row: int = 0  # line in the source table, for problem reports
    # Columns that are not labels but describe the listing: the product title (``TITLE``), the year a
    # drift split can cut on (``fashion train --split-by year --val-from 2012``).
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def title(self) -> str:
        """The listing's title ("" when the layout has none, as Meesho's)."""
        return self.extra.get(TITLE, "")


@dataclass
class Catalogue:
    """What a reader returns: usable samples, candidate heads and the problems it found."""

    format: str
    root: Path
    samples: list[Sample]
    attributes: list[str]  # head names, in order
    problems: list[Problem] = field(default_factory=list)
    category_column: str | None = None
    head_category: dict[str, str] = field(default_factory=dict)  # head → category (meesho)
    head_label: dict[str, str] = field(default_factory=dict)  # head → attribute as people say it
    head_role: dict[str, Role] = field(default_factory=dict)  # head → its role, where the layout says

    def summary(self) -> str:
        return (
            f"{self.format} catalogue at {self.root}: {len(self.samples)} samples, "
            f"{len(self.attributes)} attributes, {len(self.problems)} problem rows"
        )


def _clean(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and np.isnan(value):
        return None
    text = str(value).strip()
    return None if text in MISSING_TEXT else text


def detect_format(path: Path) -> str:
    if path.is_file() and path.suffix.lower() == ".csv":
        return "csv"
    if (path / "styles.csv").is_file():
        return "kaggle"
    if (path / "category_attributes.parquet").is_file():
        return "meesho"
    raise DatasetError(
        f"cannot tell the layout of {path}: expected styles.csv (kaggle), train.csv + "
        "category_attributes.parquet (meesho), or a path to a .csv file (csv)"
    )


def read_catalogue(
    path: str | Path,
    format: str = "auto",
    attributes: Sequence[str] | None = None,
    *,
    split: str = "train",
    image_column: str | None = None,
    check_images: bool = True,
) -> Catalogue:
    """Read a dataset folder (or CSV file) in any supported layout."""
    root = Path(path)
    if not root.exists():
        raise DatasetError(f"{root} does not exist")
    if format not in FORMATS:
        raise DatasetError(f"unknown format {format!r}; choose one of {FORMATS}")
    fmt = detect_format(root) if format == "auto" else format
    if fmt == "kaggle":
        cat = _read_kaggle(root, attributes)
    elif fmt == "meesho":
        cat = _read_meesho(root, attributes, split)
    else:
        cat = _read_plain_csv(root, attributes, image_column)
    if check_images:
        _drop_missing_images(cat)
    for problem in cat.problems[:20]:
        log.warning("skipped row: %s", problem)
    if len(cat.problems) > 20:
        log.warning("... and %d more problem rows", len(cat.problems) - 20)
    return cat


def _drop_missing_images(cat: Catalogue) -> None:
    kept = []
    table = cat.root / "styles.csv" if cat.format == "kaggle" else cat.root
    if cat.format == "meesho":
        table = cat.root / "train.csv"
    for s in cat.samples:
        if Path(s.image_path).is_file():
            kept.append(s)
        else:
            cat.problems.append(Problem(str(table), s.row, f"image {s.image_path} not found"))
    cat.samples = kept


def _read_kaggle(root: Path, attributes: Sequence[str] | None) -> Catalogue:
    styles = root / "styles.csv"
    problems: list[Problem] = []
    with styles.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or "id" not in header:
            raise DatasetError(f"{styles} has no header with an 'id' column")
        rows = []
        for line_no, fields in enumerate(reader, start=2):
            if not fields:
                continue
            if len(fields) > len(header) and header[-1] == "productDisplayName":
                # The upstream file has display names with unquoted commas: they belong to the last column.
                fields = [*fields[: len(header) - 1], ",".join(fields[len(header) - 1 :])]
            if len(fields) != len(header):
                problems.append(
                    Problem(str(styles), line_no, f"expected {len(header)} fields, found {len(fields)}")
                )
                continue
            rows.append((line_no, dict(zip(header, fields, strict=True))))
    available = [c for c in header if c not in KAGGLE_NON_ATTRIBUTES]
    chosen = _choose(attributes, available, styles)
    samples = []
    for line_no, row in rows:
        pid = row["id"].strip()
        if not pid:
            problems.append(Problem(str(styles), line_no, "empty id"))
            continue
        samples.append(
            Sample(
                id=pid,
                image_path=str(root / "images" / f"{pid}.jpg"),
                labels={a: _clean(row[a]) for a in chosen},
                row=line_no,
                extra=_extra(row, "productDisplayName", exclude=set(chosen)),
            )
        )
    roles = {h: KAGGLE_ROLES[h] for h in chosen if h in KAGGLE_ROLES}
    return Catalogue("kaggle", root, samples, chosen, problems, head_role=roles)


def _extra(row: dict[str, Any], title_column: str | None, exclude: set[str]) -> dict[str, str]:
    """The row's non-label columns as text (``title`` for the title column), empty values left out."""
    out: dict[str, str] = {}
    for key, value in row.items():
        if key in exclude or key == "id":
            continue
        text = _clean(value)
        if text is not None:
            out[TITLE if key == title_column else key] = text
    return out


def _choose(attributes: Sequence[str] | None, available: Sequence[str], source: Path) -> list[str]:
    if attributes is None:
        return list(available)
    unknown = [a for a in attributes if a not in available]
    if unknown:
        raise DatasetError(f"attributes {unknown} are not columns of {source}; available: {list(available)}")
    return list(attributes)


def _read_parquet(path: Path) -> Any:
    """A small parquet file as a DataFrame, read without Arrow's thread pools.

    ``pd.read_parquet`` starts Arrow's CPU and I/O worker threads; at interpreter exit those threads
    free their bundled-mimalloc heaps while the allocator is being torn down, which segfaulted the test
    process after every test had passed (gdb: ``_mi_thread_done`` in libarrow, apache/arrow#38352).
    This file is a few KiB: one thread reads it as fast.
    """
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path, pre_buffer=False).read(use_threads=False)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path} is not a readable parquet file: {e}") from e
    return table.to_pandas(use_threads=False)


def _read_meesho(root: Path, attributes: Sequence[str] | None, split: str) -> Catalogue:
    import pandas as pd

    table = root / f"{split}.csv"
    if not table.is_file():
        raise DatasetError(f"{table} not found (Meesho layout: train.csv / test.csv)")
    cat_attrs = _read_parquet(root / "category_attributes.parquet")
    schema: dict[str, list[str]] = {}
    for _, row in cat_attrs.iterrows():
        schema[str(row["Category"])] = [str(a) for a in list(row["Attribute_list"])]
    heads: list[str] = []
    head_category: dict[str, str] = {}
    head_label: dict[str, str] = {}
    for group, names in schema.items():
        for name in names:
            if attributes is not None and name not in attributes:
                continue
            head = f"{group}/{name}"
            heads.append(head)
            head_category[head] = group
            head_label[head] = name
    if not heads:
        raise DatasetError(f"no attributes left in {root} after choosing {list(attributes or [])}")
    frame = pd.read_csv(table, dtype=str, keep_default_na=False)
    problems: list[Problem] = []
    samples = []
    image_dir = root / f"{split}_images"
    for i, row in enumerate(frame.to_dict("records")):
        line_no = i + 2
        category = _clean(row.get("Category"))
        raw_id = _clean(row.get("id"))
        if category not in schema or raw_id is None or not raw_id.isdigit():
            problem = f"unknown category {category!r} or bad id {raw_id!r}"
            problems.append(Problem(str(table), line_no, problem))
            continue
        labels: dict[str, str | None] = {}
        for k, name in enumerate(schema[category], start=1):
            head = f"{category}/{name}"
            if head in head_category:
                labels[head] = _clean(row.get(f"attr_{k}"))
        samples.append(
            Sample(
                id=raw_id,
                image_path=str(image_dir / f"{int(raw_id):06d}.jpg"),
                labels=labels,
                category=category,
                row=line_no,
            )
        )
    return Catalogue("meesho", root, samples, heads, problems, "Category", head_category, head_label)


def _read_plain_csv(path: Path, attributes: Sequence[str] | None, image_column: str | None) -> Catalogue:
    import pandas as pd

    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    columns = list(frame.columns)
    column = image_column or next((c for c in IMAGE_COLUMNS if c in columns), None)
    if column is None or column not in columns:
        raise DatasetError(
            f"{path} has no image column; name it one of {IMAGE_COLUMNS} or pass --image-column"
        )
    title = next((c for c in TITLE_COLUMNS if c in columns), None)
    available = [c for c in columns if c not in {column, "id", title}]
    chosen = _choose(attributes, available, path)
    problems: list[Problem] = []
    samples = []
    for i, row in enumerate(frame.to_dict("records")):
        image = _clean(row[column])
        if image is None:
            problems.append(Problem(str(path), i + 2, "empty image path"))
            continue
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
        samples.append(
            Sample(
                id=_clean(row.get("id")) or str(i),
                image_path=str(image_path),
                labels={a: _clean(row[a]) for a in chosen},
                row=i + 2,
                extra=_extra(row, title, exclude={*chosen, column}),
            )
        )
    return Catalogue("csv", path, samples, chosen, problems)


# --- label schema -------------------------------------------------------------------------------


def build_schema(cat: Catalogue, samples: Sequence[Sample], min_class_count: int = 0) -> LabelSchema:
    """Classes per head from ``samples`` (the training split), sorted; rare classes folded into ``other``.

    ``min_class_count`` ≤ 1 turns folding off. A head with no labelled sample is dropped with a warning.
    """
    attributes = []
    for head in cat.attributes:
        counts = Counter(v for s in samples if (v := s.labels.get(head)) is not None)
        if not counts:
            log.warning("attribute %s has no labels in the training split; it is left out", head)
            continue
        kept = sorted(c for c, n in counts.items() if n >= max(min_class_count, 1))
        folded = len(kept) < len(counts)
        if folded and OTHER in kept:
            kept.remove(OTHER)
        classes = (*kept, OTHER) if folded else tuple(kept)
        attributes.append(
            Attribute(
                name=head,
                classes=classes,
                label=cat.head_label.get(head, head),
                category=cat.head_category.get(head),
                role=cat.head_role.get(head),
            )
        )
    if not attributes:
        raise DatasetError("no attribute has any label in the training split")
    return LabelSchema(tuple(attributes), category_column=cat.category_column)


def encode(schema: LabelSchema, samples: Sequence[Sample]) -> np.ndarray:
    """Labels as an ``(n_samples, n_heads)`` int64 array; ``MISSING`` where absent or not applicable."""
    out = np.full((len(samples), len(schema.attributes)), MISSING, dtype=np.int64)
    for i, s in enumerate(samples):
        for j, a in enumerate(schema.attributes):
            out[i, j] = a.index(s.labels.get(a.name))
    return out


# --- split --------------------------------------------------------------------------------------


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.blake2b(f.read(), digest_size=16).hexdigest()


def stratified_split(
    samples: Sequence[Sample],
    stratify_on: str | None,
    val_fraction: float = 0.2,
    seed: int = 0,
    *,
    group_duplicates: bool = True,
) -> tuple[list[Sample], list[Sample]]:
    """A train/validation split, stratified on one head (or the category), with a fixed seed.

    Byte-identical images are kept on the same side so that validation never scores a memorised copy.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in (0, 1), got {val_fraction}")
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        key = file_digest(s.image_path) if group_duplicates and Path(s.image_path).is_file() else f"#{i}"
        groups.setdefault(key, []).append(i)
    group_list = list(groups.values())

    def stratum(indices: list[int]) -> str:
        s = samples[indices[0]]
        if stratify_on is None:
            return s.category or ""
        return str(s.labels.get(stratify_on))

    strata: dict[str, list[int]] = {}
    for g, members in enumerate(group_list):
        strata.setdefault(stratum(members), []).append(g)
    rng = np.random.default_rng(seed)
    val_groups: set[int] = set()
    for name in sorted(strata):
        members = strata[name]
        order = rng.permutation(len(members))
        n_val = round(len(members) * val_fraction)
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        val_groups.update(members[k] for k in order[:n_val])
    train = [samples[i] for g, m in enumerate(group_list) if g not in val_groups for i in m]
    val = [samples[i] for g, m in enumerate(group_list) if g in val_groups for i in m]
    return train, val


def split_by_column(
    samples: Sequence[Sample], column: str, val_from: str
) -> tuple[list[Sample], list[Sample], int]:
    """(train, validation, rows without the column): rows whose ``column`` is below ``val_from`` train,
    the rest validate — a split by period (``year``) that shows the drift a random split hides. Numbers
    compare as numbers, anything else as text."""

    def key(value: str) -> tuple[int, float | str]:
        try:
            return (0, float(value))
        except ValueError:
            return (1, value)

    cut = key(val_from)
    train, val, missing = [], [], 0
    for s in samples:
        value = s.extra.get(column)
        if value is None:
            missing += 1
        elif key(value) < cut:
            train.append(s)
        else:
            val.append(s)
    if not train or not val:
        raise DatasetError(
            f"--split-by {column} --val-from {val_from} leaves {len(train)} training and {len(val)} "
            f"validation rows; choose a value between the column's smallest and largest"
        )
    return train, val, missing


def split_held_out(samples: list, hold_out: tuple[str, ...]) -> tuple[list, list]:
    """(kept, held out): a sample is held out when one of its labels is a held-out ``attribute=class``."""
    pairs = [tuple(item.split("=", 1)) for item in hold_out]
    held = [s for s in samples if any(s.labels.get(attr) == cls for attr, cls in pairs)]
    chosen = {id(s) for s in held}
    return [s for s in samples if id(s) not in chosen], held
