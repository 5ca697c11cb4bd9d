"""The ``fashion tag`` job: inputs → an engine → Parquet parts, resumable, with a progress bar.

``tag(job)`` is four short steps: read the inputs, open the output folder (a new job, or the rest of one
a killed or stopped run left), tag the pending inputs, say what was done. In this process the inputs are
decoded on ``decode_threads`` threads while ``concurrency`` batches are being inferred (``stream_rows``);
with ``--ray`` the same ``stream_rows`` runs inside the actors of a Ray Data pipeline
(``tagging.ray_data``). Either way rows come back in input order and each part is written whole.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from fashion.console import emit, table
from tagging.columns import ModelRef
from tagging.engines import Engine, EngineDown, EngineSpec, build_engine, describe
from tagging.errors import TagError
from tagging.inputs import Inputs, Item, ManifestColumns, read_inputs
from tagging.pipeline import stream_rows
from tagging.store import Part, Store, rows_in

log = logging.getLogger(__name__)
Say = Callable[[str], None]
MANIFEST = ManifestColumns()


@dataclass(frozen=True)
class TagJob:
    """One ``fashion tag`` command."""

    source: Path
    out: Path
    engine: EngineSpec
    part_size: int = 1000
    manifest: ManifestColumns = MANIFEST
    ray: str | None = None  # None: in this process; "local": a local Ray runtime; else a Ray address
    ray_actors: int = 2  # the actor pool's size: it bounds the load on the server (one call per actor)
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", Path(self.source))
        object.__setattr__(self, "out", Path(self.out))
        if self.ray_actors < 1:
            raise TagError("--ray-actors must be at least 1")


@dataclass(frozen=True)
class TagSummary:
    """What one run did: ``tagged`` inputs now (``errors`` of them error rows), after ``resumed`` earlier."""

    out: Path
    inputs: int
    resumed: int
    tagged: int
    errors: int
    parts: int
    seconds: float  # tagging, after the engine was ready
    start_s: float  # building the engine (a session, a connection)
    model: ModelRef
    engine: str

    @property
    def images_per_s(self) -> float:
        return self.tagged / self.seconds if self.seconds > 0 else 0.0


def tag(job: TagJob, say: Say = emit, on_ready: Callable[[], None] | None = None) -> TagSummary:
    """Tag every input of ``job`` not yet in ``job.out``; ``TagError`` (``EngineDown``) stops it resumably.

    ``on_ready`` is called once the engine is built and the output folder open, before the first input
    (the bench measures from there)."""
    inputs = read_inputs(job.source, job.manifest)
    _check_out(job, inputs)
    try:
        summary = _tag(job, inputs, say, on_ready)
    except EngineDown as e:
        raise EngineDown(
            f"{e}. {rows_in(job.out)} of {len(inputs)} inputs are tagged in {job.out}; run the same command "
            "again to tag the rest"
        ) from e
    say(describe_summary(summary))
    return summary


def _tag(job: TagJob, inputs: Inputs, say: Say, on_ready: Callable[[], None] | None) -> TagSummary:
    started = time.perf_counter()
    engine = None if job.ray else build_engine(job.engine)
    try:
        view = describe(job.engine) if engine is None else engine.view
        store = Store.open(job.out, inputs, job.part_size, view.model, view.columns)
        pending = store.pending()
        items = store.items(pending, inputs)
        resumed = len(inputs) - len(items)
        if resumed:
            say(f"resuming {job.out}: {resumed} of {len(inputs)} inputs are tagged already")
        start_s = time.perf_counter() - started
        if on_ready is not None:
            on_ready()
        started = time.perf_counter()
        rows = _rows(job, engine, items)
        tagged, errors = write_parts(store, pending, rows, _bar(job, len(inputs), resumed))
    finally:
        if engine is not None:
            engine.close()
    seconds = time.perf_counter() - started
    return TagSummary(
        job.out, len(inputs), resumed, tagged, errors, len(store.parts), seconds, start_s, view.model,
        _engine_name(job),
    )  # fmt: skip


def _check_out(job: TagJob, inputs: Inputs) -> None:
    out, source = job.out.resolve(), inputs.source
    if source.is_dir() and (out == source or source in out.parents):
        raise TagError(f"--out {job.out} lies in the input folder {job.source}: its parts would be inputs")


def _rows(job: TagJob, engine: Engine | None, items: Sequence[Item]) -> Iterator[dict[str, Any]]:
    if engine is not None:
        return stream_rows(engine, items, job.engine.decode_threads)
    # lazy: Ray is an optional extra, imported only for --ray
    from tagging.ray_data import ray_rows

    return ray_rows(job.engine, items, address=job.ray or "local", actors=job.ray_actors)


def _engine_name(job: TagJob) -> str:
    name = job.engine.kind
    return f"{name} on Ray ({job.ray}, {job.ray_actors} actors)" if job.ray else name


def _bar(job: TagJob, total: int, initial: int) -> Any:
    # lazy: tqdm comes with the train extra; a gateway-only install can still import this module
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="tag", disable=not job.progress, smoothing=0.1)


def write_parts(
    store: Store, parts: Sequence[Part], rows: Iterator[dict[str, Any]], bar: Any
) -> tuple[int, int]:
    """Fill ``parts`` in order from ``rows`` (one per input), each written whole; (rows, error rows)."""
    tagged = errors = 0
    with bar:
        for part in parts:
            chunk: list[dict[str, Any]] = []
            for row in islice(rows, part.size):
                chunk.append(row)
                errors += row["error"] is not None
                bar.update(1)
            if len(chunk) != part.size:
                raise AssertionError(f"the engine returned {len(chunk)} rows for {part.size} inputs")
            store.write(part, chunk)
            tagged += len(chunk)
            bar.set_postfix(errors=errors, refresh=False)
    return tagged, errors


def describe_summary(s: TagSummary) -> str:
    rate = f"{s.images_per_s:.1f}" if s.tagged else "-"
    head = f"tagged {s.tagged} inputs into {s.out} ({s.parts} parts)"
    if s.resumed:
        head += f", resuming after {s.resumed}"
    cells = [s.engine, s.model, s.inputs, s.tagged, s.errors, f"{s.seconds:.1f}", rate, f"{s.start_s:.1f}"]
    headers = ["engine", "model", "inputs", "tagged now", "error rows", "seconds", "images/s", "start s"]
    return head + "\n" + table(headers, [cells])
