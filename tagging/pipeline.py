"""The in-process pipeline: inputs decoded on threads while batches are inferred, rows out in input order.

``stream_rows`` is what ``fashion tag`` runs in its own process and what each Ray actor runs on its share.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Any, TypeVar

from tagging.engines import Engine
from tagging.inputs import Item

A = TypeVar("A")
R = TypeVar("R")


def ordered_map(
    fn: Callable[[A], R], items: Iterable[A], pool: ThreadPoolExecutor, ahead: int
) -> Iterator[R]:
    """``fn`` over ``items`` on ``pool``, results in input order, at most ``ahead`` calls submitted ahead of
    the one being waited for (bounded memory, bounded load)."""
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def batched(items: Iterable[A], size: int) -> Iterator[list[A]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def stream_rows(engine: Engine, items: Sequence[Item], decode_threads: int = 2) -> Iterator[dict[str, Any]]:
    """The rows of ``items`` in order: decoding runs ahead on ``decode_threads`` threads while up to
    ``engine.concurrency`` batches are being inferred."""
    size, calls = engine.batch_size, engine.concurrency
    with (
        ThreadPoolExecutor(decode_threads, thread_name_prefix="decode") as decode,
        ThreadPoolExecutor(calls, thread_name_prefix="infer") as infer,
    ):
        prepared = ordered_map(engine.prepare, items, decode, ahead=size * (calls + 2))
        for rows in ordered_map(engine.infer, batched(prepared, size), infer, ahead=calls):
            yield from rows
