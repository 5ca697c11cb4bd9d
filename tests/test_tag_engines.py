"""``fashion tag`` with a real export: the local engine, a SIGKILL and a rerun, titles sent to a model that
reads them; the Triton and gateway engines against the real pip Triton and gunicorn (the same rows whichever
engine; a gateway that refuses with 429 or stays down); Ray Data on a real local Ray runtime (skipped where
Ray is not installed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fashion.cli import main
from fashion.metadata import load_export_record
from tagging.engines import EngineSpec, LocalEngine
from tagging.run import TagJob, tag
from tagging.store import read_rows
from tests.conftest import COLOURS, draw_product

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BAD = {"notes": "undecodable_image", "truncated": "undecodable_image", "empty": "undecodable_image"}


@pytest.fixture(scope="module")
def repo(checkpoint, tmp_path_factory) -> Path:
    """The tiny model exported into a repository of this module's own (other modules add versions to the
    session's shared export)."""
    from export.pipeline import ExportOptions, export_checkpoint

    root = tmp_path_factory.mktemp("tag-repo")
    options = ExportOptions(
        checkpoint=checkpoint, repository=root, eval_images=8, gate_images=8, max_batch_size=16, time_s=0.1
    )
    export_checkpoint(options, report=lambda text: None)
    return root


