"""The output folder of ``fashion tag``: Parquet parts written whole or not at all, and a state file.

::

    OUT/_tagging.json        the job: inputs (count, SHA-256 of ids/paths/titles), part size, model, columns
    OUT/part-00000.parquet   inputs 0 .. part_size-1, in input order
    OUT/part-00001.parquet   ...

Part ``k`` holds exactly the inputs ``k * part_size`` up to the next part's first, one row each. A part is
written to a temporary name, flushed to disk and renamed into place, so a kill at any moment leaves either
the whole part or none of it; a rerun of the same command tags the parts that are not there (or hold the
wrong number of rows) and nothing else. Read the result with any Parquet reader, e.g.
``pandas.read_parquet(OUT)`` (files starting with ``_`` or ``.`` are skipped by pyarrow's dataset reader).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tagging.columns import ModelRef, TagColumns
from tagging.errors import TagError
from tagging.inputs import Inputs, Item

log = logging.getLogger(__name__)

STATE = "_tagging.json"
FORMAT = "fashion-tagger/tag@1"


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


@dataclass(frozen=True)
class Part:
    """Which inputs one part file holds."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return part_name(self.index)

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class JobState:
    """What ``OUT/_tagging.json`` records; a rerun must match it to resume."""

    inputs: int
    fingerprint: str
    source: str
    part_size: int
    model: ModelRef
    columns: TagColumns

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "inputs": {"count": self.inputs, "sha256": self.fingerprint, "source": self.source},
            "part_size": self.part_size,
            "model": {"name": self.model.name, "version": self.model.version},
            "columns": self.columns.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobState:
        if d.get("format") != FORMAT:
            raise TagError(f"{STATE} has format {d.get('format')!r}, this version reads {FORMAT!r}")
        return cls(
            inputs=int(d["inputs"]["count"]),
            fingerprint=str(d["inputs"]["sha256"]),
            source=str(d["inputs"]["source"]),
            part_size=int(d["part_size"]),
            model=ModelRef(str(d["model"]["name"]), int(d["model"]["version"])),
            columns=TagColumns.from_dict(d["columns"]),
        )


class Store:
    """The output folder of one job: which parts are done, and writing the others."""

    def __init__(self, out: Path, state: JobState) -> None:
        self.out = out
        self.state = state
        self.schema = state.columns.arrow_schema()
        n, size = state.inputs, state.part_size
        self.parts = tuple(Part(k, start, min(start + size, n)) for k, start in enumerate(range(0, n, size)))

    @classmethod
    def open(
        cls, out: str | Path, inputs: Inputs, part_size: int, model: ModelRef, columns: TagColumns
    ) -> Store:
        """The store for this job in ``out``: a new one, or the one a same earlier run left (resume).

        ``TagError`` when ``out`` holds another job's output (other inputs, part size or model)."""
        if part_size < 1:
            raise TagError(f"--part-size must be at least 1, got {part_size}")
        out = Path(out)
        wanted = JobState(len(inputs), inputs.fingerprint(), str(inputs.source), part_size, model, columns)
        path = out / STATE
        if path.is_file():
            try:
                found = JobState.from_dict(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise TagError(f"{path} is unreadable ({e}); remove {out} to start again") from e
            differs = [
                what
                for what, same in (
                    ("inputs", (found.inputs, found.fingerprint) == (wanted.inputs, wanted.fingerprint)),
                    ("part size", found.part_size == wanted.part_size),
                    ("model", found.model == wanted.model),
                    ("columns", found.columns == wanted.columns),
                )
                if not same
            ]
            if differs:
                raise TagError(
                    f"{out} holds the output of another job (its {', '.join(differs)} differ: "
                    f"{found.inputs} inputs of {found.source}, part size {found.part_size}, {found.model}); "
                    "choose another --out, or remove it to start again"
                )
        elif out.exists() and any(out.iterdir()):
            raise TagError(f"{out} exists and is not the output of fashion tag; choose another --out")
        else:
            out.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, (json.dumps(wanted.to_dict(), indent=2) + "\n").encode())
        store = cls(out, wanted)
        store.remove_leftovers()
        return store

    def remove_leftovers(self) -> None:
        """Temporary files of a run that was killed while writing."""
        for leftover in self.out.glob(".*.partial"):
            leftover.unlink(missing_ok=True)

    def done(self, part: Part) -> bool:
        """Whether ``part``'s file is there with one row per input (a complete file is never half written)."""
        path = self.out / part.name
        if not path.is_file():
            return False
        import pyarrow.parquet as pq

        try:
            return bool(pq.read_metadata(path).num_rows == part.size)
        except Exception as e:  # an unreadable part is tagged again
            log.warning("%s is unreadable (%s); tagging its inputs again", path, e)
            return False

    def pending(self) -> list[Part]:
        return [p for p in self.parts if not self.done(p)]

    def items(self, parts: Sequence[Part], inputs: Inputs) -> list[Item]:
        return [item for p in parts for item in inputs.items[p.start : p.stop]]

    def write(self, part: Part, rows: Sequence[dict[str, Any]]) -> Path:
        """Write ``part`` whole: a temporary file, flushed, renamed into place."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if len(rows) != part.size:
            raise AssertionError(f"{part.name}: {len(rows)} rows for {part.size} inputs")
        table = pa.Table.from_pylist(list(rows), schema=self.schema)
        final = self.out / part.name
        partial = self.out / f".{part.name}.partial"
        with partial.open("wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, final)
        _fsync_dir(self.out)
        return final


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rows_in(out: str | Path) -> int:
    """How many rows the complete parts in ``out`` hold (0 when there are none)."""
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(p).num_rows for p in sorted(Path(out).glob("part-*.parquet")))


def read_rows(out: str | Path) -> list[dict[str, Any]]:
    """Every row of an output folder, in input order (for tests and small outputs)."""
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for path in sorted(Path(out).glob("part-*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return rows
