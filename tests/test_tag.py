"""``fashion tag`` without a model: inputs, columns from metadata, the title hook, waiting out a busy server,
the output folder's parts and resuming. The engines, against a real export and real servers, are in
``tests/test_tag_engines.py``."""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fashion.metadata import parse_metadata
from fashion.text import TitleTokenizer
from gateway.retry import Backoff
from tagging.bench import CostRow, tree_cpu_s
from tagging.columns import ModelRef, TagColumns, title_input
from tagging.engines import EngineSpec, politely
from tagging.errors import EngineDown, TagError
from tagging.inputs import ManifestColumns, read_inputs
from tagging.pipeline import ordered_map
from tagging.store import STATE, Store, part_name
from tests.fixtures_gateway import metadata_dict

MODEL = ModelRef("fashion", 3)


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --- inputs -----------------------------------------------------------------------------------------


def test_a_folder_gives_one_input_per_file_named_by_its_name_in_sorted_order_hidden_left_out(
    tmp_path,
):
    for name in ("b.jpg", "a.png", "notes.txt", "sub/c.jpeg", ".DS_Store", ".cache/d.jpg"):
        touch(tmp_path / name)
    inputs = read_inputs(tmp_path)
    assert [i.id for i in inputs.items] == ["a", "b", "notes", "sub/c"]
    assert [i.index for i in inputs.items] == [0, 1, 2, 3]
    assert inputs.items[0].path == str((tmp_path / "a.png").resolve()) and not inputs.has_titles


def test_a_csv_manifest_carries_ids_paths_relative_to_it_and_titles(tmp_path):
    touch(tmp_path / "img" / "1.jpg")
    with (tmp_path / "m.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sku", "file", "name"])
        w.writerows([["A1", "img/1.jpg", "Navy Shirt"], ["A2", "/abs/2.jpg", ""]])
    inputs = read_inputs(tmp_path / "m.csv", ManifestColumns("sku", "file", "name"))
    assert [(i.id, i.path, i.title) for i in inputs.items] == [
        ("A1", str(tmp_path.resolve() / "img" / "1.jpg"), "Navy Shirt"),
        ("A2", "/abs/2.jpg", None),
    ]
    assert inputs.has_titles


def test_a_parquet_manifest_without_a_title_column_has_no_titles(tmp_path):
    pq.write_table(pa.table({"id": [7, 8], "image": ["7.jpg", "8.jpg"]}), tmp_path / "m.parquet")
    inputs = read_inputs(tmp_path / "m.parquet")
    assert [i.id for i in inputs.items] == ["7", "8"] and not inputs.has_titles


def test_repeated_ids_and_missing_columns_are_refused_with_what_to_do(tmp_path):
    touch(tmp_path / "f" / "a.jpg")
    touch(tmp_path / "f" / "a.png")
    with pytest.raises(TagError, match=r"ids occur more than once.*'a'"):
        read_inputs(tmp_path / "f")
    (tmp_path / "m.csv").write_text("id,path\n1,a.jpg\n")
    with pytest.raises(TagError, match=r"no column 'image'.*--image-column"):
        read_inputs(tmp_path / "m.csv")


def test_the_fingerprint_changes_with_any_id_path_or_title(tmp_path):
    (tmp_path / "m.csv").write_text("id,image,title\n1,a.jpg,x\n")
    first = read_inputs(tmp_path / "m.csv").fingerprint()
    (tmp_path / "m.csv").write_text("id,image,title\n1,a.jpg,y\n")
    assert read_inputs(tmp_path / "m.csv").fingerprint() != first


# --- columns and the title hook -----------------------------------------------------------------------


def test_columns_come_from_the_metadata_outputs_with_a_probability_and_each_flag():
    meta = parse_metadata(metadata_dict())
    columns = TagColumns.of(meta)
    assert columns.attributes == ("colour", "brightness", "Tshirts/neck", "Sarees/border")
    assert columns.names()[:5] == ["id", "colour", "colour_probability", "colour_uncertain", "brightness"]
    assert columns.names()[-3:] == ["model", "model_version", "error"]
    schema = columns.arrow_schema()
    assert schema.names == columns.names()
    assert schema.field("colour_probability").type == pa.float64()
    assert schema.field("colour_uncertain").type == pa.bool_()
    assert schema.field("model_version").type == pa.int64()
    # The gateway's GET /v1/models describes the same model: the same columns.
    assert TagColumns.from_description(meta.describe()) == columns