def draw_folder(folder: Path, count: int, start: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        colour = list(COLOURS.values())[i % 3]
        draw_product(folder / f"{i:04d}.jpg", colour, "square" if i % 2 else "round", size=(48, 64), seed=i)
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Ten drawn products, a PNG, and three files that are no image: text, a truncated JPEG, an empty one."""
    folder = draw_folder(tmp_path_factory.mktemp("photos") / "in", 10)
    from PIL import Image

    Image.open(folder / "0001.jpg").save(folder / "png.png")
    (folder / "notes.txt").write_text("not a photo\n")
    whole = (folder / "0002.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    return folder


def run(source: Path, out: Path, spec: EngineSpec, **job: Any) -> list[dict[str, Any]]:
    tag(TagJob(source, out, spec, progress=False, **job), say=lambda text: None)
    return read_rows(out)


def assert_same_rows(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """Equal ids, labels, flags, models and errors; probabilities within float noise (batches differ)."""
    assert [r["id"] for r in got] == [r["id"] for r in want]
    probability = [k for k in want[0] if k.endswith("_probability")]
    for g, w in zip(got, want, strict=True):
        assert {k: v for k, v in g.items() if k not in probability} == {
            k: v for k, v in w.items() if k not in probability
        }
    tagged = [i for i, w in enumerate(want) if w["error"] is None]
    np.testing.assert_allclose(
        [[got[i][k] for k in probability] for i in tagged],
        [[want[i][k] for k in probability] for i in tagged],
        rtol=0,
        atol=1e-5,
    )


@pytest.fixture(scope="module")
def local_rows(repo, photos, tmp_path_factory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("local") / "out"
    return run(photos, out, EngineSpec("local", repository=str(repo)), part_size=4)


# --- local -------------------------------------------------------------------------------------------


def test_local_engine_tags_with_the_exports_chosen_session_and_bad_files_become_error_rows(repo, local_rows):
    meta = json.loads((repo / "fashion" / "1" / "metadata.json").read_text())
    attributes = [o["attribute"] for o in meta["outputs"]]
    expected = ["id"]
    for a in attributes:
        expected += [a, f"{a}_probability", f"{a}_uncertain"]
    assert list(local_rows[0]) == [*expected, "model", "model_version", "error"]
    by_id = {r["id"]: r for r in local_rows}
    assert len(local_rows) == 14 and sorted(by_id) == [r["id"] for r in local_rows]
    for name, code in BAD.items():
        assert by_id[name]["error"].startswith(f"{code}: "), by_id[name]["error"]
        assert all(by_id[name][a] is None for a in attributes)
    for row in local_rows:
        if row["id"] not in BAD:
            assert row["error"] is None and (row["model"], row["model_version"]) == ("fashion", 1)
            for a, o in zip(attributes, meta["outputs"], strict=True):
                assert row[a] in o["classes"] and 0 < row[f"{a}_probability"] <= 1
    chosen = load_export_record(repo, "fashion").chosen
    engine = LocalEngine(EngineSpec("local", repository=str(repo)))
    assert engine.session_name == chosen.name and engine.batch_size == chosen.best_batch


def test_titles_are_sent_when_the_metadata_declares_a_title_input_and_conflicts_are_written(
    repo, photos, local_rows, title_export, tmp_path
):
    good = [r["id"] for r in local_rows if r["error"] is None]
    manifest = tmp_path / "manifest.csv"
    lines = [
        "id,image,title",
        *(f"{i},{photos}/{i}{'.png' if i == 'png' else '.jpg'},Red Shirt {i}" for i in good),
    ]
    manifest.write_text("\n".join(lines) + "\n")
    # A model that reads photos only: the titles are carried, not sent, and change nothing.
    with_titles = run(manifest, tmp_path / "titled", EngineSpec("local", repository=str(repo)))
    assert_same_rows(with_titles, [r for r in local_rows if r["error"] is None])
    assert not any(k.endswith("_conflict") for k in with_titles[0])

    # A model that reads titles (tests.fixtures_title: its photo and title colours are known) gets them.
    title_repo, _ = title_export
    red = tmp_path / "red.jpg"
    draw_product(red, COLOURS["Red"], "square", seed=3)
    titles = {"own": "Brand 1 Red Square Tee", "other": "Brand 1 Blue Square Tee", "none": ""}
    manifest = tmp_path / "title-manifest.csv"
    manifest.write_text("id,image,title\n" + "".join(f"{k},{red},{t}\n" for k, t in titles.items()))
    rows = {
        r["id"]: r
        for r in run(manifest, tmp_path / "title-out", EngineSpec("local", repository=str(title_repo)))
    }
    assert [rows[k]["baseColour"] for k in titles] == ["Red"] * 3  # the photo's colour
    assert [rows[k]["baseColour_conflict"] for k in titles] == [False, True, None]  # none: no title to judge
    probabilities = [k for k in rows["own"] if k.endswith("_probability")]
    assert any(rows["own"][k] != rows["none"][k] for k in probabilities)  # the title changed the answer
    assert rows["own"]["gender_conflict"] is not None and rows["none"]["gender_conflict"] is None


def test_a_run_killed_with_sigkill_resumes_and_ends_with_exactly_one_row_per_input(repo, tmp_path):
    folder = draw_folder(tmp_path / "in", 300)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "fashion.cli", "tag", str(folder), "--out", str(out), "--local",
        "--repository", str(repo), "--part-size", "10", "--batch-size", "4", "--no-progress",
    ]  # fmt: skip
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out.glob("part-*.parquet")):
        assert first.poll() is None, first.stderr.read().decode() if first.stderr else ""
        assert time.monotonic() < deadline, "no part written in 120 s"
        time.sleep(0.002)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    if first.stderr:
        first.stderr.close()
    written = len(list(out.glob("part-*.parquet")))
    assert first.returncode == -signal.SIGKILL and 0 < written < 30

    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"resuming {out}:" in second.stdout
    rows = read_rows(out)
    assert [r["id"] for r in rows] == [f"{i:04d}" for i in range(300)]
    assert not list(out.glob(".*partial"))
    fresh = run(folder, tmp_path / "fresh", EngineSpec("local", repository=str(repo)), part_size=10)
    assert_same_rows(rows, fresh)


# --- against the real servers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(stack_factory, repo, tmp_path_factory):
    return stack_factory(repo, tmp_path_factory.mktemp("tag-stack"))


def gateway_counts(url: str, status: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    wanted = f'endpoint="/v1/predict/batch",method="POST",status="{status}"'
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("fashion_gateway_request_duration_seconds_count") and wanted in line
    )


@pytest.mark.server
def test_every_engine_gives_the_same_rows_for_the_same_inputs(stack, repo, photos, local_rows, tmp_path):
    triton = run(
        photos, tmp_path / "triton", EngineSpec("triton", url=stack.triton().grpc_url, repository=str(repo))
    )
    assert_same_rows(triton, local_rows)
    with stack.gateway("same-rows", workers=2, timeout_s=30) as gateway:
        rows = run(photos, tmp_path / "gateway", EngineSpec("gateway", url=gateway.url), part_size=5)
    assert_same_rows(rows, local_rows)


@pytest.mark.server
def test_a_gateway_answering_429_is_waited_out_politely_and_no_input_is_lost(stack, repo, tmp_path):
    folder = draw_folder(tmp_path / "in", 40)
    with stack.gateway("tight", workers=1, threads=2, max_inflight=1, queue_wait_s=0, retry_after_s=1) as gw:
        spec = EngineSpec("gateway", url=gw.url, batch_size=2, concurrency=4, give_up_s=60)
        started = time.monotonic()
        rows = run(folder, tmp_path / "out", spec)
        seconds = time.monotonic() - started
        refused, answered = gateway_counts(gw.url, "429"), gateway_counts(gw.url, "200")
    assert [r["id"] for r in rows] == [f"{i:04d}" for i in range(40)]
    assert all(r["error"] is None for r in rows) and answered == 20
    # Four callers on one slot: refusals happen, and each caller waits Retry-After (1 s) after each one.
    assert 0 < refused <= 4 * (seconds + 1), (refused, seconds)


@pytest.mark.server
def test_a_server_that_stays_down_stops_the_run_with_a_clear_message_and_a_rerun_completes(
    stack, repo, tmp_path, capsys
):
    folder = draw_folder(tmp_path / "in", 12)
    out = tmp_path / "out"
    with stack.gateway("down", workers=1, timeout_s=5, retry_after_s=1) as gw:
        command = ["tag", str(folder), "--out", str(out), "--gateway", gw.url, "--part-size", "4"]
        stack.server.stop()  # Triton goes away: the gateway answers 503 triton_unreachable, Retry-After: 1
        try:
            started = time.monotonic()
            assert main([*command, "--give-up-after", "3", "--no-progress"]) == 2
            seconds = time.monotonic() - started
            refused = gateway_counts(gw.url, "503")
        finally:
            stack.triton()
        error = capsys.readouterr().err
        assert "stayed unavailable" in error and "triton_unreachable" in error, error
        assert "0 of 12 inputs are tagged" in error and "run the same command again" in error, error
        assert 2 <= refused <= 5 and seconds < 30, (refused, seconds)  # waited, did not hammer
        assert main([*command, "--no-progress"]) == 0
    assert [r["id"] for r in read_rows(out)] == [f"{i:04d}" for i in range(12)]


# --- Ray Data ----------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_ray_data_with_an_actor_pool_gives_the_rows_of_a_local_run(repo, photos, local_rows, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install '.[ray]'")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        spec = EngineSpec("local", repository=str(repo))
        rows = run(photos, tmp_path / "out", spec, part_size=4, ray="local", ray_actors=1)
    finally:
        ray.shutdown()
    assert_same_rows(rows, local_rows)


def test_the_bench_times_the_exports_own_session_in_turns_with_local_runs_and_states_the_target_against_it(
    repo, photos, tmp_path, monkeypatch
):
    """The ceiling is this run's own timing of the export's session (the export's figure is one moment's),
    taken in turns with the local runs; the local row is their (lower) median run."""
    import tagging.bench as bench
    from export.repository import read_session_spec

    calls: list[tuple[str, Any]] = []
    timer, tag_job = bench.time_runner, bench.tag

    def timed(session, images, batch, seconds):
        calls.append(("bare", session.spec))
        return timer(session, images, batch, seconds)

    def tagged(job, **kwargs):
        summary = tag_job(job, **kwargs)
        calls.append(("local", summary))
        return summary

    given: list[Any] = []
    median = bench.median_run

    def median_of(runs):
        given.extend(runs)
        return median(runs)

    monkeypatch.setattr(bench, "time_runner", timed)
    monkeypatch.setattr(bench, "tag", tagged)
    monkeypatch.setattr(bench, "median_run", median_of)
    opts = bench.CostOptions(
        tmp_path / "bench",
        images=12,
        photos=photos,
        repository=repo,
        systems=("local",),
        rounds=3,
        turn_s=0.1,
    )
    report = bench.run_bench(opts, say=lambda text: None)
    assert [kind for kind, _ in calls] == ["bare", "local"] * 3  # in turns
    chosen = load_export_record(repo, "fashion").chosen
    own = read_session_spec(repo / "fashion", chosen.config_name)
    assert all(spec == own for kind, spec in calls if kind == "bare")  # not the throughput session
    assert len(report.raw_turns) == 3 and report.ceiling_ips == sorted(report.raw_turns)[1]
    (row,) = report.rows
    assert len(given) == 3 and row.note.startswith("median of 3 runs")
    middle = sorted(given, key=lambda r: r.images_per_s)[1]
    assert (row.system, row.images, row.seconds, row.cpu_s) == ("local", 12, middle.seconds, middle.cpu_s)
    assert report.ratio(row) == pytest.approx(row.images_per_s / report.ceiling_ips)
    saved = json.loads((tmp_path / "bench" / "tag-bench.json").read_text())
    assert saved["raw_best"]["timed_here"] == [round(v, 1) for v in report.raw_turns]
    assert saved["raw_best"]["export_images_per_s"] == chosen.best_ips
    assert sorted(p.name for p in (tmp_path / "bench").glob("tags-local-*")) == [
        "tags-local-1",
        "tags-local-2",
        "tags-local-3",
    ]


def test_a_bench_without_a_local_row_states_the_triton_target_against_its_own_timing_not_the_exports(
    repo, photos, tmp_path, monkeypatch
):
    """A triton-only bench once compared its row with the export's recorded figure (one moment's timing:
    104 images/s for a session that runs 420, so "2.6 x, met"). It times the bare session itself, just
    before the triton row, against a real Triton."""
    import tagging.bench as bench

    calls: list[str] = []
    timer, tag_job = bench.time_runner, bench.tag

    def timed(session, images, batch, seconds):
        calls.append("bare")
        return timer(session, images, batch, seconds)

    def tagged(job, **kwargs):
        calls.append(job.engine.kind)
        return tag_job(job, **kwargs)

    monkeypatch.setattr(bench, "time_runner", timed)
    monkeypatch.setattr(bench, "tag", tagged)
    opts = bench.CostOptions(
        tmp_path / "bench", images=12, photos=photos, repository=repo, systems=("triton",), turn_s=0.1
    )
    report = bench.run_bench(opts, say=lambda text: None)
    assert calls == ["bare", "triton"]
    assert "before the triton row" in report.markdown() and "each local run" not in report.markdown()
    (row,) = report.rows
    assert row.system == "triton" and row.images == 12  # one of them a broken file: a row with its error
    assert len(report.raw_turns) == 1 and report.ceiling_ips == report.raw_turns[0] != report.raw_best_ips
    assert report.ratio(row) == pytest.approx(row.images_per_s / report.raw_turns[0])


def test_an_even_number_of_bare_timings_states_the_targets_against_the_faster_middle_one(tmp_path):
    """Local rounds and the triton turn make an even count: the lower middle one would flatter each ratio."""
    import tagging.bench as bench

    opts = bench.CostOptions(tmp_path / "bench", images=12, photos=tmp_path)
    report = bench.CostReport(
        opts, "fashion v1", "openvino-bf16", 104.5, {}, raw_turns=[420.0, 320.0, 380.0, 400.0]
    )
    assert report.ceiling_ips == 400.0
    row = bench.CostRow("local", 100, 1.0, 1.0, 0)
    assert report.ratio(row) == pytest.approx(100 / 400)


def test_the_local_engine_runs_one_stream_per_call_in_flight_and_one_call_keeps_the_exports_session(repo):
    from export.repository import read_session_spec
    from fashion.host import usable_cores

    chosen = load_export_record(repo, "fashion").chosen
    own = read_session_spec(repo / "fashion", chosen.config_name)
    engine = LocalEngine(EngineSpec("local", repository=str(repo)))
    assert engine.session.spec == own.for_throughput(usable_cores())
    assert engine.concurrency == engine.session.spec.num_streams
    single = LocalEngine(EngineSpec("local", repository=str(repo), concurrency=1))
    assert single.session.spec == own and single.concurrency == 1  # as each Ray actor runs it
