"""Copy a small set of a checkpoint's validation photos, with their labels and titles, next to it.

The shipped default model carries real photos it never trained on (``models/default/photos/``: Kaggle
layout, ``styles.csv`` + ``images/``), so that ``fashion export`` gates INT8 and BF16 on real photos on any
machine, also where the training data is not on disk. Usage (what made the shipped set)::

    python scripts/ship_validation_photos.py --checkpoint models/default/model.pt \
        --out models/default/photos --count 640 --max-mb 5

The photos are drawn from the checkpoint's validation split (re-created from its training data), spread
over article types in proportion (every type that has any validation photo keeps at least one), with a fixed
seed.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np

from training.checkpoint import load_checkpoint
from training.context import validation_samples

COLUMNS = ("id", "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "year",
           "usage", "productDisplayName")


def pick(samples: list, count: int, seed: int = 0) -> list:
    """``count`` samples spread over article types in proportion, at least one per type, in a fixed order."""
    by_type: dict[str, list] = defaultdict(list)
    for s in samples:
        by_type[str(s.labels.get("articleType"))].append(s)
    rng = np.random.default_rng(seed)
    chosen = []
    for kind in sorted(by_type):
        members = by_type[kind]
        want = max(1, round(count * len(members) / len(samples)))
        chosen += [members[i] for i in rng.permutation(len(members))[:want]]
    order = rng.permutation(len(chosen))
    return [chosen[i] for i in order[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=640)
    parser.add_argument("--max-mb", type=float, default=5.0)
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    chosen = pick(validation_samples(ckpt), args.count)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "images").mkdir(parents=True)
    total = 0
    with (out / "styles.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for s in chosen:
            size = Path(s.image_path).stat().st_size
            if total + size > args.max_mb * 2**20:
                break
            shutil.copyfile(s.image_path, out / "images" / f"{s.id}.jpg")
            total += size
            writer.writerow([s.id, *(s.labels.get(c) or "" for c in COLUMNS[1:7]), s.extra.get("year", ""),
                             s.labels.get("usage") or "", s.title])
    print(f"wrote {len(list((out / 'images').iterdir()))} photos ({total / 2**20:.2f} MB) to {out}")  # noqa: T201


if __name__ == "__main__":
    main()