def test_a_row_holds_label_probability_flags_and_an_error_row_nulls_every_attribute():
    columns = TagColumns(("colour",))
    row = columns.row("7", {"colour": {"label": "red", "confidence": 0.25, "uncertain": True}}, MODEL)
    assert row == {
        "id": "7",
        "colour": "red",
        "colour_probability": 0.25,
        "colour_uncertain": True,
        "model": "fashion",
        "model_version": 3,
        "error": None,
    }
    bad = columns.error_row("8", "undecodable_image: no", MODEL)
    assert (
        bad["colour"] is None and bad["colour_uncertain"] is None and bad["error"] == "undecodable_image: no"
    )
    assert list(bad) == columns.names()


def test_titles_are_sent_only_when_the_metadata_declares_a_title_input():
    plain = metadata_dict()
    assert title_input(plain) is None
    assert TagColumns.of(parse_metadata(plain), title_input(plain)).flags == ("uncertain",)

    tokenizer = TitleTokenizer(buckets=64, max_tokens=8)
    declared = {**plain, "title": {"input": "title", "tokenizer": tokenizer.to_dict()}}
    title = title_input(declared)
    assert title is not None and title.name == "title" and title.tokenizer == tokenizer
    ids = title.tensor(["Navy Blue Shirt", None, ""])
    assert ids.shape == (3, 8) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids[0], tokenizer.ids("Navy Blue Shirt"))
    assert not ids[1:].any()  # no title: an image-only row
    assert TagColumns.of(parse_metadata(declared), title).flags == ("uncertain", "conflict")


# --- waiting out a busy server ------------------------------------------------------------------------


class Busy(Exception):
    pass


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def refusing(times: int, retry_after: float = 1.0):
    calls = {"n": 0}

    def call() -> str:
        calls["n"] += 1
        if calls["n"] <= times:
            raise Busy(f"503 refusal {calls['n']}")
        return "answer"

    return call, calls, (lambda e: retry_after if isinstance(e, Busy) else None)


def test_a_refused_call_waits_retry_after_plus_a_jittered_doubling_window_then_succeeds():
    call, calls, wait_for = refusing(3)
    fake = FakeTime()
    backoff = Backoff(base_s=0.1, cap_s=5.0)
    random.seed(1)
    assert politely(
        call, wait_for, what="x", give_up_s=60, backoff=backoff, sleep=fake.sleep, clock=fake.clock
    ) == ("answer")
    assert calls["n"] == 4 and len(fake.sleeps) == 3
    for attempt, slept in enumerate(fake.sleeps, start=1):
        assert 1.0 <= slept <= 1.0 + 0.1 * 2 ** (attempt - 1)  # Retry-After, plus at most the window
    assert len(set(fake.sleeps)) == 3  # jittered: clients refused together do not come back together


def test_a_server_that_stays_down_stops_the_call_after_give_up_s_with_the_tries_it_made():
    call, calls, wait_for = refusing(10_000)
    fake = FakeTime()
    with pytest.raises(
        EngineDown, match=r"the gateway stayed unavailable for \d+ s \(\d+ tries; the last: 503"
    ):
        politely(call, wait_for, what="the gateway", give_up_s=10, sleep=fake.sleep, clock=fake.clock)
    assert fake.now == pytest.approx(10) and 5 <= calls["n"] <= 11  # about a try per Retry-After second


def test_an_error_that_is_not_a_refusal_is_raised_at_once():
    def call() -> None:
        raise ValueError("a bug")

    fake = FakeTime()
    with pytest.raises(ValueError, match="a bug"):
        politely(call, lambda e: None, what="x", give_up_s=60, sleep=fake.sleep, clock=fake.clock)
    assert fake.sleeps == []


# --- the pipeline and the output folder ----------------------------------------------------------------


