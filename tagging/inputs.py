"""What ``fashion tag`` tags: a folder of images, or a manifest (CSV, Parquet) of ids, image paths, titles.

A folder: every regular file below it (hidden ones excepted) is one input, in sorted order; its id is its
path relative to the folder without the extension (``10005.jpg`` → ``10005``). Files that are not images
are inputs too: they become rows with an error. A manifest: one input per row, ``id`` and ``image`` columns
(a path, relative to the manifest's folder unless absolute) and, where the catalogue has one, ``title``.
Ids must be unique: the output has exactly one row per id.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tagging.errors import TagError

MANIFEST_SUFFIXES = (".csv", ".parquet")


@dataclass(frozen=True)
class Item:
    """One input: its position in the job, its id, the image file and its title (``None``: none)."""

    index: int
    id: str
    path: str
    title: str | None = None


@dataclass(frozen=True)
class ManifestColumns:
    """The manifest's column names."""

    id: str = "id"
    image: str = "image"
    title: str = "title"


@dataclass(frozen=True)
class Inputs:
    """The inputs of one job, in order, and where they came from."""

    source: Path
    items: tuple[Item, ...]
    has_titles: bool = False

    def __len__(self) -> int:
        return len(self.items)

    def fingerprint(self) -> str:
        """SHA-256 of every id, path and title, in order: a rerun resumes only the very same job."""
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(f"{item.id}\t{item.path}\t{item.title or ''}\n".encode())
        return digest.hexdigest()


def read_inputs(source: str | Path, columns: ManifestColumns = ManifestColumns()) -> Inputs:
    """The inputs of ``source`` (a folder, a ``.csv`` or ``.parquet`` manifest); ``TagError`` if unusable."""
    path = Path(source)
    if path.is_dir():
        items = _folder(path)
        has_titles = False
    elif path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        items, has_titles = _manifest(path, columns)
    elif path.exists():
        raise TagError(f"{path} is neither a folder nor a manifest ({' or '.join(MANIFEST_SUFFIXES)})")
    else:
        raise TagError(f"{path} does not exist")
    if not items:
        raise TagError(f"{path} holds no inputs")
    _check_unique(items, path)
    return Inputs(path.resolve(), tuple(items), has_titles)


def _folder(root: Path) -> list[Item]:
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    return [
        Item(i, p.relative_to(root).with_suffix("").as_posix(), str(p.resolve())) for i, p in enumerate(files)
    ]


def _manifest(path: Path, columns: ManifestColumns) -> tuple[list[Item], bool]:
    table = _read_table(path)
    missing = [c for c in (columns.id, columns.image) if c not in table]
    if missing:
        raise TagError(
            f"{path} has no column {', '.join(map(repr, missing))} (it has {', '.join(table) or 'none'}); "
            "name them with --id-column / --image-column"
        )
    ids, images = table[columns.id], table[columns.image]
    titles = table.get(columns.title)
    base = path.parent.resolve()
    items = []
    for i, (raw_id, raw_image) in enumerate(zip(ids, images, strict=True)):
        if raw_id in (None, "") or raw_image in (None, ""):
            raise TagError(f"{path}: row {i + 1} has no {columns.id!r} or no {columns.image!r}")
        image = Path(str(raw_image))
        title = None if titles is None or titles[i] in (None, "") else str(titles[i])
        items.append(Item(i, str(raw_id), str(image if image.is_absolute() else base / image), title))
    return items, titles is not None


def _read_table(path: Path) -> dict[str, Sequence[object]]:
    """Column name → values (CSV as text; Parquet as its types)."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pydict()
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a file it cannot read
            raise TagError(f"{path} is not a readable Parquet file: {e}") from e
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    names = list(rows[0]) if rows else []
    return {name: [row[name] for row in rows] for name in names}


def _check_unique(items: Sequence[Item], source: Path) -> None:
    repeated = [k for k, n in Counter(item.id for item in items).items() if n > 1]
    if repeated:
        shown = ", ".join(map(repr, repeated[:5]))
        raise TagError(
            f"{source}: {len(repeated)} ids occur more than once (e.g. {shown}); the output has one row per "
            "id: give each input its own id (in a folder, files that differ only by extension share one)"
        )
