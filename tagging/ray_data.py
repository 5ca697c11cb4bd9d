"""``fashion tag --ray``: the same job as a Ray Data pipeline, for more than one machine.

The driver (where ``fashion tag`` runs) lists the pending inputs and writes the parts, exactly as without
Ray; the tagging runs in ``map_batches`` over an actor pool: each ``RayTagger`` actor builds one engine
(a runtime session for ``--local``, a client for ``--triton`` / ``--gateway``) once and tags batch after
batch with it, one call at a time, so the pool's size (``--ray-actors``) bounds the load on the server.
Rows come back in input order (``preserve_order``), so resuming works as without Ray.

The actors read the images from the paths of the manifest: on a cluster those must be on a volume every
node mounts (docs/tagging.md shows a KubeRay RayJob).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from tagging.engines import EngineSpec, build_engine
from tagging.inputs import Item
from tagging.pipeline import stream_rows

log = logging.getLogger(__name__)

BLOCK_ROWS = 256  # inputs per Ray Data batch handed to an actor


class RayTagger:
    """One actor of the pool: one engine, built once, tags the batches Ray Data hands it."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = dataclasses.replace(spec, concurrency=1)  # one call in flight per actor
        self.engine = build_engine(self.spec)
        self.schema = self.engine.columns.arrow_schema()

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        items = [Item(**row) for row in batch.to_pylist()]
        rows = list(stream_rows(self.engine, items, self.spec.decode_threads))
        return pa.Table.from_pylist(rows, schema=self.schema)


def ray_rows(
    spec: EngineSpec, items: Sequence[Item], *, address: str = "local", actors: int = 2, num_cpus: float = 1.0
) -> Iterator[dict[str, Any]]:
    """The rows of ``items``, in order, tagged by a pool of ``actors`` ``RayTagger`` actors on the Ray
    runtime at ``address`` (``"local"``: this machine's, started if none runs)."""
    if not items:
        return
    # lazy: Ray is an optional extra (pip install '.[ray]')
    import ray

    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False  # the driver's bar counts the rows
    dataset = ray.data.from_items([dataclasses.asdict(item) for item in items])
    tagged = dataset.map_batches(
        RayTagger,
        fn_constructor_kwargs={"spec": spec},
        batch_size=min(BLOCK_ROWS, max(1, len(items))),
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=num_cpus,
    )
    batch: Any
    for batch in tagged.iter_batches(batch_format="pyarrow", batch_size=None):
        yield from batch.to_pylist()