def test_ordered_map_keeps_input_order_and_submits_at_most_ahead_calls():
    running, peak, lock = [0], [0], threading.Lock()

    def slow(x: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.002 * (x % 3))
        with lock:
            running[0] -= 1
        return x * 10

    with ThreadPoolExecutor(8) as pool:
        assert list(ordered_map(slow, range(40), pool, ahead=3)) == [x * 10 for x in range(40)]
    assert peak[0] <= 3


def columns_and_inputs(tmp_path: Path, n: int):
    folder = tmp_path / "in"
    for i in range(n):
        touch(folder / f"{i:03d}.jpg")
    return TagColumns(("colour",)), read_inputs(folder)


def test_parts_are_consecutive_slices_and_a_rerun_finds_only_the_missing_ones(tmp_path):
    columns, inputs = columns_and_inputs(tmp_path, 25)
    store = Store.open(tmp_path / "out", inputs, 10, MODEL, columns)
    assert [(p.start, p.stop) for p in store.parts] == [(0, 10), (10, 20), (20, 25)]
    first = store.parts[0]
    store.write(first, [columns.error_row(i.id, "e: x", MODEL) for i in inputs.items[:10]])
    (tmp_path / "out" / f".{part_name(1)}.partial").write_bytes(b"half a part")  # killed while writing
    again = Store.open(tmp_path / "out", inputs, 10, MODEL, columns)
    assert [p.index for p in again.pending()] == [1, 2]
    assert not list((tmp_path / "out").glob(".*.partial"))
    assert [i.id for i in again.items(again.pending(), inputs)] == [f"{i:03d}" for i in range(10, 25)]


def test_a_part_with_the_wrong_number_of_rows_is_tagged_again(tmp_path):
    columns, inputs = columns_and_inputs(tmp_path, 4)
    store = Store.open(tmp_path / "out", inputs, 2, MODEL, columns)
    table = pa.Table.from_pylist([columns.error_row("000", "e: x", MODEL)], schema=columns.arrow_schema())
    pq.write_table(table, tmp_path / "out" / part_name(0))
    assert [p.index for p in store.pending()] == [0, 1]


def test_an_output_folder_of_another_job_is_refused_and_left_alone(tmp_path):
    columns, inputs = columns_and_inputs(tmp_path, 4)
    Store.open(tmp_path / "out", inputs, 2, MODEL, columns)
    state = (tmp_path / "out" / STATE).read_text()
    with pytest.raises(TagError, match=r"another job.*part size"):
        Store.open(tmp_path / "out", inputs, 3, MODEL, columns)
    with pytest.raises(TagError, match=r"another job.*model"):
        Store.open(tmp_path / "out", inputs, 2, ModelRef("fashion", 4), columns)
    assert (tmp_path / "out" / STATE).read_text() == state
    touch(tmp_path / "other" / "file.txt")
    with pytest.raises(TagError, match="not the output of fashion tag"):
        Store.open(tmp_path / "other", inputs, 2, MODEL, columns)


def test_an_engine_spec_is_checked_when_made():
    with pytest.raises(TagError, match="needs a URL"):
        EngineSpec("gateway")
    with pytest.raises(TagError, match="unknown engine"):
        EngineSpec("pytorch")
    assert "s3cret" not in repr(EngineSpec("gateway", url="http://x", api_key="s3cret"))


def test_the_tagging_run_path_imports_no_torch():
    """``fashion tag`` runs where only the gateway's and the export's runtimes are installed."""
    code = (
        "import sys, tagging.run, tagging.engines, tagging.ray_data, tagging.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'training', 'orchestration'}))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]", out.stdout


def test_cost_per_million_is_cpu_seconds_per_image_times_a_million_in_hours():
    row = CostRow("local", images=2000, seconds=20.0, cpu_s=36.0)
    assert row.images_per_s == 100.0 and row.cpu_s_per_image == pytest.approx(0.018)
    assert row.cpu_hours_per_million == pytest.approx(5.0)
    assert row.to_dict(price=0.04)["usd_per_million"] == pytest.approx(0.2)
    assert tree_cpu_s([os.getpid()]) > 0  # this process, read from /proc like the servers are
