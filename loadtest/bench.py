"""``fashion bench``: how fast the stack is on this machine, against the ceiling and against the naive way.

One run, one model — by default the shipped model (``models/default/model.pt``, EfficientNet-Lite0,
224 px, 7 heads) exported as ``fashion serve`` exports it: every CPU runtime × precision gated on real
validation photos and timed, the fastest that passed served — and one pool of real catalogue JPEGs (the
checkpoint's validation photos when its dataset is on disk; synthetic renders otherwise, said in the
output). Systems:

- ``raw``: every CPU candidate (ONNX Runtime / OpenVINO × FP32 / BF16 / INT8) as the export ranked it
  (``fashion.metadata.ExportRecord``: gated, and timed at batch 1 and 8 with the candidates taking turns —
  not re-timed here one after another, which swaps rankings on a shared VM); ``raw_best`` is the export's
  choice, the fastest that passed the accuracy gate: the ceiling the served stack is measured against.
  The served candidate and ONNX Runtime FP32 (``raw_onnxruntime``) are also run alone here, one caller at
  each batch size, each session built from its Triton config's spec, for their latency and CPU per image;
- ``triton``: the pip Triton (python backend running the served candidate, dynamic batching), called over
  gRPC by clients that decode the JPEG with ``fashion.contract`` themselves (JPEG bytes in, probabilities
  out: the same work the gateway does, so ``gateway − triton`` is what the gateway adds);
- ``gateway``: HTTP client → gunicorn/Flask (``gateway``) → Triton over gRPC;
- ``naive``: ``loadtest/naive_server.py``, one Flask process running the same checkpoint in PyTorch
  eagerly per request.

Then the CPU budget of the gateway path: CPU milliseconds per image of every process (client, gateway
workers — decode + resize measured apart —, Triton's server, its model process — the model measured
apart —) at the gateway's best concurrency, and the batches Triton's dynamic batcher formed there.
Writes ``OUT/bench.json`` and ``OUT/bench.md``; ``--sweep`` adds ``OUT/sweep.json``, ``OUT/sweep.md`` and
``OUT/recommended/`` (see ``loadtest.sweep``). ``--backbone NAME`` benchmarks random weights of any timm
backbone instead (fast smoke tests).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import logging
import os
import platform
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from export.pipeline import ExportOptions, export_checkpoint
from export.repository import read_session_spec
from export.runtimes import cpu_info
from export.sessions import SessionSpec, open_session
from fashion.console import emit, table
from fashion.contract import preprocess
from fashion.host import usable_cores
from fashion.metadata import INPUT_NAME, CandidateRecord, ExportRecord, load_export_record, load_metadata
from loadtest.errors import LoadtestError
from loadtest.loadgen import Point, best, closed_loop, percentiles
from loadtest.measure import MODEL_NAME, BenchModel, gateway_env, http_client_factory, sweep_points
from loadtest.sweep import run_sweep
from orchestration.gateway import GatewayProcess
from orchestration.naive import NaiveServer
from orchestration.process import ROOT, children, peak_rss_mb
from orchestration.triton import TritonServer
from training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from training.config import TrainConfig
from training.context import validation_samples
from training.data import build_schema, read_catalogue
from training.model import build_model
from training.synth import generate
from training.train import preprocessing_for

log = logging.getLogger(__name__)

SYSTEMS = ("raw_onnxruntime", "triton", "gateway", "naive")
TARGETS = {
    "gateway_over_raw_min": 0.5,
    "gateway_over_naive_min": 5.0,
    "gateway_added_p50_ms_max": 3.0,
    "triton_model_rss_mb_max": 600.0,
}
DEFAULT_CHECKPOINT = ROOT / "models" / "default" / "model.pt"


@dataclass(frozen=True)
class BenchOptions:
    """What ``fashion bench`` measures; checked on construction."""

    out: Path
    checkpoint: Path = DEFAULT_CHECKPOINT
    backbone: str | None = None  # random weights of this timm backbone instead of the checkpoint
    image_size: int = 224  # with backbone only
    images: int = 64
    duration_s: float = 10.0
    warmup_s: float = 2.0
    concurrencies: tuple[int, ...] = (1, 2, 4, 8, 16)
    raw_batch_sizes: tuple[int, ...] = (1, 8, 32)
    gate_images: int = 500  # the export's accuracy gate (fewer with --quick)
    slo_p95_ms: float = 100.0
    gateway_workers: int = 2
    # Enough threads that the default in-flight limit (3/4 of them per worker) never refuses the bench's
    # highest concurrency: the bench measures capacity; `tests/test_faults.py` measures the 429s.
    gateway_threads: int = 24
    skip: tuple[str, ...] = ()
    sweep: bool = False
    quick: bool = False
    command: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "checkpoint", Path(self.checkpoint))
        if self.backbone is None and not self.checkpoint.is_file():
            raise LoadtestError(
                f"checkpoint {self.checkpoint} not found (or pass --backbone for random weights)"
            )
        unknown = set(self.skip) - set(SYSTEMS)
        if unknown:
            raise LoadtestError(f"--skip takes {', '.join(SYSTEMS)}; got {sorted(unknown)}")
        if self.duration_s <= 0 or self.images < 2 or not self.concurrencies or min(self.concurrencies) < 1:
            raise LoadtestError("--duration > 0, --images >= 2 and positive --concurrency values are needed")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchOptions:
        quick = bool(args.quick)
        concurrencies = (
            tuple(int(c) for c in args.concurrency.split(",") if c.strip())
            if args.concurrency
            else ((1, 4) if quick else (1, 2, 4, 8, 16))
        )
        duration = args.duration or (2.0 if quick else 10.0)
        return cls(
            out=args.out,
            checkpoint=Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT,
            backbone=args.backbone,
            image_size=args.image_size,
            images=args.images if not quick else min(args.images, 16),
            duration_s=duration,
            warmup_s=min(2.0, max(0.5, duration / 4)),
            concurrencies=concurrencies,
            raw_batch_sizes=(1, 8) if quick else (1, 8, 32),
            gate_images=48 if quick else 500,
            slo_p95_ms=args.slo_p95_ms,
            skip=tuple(s.strip() for s in args.skip.split(",") if s.strip()),
            sweep=bool(args.sweep),
            quick=quick,
            command="fashion " + " ".join(sys.argv[1:]) if sys.argv else "",
        )


def build_bench_model(work: Path, opts: BenchOptions) -> BenchModel:
    """Export the checkpoint (or random weights of ``opts.backbone``) as ``fashion serve`` does, and pick
    the JPEG pool."""

    if opts.backbone:
        checkpoint = _random_checkpoint(work, opts.backbone, opts.image_size, opts.images)
        precisions: tuple[str, ...] = ("fp32",)
    else:
        checkpoint, precisions = opts.checkpoint, ("auto",)
    ckpt = load_checkpoint(checkpoint)
    repository = work / "model_repository"
    result = export_checkpoint(
        ExportOptions(
            checkpoint=checkpoint,
            repository=repository,
            name=MODEL_NAME,
            # Every candidate that runs here is gated and timed by the export (a refused one too: it is
            # left out of the repository, its timing stays in the record's ranking).
            precisions=precisions,
            gate_images=opts.gate_images,
            calibration_images=min(300, 4 * opts.gate_images),
            time_s=0.5 if opts.quick else 2.0,
            cpu_threads=usable_cores(),
        ),
        report=log.info,
    )
    record = load_export_record(repository, MODEL_NAME, result.version)
    jpegs, image_source = _photo_pool(ckpt, opts.images, work)
    arrays = np.stack([preprocess(j, ckpt.preprocessing) for j in jpegs])
    description = (
        f"{ckpt.backbone} {ckpt.preprocessing.image_size} px, {len(ckpt.schema.attributes)} heads, "
        + ("random weights" if opts.backbone else f"checkpoint {checkpoint}")
    )
    return BenchModel(
        work / "model_repository",
        result.version_dir,
        checkpoint,
        jpegs,
        arrays,
        len(ckpt.schema.attributes),
        ckpt.preprocessing,
        ckpt.schema,
        description,
        image_source,
        read_session_spec(repository / MODEL_NAME, "cpu"),
        record,
    )


def _random_checkpoint(work: Path, backbone: str, image_size: int, count: int) -> Path:
    """Random weights of ``backbone`` with the heads of a synthetic catalogue (speed needs no training)."""
    import torch

    generate(work / "catalogue", max(count, 40), seed=0)
    catalogue = read_catalogue(work / "catalogue")
    schema = build_schema(catalogue, catalogue.samples)
    settings = TrainConfig(
        data=str(work / "catalogue"), out=str(work), backbone=backbone, image_size=image_size
    )
    torch.manual_seed(0)
    net = build_model(backbone, schema, preprocessing_for(settings)).eval()
    path = work / "random.pt"
    config = {"data": str(work / "catalogue"), "seed": 0, "backbone": backbone, "note": "random weights"}
    save_checkpoint(path, Checkpoint(model=net, backbone=backbone, config=config))
    return path


def _photo_pool(ckpt: Any, count: int, work: Path) -> tuple[list[bytes], str]:
    """``count`` JPEGs: the checkpoint's validation photos when its dataset is here, else synthetic ones."""

    data = ckpt.config.get("data")
    if data and Path(data).exists():
        val = validation_samples(ckpt)
        picked = [val[int(i)] for i in sorted(np.random.default_rng(0).permutation(len(val))[:count])]
        return [Path(s.image_path).read_bytes() for s in picked], f"{len(picked)} validation photos of {data}"

    generate(work / "photos", count, seed=1)
    paths = sorted((work / "photos").rglob("*.jpg"))[:count]
    return [p.read_bytes() for p in paths], (
        f"{len(paths)} SYNTHETIC renders (training.synth): the checkpoint's dataset {data} is not here"
    )


# ------------------------------------------------------------------------------------------- systems
def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` (and their threads) so far, from /proc."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def bench_raw(model: BenchModel, opts: BenchOptions) -> dict[str, dict[str, Any]]:
    """Every CPU candidate as the export ranked it (its gate, its images/s taking turns at its best batch),
    and for the served one and ONNX Runtime FP32 their latency and CPU per image, each run alone here.

    ``throughput_ips`` is the export's figure for every row alike, so the rows rank as the export ranked
    them; the points measured here (one caller per batch size) add latency and CPU, not a second ranking."""
    record = _record(model)
    out = {c.name: ranked_row(c) for c in record.cpu.candidates}
    reference = read_session_spec(model.repository / MODEL_NAME, "cpu_onnxruntime_fp32")
    for spec in dict.fromkeys([model.chosen, reference]):
        row = out[spec.name]
        out[spec.name] = {**row, **measure_alone(model, spec, opts, row["best_batch_size"])}
    return out


def _record(model: BenchModel) -> ExportRecord:
    if model.record is None:
        raise LoadtestError(f"{model.version_dir} has no export record: export the model with fashion export")
    return model.record


def ranked_row(c: CandidateRecord) -> dict[str, Any]:
    """A candidate as the export's record has it."""
    if c.unavailable is not None:
        return {"unavailable": c.unavailable}
    return {
        "runtime": c.runtime,
        "precision": c.precision,
        "passed_gate": c.passed,
        "throughput_ips": c.best_ips,
        "best_batch_size": c.best_batch,
        "throughput_ips_by_batch": {str(b): v for b, v in sorted(c.throughput_ips.items())},
        "source": "the export's timing, the candidates taking turns",
    }


def measure_alone(model: BenchModel, spec: SessionSpec, opts: BenchOptions, at_batch: int) -> dict[str, Any]:
    """``spec``'s session alone, one caller, at each raw batch size: the points (latency = one batch), the
    latency at ``at_batch`` and the CPU milliseconds per image at each size."""
    session = open_session(spec, model.version_dir / spec.file)
    points, cpu_ms = [], {}
    for batch_size in opts.raw_batch_sizes:
        batch = np.ascontiguousarray(np.resize(model.arrays, (batch_size, *model.arrays.shape[1:])))
        session(batch)  # warm-up
        latencies, images = [], 0
        cpu0, start = time.process_time(), time.perf_counter()
        while time.perf_counter() - start < opts.duration_s:
            t0 = time.perf_counter()
            session(batch)
            latencies.append(time.perf_counter() - t0)
            images += batch_size
        elapsed = time.perf_counter() - start
        cpu_ms[str(batch_size)] = round((time.process_time() - cpu0) * 1000 / images, 2)
        p50, p95, p99 = percentiles(latencies)
        points.append(Point(1, round(images / elapsed, 2), p50, p95, p99, len(latencies), 0, batch_size))
        log.info("raw %s batch %d: %.1f img/s, p50 %.1f ms", spec.name, batch_size, images / elapsed, p50)
    at = next((p for p in points if p.batch_size == at_batch), max(points, key=lambda p: p.throughput_ips))
    return {
        "p50_ms": at.p50_ms,
        "p95_ms": at.p95_ms,
        "p99_ms": at.p99_ms,
        "points": [p.to_dict() for p in points],
        "cpu_ms_per_image": cpu_ms,
        "session": spec.parameters(),
    }


def raw_best(raw: dict[str, dict[str, Any]], chosen: str) -> dict[str, Any] | None:
    """The served candidate: the export's choice, the fastest that passed the accuracy gate (what the
    stack could serve at best)."""
    r = raw.get(chosen)
    if not r or not r.get("passed_gate"):
        return None
    return {
        "runtime": r["runtime"],
        "precision": r["precision"],
        "throughput_ips": r["throughput_ips"],
        "batch_size": r["best_batch_size"],
        "p50_ms": r["p50_ms"],
        "p95_ms": r["p95_ms"],
    }


PREPROCESS_SIZES = {  # name -> (width, height) of a JPEG made from a catalogue render
    "thumbnail 224x300": (224, 300),
    "catalogue 512x700": (512, 700),
    "phone 1080x1440": (1080, 1440),
    "camera 3000x4000": (3000, 4000),
}


def bench_preprocess(model: BenchModel, opts: BenchOptions, model_ms: float | None) -> dict[str, Any]:
    """What the gateway's preprocessing (decode, EXIF, trim, resize) costs per image, by photo size,
    next to what the model costs per image (ONNX Runtime, batch 1, p50): the issue's "preprocessing must
    not cost more than the model", measured."""

    source = Image.open(io.BytesIO(model.jpegs[0])).convert("RGB")
    reps = 5 if opts.quick else 30
    rows = []
    for name, size in PREPROCESS_SIZES.items():
        buffer = io.BytesIO()
        source.resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
        data = buffer.getvalue()
        preprocess(data, model.preprocessing)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            preprocess(data, model.preprocessing)
            times.append(time.perf_counter() - t0)
        p50 = round(float(np.median(times)) * 1000, 2)
        rows.append(
            {
                "image": name,
                "bytes": len(data),
                "preprocess_p50_ms": p50,
                "model_ms": model_ms,
                "preprocess_over_model": round(p50 / model_ms, 2) if model_ms else None,
            }
        )
        log.info("preprocess %s (%d bytes): %.2f ms", name, len(data), p50)
    # The pool itself (the photos every system is sent): CPU ms per image, one thread.
    cpu0 = time.process_time()
    for data in model.jpegs:
        preprocess(data, model.preprocessing)
    pool_ms = round((time.process_time() - cpu0) * 1000 / len(model.jpegs), 2)
    return {"repetitions": reps, "images": rows, "pool_cpu_ms_per_image": pool_ms}


def triton_client_factory(url: str, model: BenchModel) -> Callable[[], Callable[[int], int]]:
    import tritonclient.grpc as grpcclient

    outputs = [a.tensor for a in model.schema.attributes]
    title = load_metadata(model.repository, MODEL_NAME).title  # a model that reads titles: send zero ids

    def factory() -> Callable[[int], int]:
        client = grpcclient.InferenceServerClient(url)
        requested = [grpcclient.InferRequestedOutput(o) for o in outputs]

        def send(i: int) -> int:
            array = preprocess(model.jpegs[i % len(model.jpegs)], model.preprocessing)[None]
            tensor = grpcclient.InferInput(INPUT_NAME, list(array.shape), "UINT8")
            tensor.set_data_from_numpy(array)
            inputs = [tensor]
            if title is not None:  # the photo alone: all-zero title ids (the title contract)
                ids = np.zeros((1, title.max_tokens), np.int64)
                inputs.append(grpcclient.InferInput(title.input, list(ids.shape), "INT64"))
                inputs[-1].set_data_from_numpy(ids)
            client.infer(MODEL_NAME, inputs, outputs=requested, client_timeout=30)
            return 1

        return send

    return factory


def triton_rss_mb(pid: int | None) -> dict[str, Any]:
    if pid is None:
        return {}
    server = peak_rss_mb(pid)
    stubs = [mb for mb in (peak_rss_mb(c) for c in children(pid)) if mb is not None]
    return {"server_mb": server, "model_stubs_mb": stubs, "total_mb": round((server or 0) + sum(stubs), 1)}


# ------------------------------------------------------------------------------------------- results
def summarise(points: list[Point], slo_p95_ms: float) -> dict[str, Any]:
    chosen, met = best(points, slo_p95_ms)
    return {
        "throughput_ips": chosen.throughput_ips,
        "p50_ms": chosen.p50_ms,
        "p95_ms": chosen.p95_ms,
        "p99_ms": chosen.p99_ms,
        "best_concurrency": chosen.concurrency,
        "best_batch_size": chosen.batch_size,
        "slo_p95_met": met,
        "points": [p.to_dict() for p in points],
    }


def measure_added_latency(
    triton_factory: Callable[[], Callable[[int], int]],
    gateway_factory: Callable[[], Callable[[int], int]],
    opts: BenchOptions,
) -> dict[str, Any]:
    """What the gateway adds at concurrency 1, Triton direct and the gateway measured in alternating short
    rounds: one pass of each, minutes apart, differed by a few ms from drift alone on a shared machine."""
    rounds = 2 if opts.quick else 5
    round_s = min(3.0, opts.duration_s)
    pairs = []
    for _ in range(rounds):
        triton_point = closed_loop(triton_factory, 1, round_s, min(0.5, opts.warmup_s))
        gateway_point = closed_loop(gateway_factory, 1, round_s, min(0.5, opts.warmup_s))
        pairs.append({"triton_p50_ms": triton_point.p50_ms, "gateway_p50_ms": gateway_point.p50_ms})
    diffs = sorted(p["gateway_p50_ms"] - p["triton_p50_ms"] for p in pairs)
    median = round(float(np.median(diffs)), 2)
    log.info("gateway adds %.2f ms at c=1 (median of %d alternating rounds: %s)", median, rounds, diffs)
    return {"rounds": pairs, "round_s": round_s, "median_ms": median}


def ratios(
    results: dict[str, Any], best_raw: dict[str, Any] | None, added_latency: dict[str, Any] | None = None
) -> dict[str, float | None]:
    def get(system: str, key: str) -> float | None:
        return results.get(system, {}).get(key)

    def at_c1(system: str) -> float | None:
        points = results.get(system, {}).get("points", [])
        return next((p["p50_ms"] for p in points if p["concurrency"] == 1), None)

    gw, raw, naive = (
        get("gateway", "throughput_ips"),
        best_raw["throughput_ips"] if best_raw else None,
        get("naive", "throughput_ips"),
    )
    ort = get("raw_onnxruntime", "throughput_ips")
    gw1, tr1 = at_c1("gateway"), at_c1("triton")
    added = None
    if added_latency is not None:
        added = added_latency["median_ms"]
    elif gw1 is not None and tr1 is not None:
        added = round(gw1 - tr1, 2)
    return {
        "gateway_over_raw_best": round(gw / raw, 3) if gw and raw else None,
        "gateway_over_raw_onnxruntime": round(gw / ort, 3) if gw and ort else None,
        "gateway_over_naive": round(gw / naive, 3) if gw and naive else None,
        "gateway_added_p50_ms": added,
    }


def same_concurrency_ratio(results: dict[str, Any]) -> dict[str, float]:
    gw = {p["concurrency"]: p for p in results.get("gateway", {}).get("points", [])}
    nv = {p["concurrency"]: p for p in results.get("naive", {}).get("points", [])}
    return {
        str(c): round(gw[c]["throughput_ips"] / nv[c]["throughput_ips"], 2)
        for c in sorted(set(gw) & set(nv))
        if nv[c]["throughput_ips"]
    }


class Sense(Enum):
    AT_LEAST = ">="
    AT_MOST = "<="


@dataclass(frozen=True)
class Target:
    """One bound the bench checks: its value, the bound, which way, and whether it also needs the SLO."""

    name: str  # as shown in bench.md and bench.json
    value: float | None
    bound: float
    sense: Sense
    needs_slo: bool = False  # met only where the gateway's best point met the p95 SLO

    def verdict(self, slo_met: bool) -> dict[str, Any]:
        if self.value is None:
            return {"value": None, "bound": self.bound, "met": None, "missed_by": None}
        within = self.value >= self.bound if self.sense is Sense.AT_LEAST else self.value <= self.bound
        met = within and (slo_met or not self.needs_slo)
        missed = None
        if not met:
            missed = (
                f"{self.bound / self.value:.2f}x short"
                if self.sense is Sense.AT_LEAST and self.value
                else f"{self.value - self.bound:+.2f} over"
            )
        return {"value": self.value, "bound": self.bound, "met": met, "missed_by": missed}


def targets(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target: its value, the bound, whether it is met and, when missed, by how much."""
    r, gw = doc["ratios"], doc.get("gateway", {})
    stubs = doc.get("memory", {}).get("triton", {}).get("model_stubs_mb") or []
    rows = [
        Target(
            "gateway / naive >= 5", r["gateway_over_naive"], TARGETS["gateway_over_naive_min"], Sense.AT_LEAST
        ),
        Target(
            "gateway / raw_best >= 0.5 at p95 < SLO",
            r["gateway_over_raw_best"],
            TARGETS["gateway_over_raw_min"],
            Sense.AT_LEAST,
            needs_slo=True,
        ),
        Target(
            "gateway adds <= 3 ms p50 at c=1",
            r["gateway_added_p50_ms"],
            TARGETS["gateway_added_p50_ms_max"],
            Sense.AT_MOST,
        ),
        Target(
            "Triton model process <= 600 MiB RSS",
            max(stubs) if stubs else None,
            TARGETS["triton_model_rss_mb_max"],
            Sense.AT_MOST,
        ),
    ]
    return {t.name: t.verdict(bool(gw.get("slo_p95_met"))) for t in rows}


def cpu_budget(
    model: BenchModel,
    factory: Callable[[], Callable[[int], int]],
    concurrency: int,
    opts: BenchOptions,
    pids: dict[str, list[int]],
    metrics_url: str,
    raw: dict[str, dict[str, Any]],
    decode_ms: float,
) -> dict[str, Any]:
    """CPU ms per image of each process on the gateway path at ``concurrency``, and Triton's batches.

    ``pids``: ``gateway`` (master + workers), ``triton_server``, ``triton_model`` (the python backend's
    stub processes). The client is this process. Decode + resize (``decode_ms``, measured alone) is split
    out of the gateway's share, and the model (the served candidate alone at the mean batch size
    Triton formed) out of the model process's share; the rest is what HTTP/Flask, gRPC and Triton cost."""
    before = {k: _cpu_seconds(v) for k, v in pids.items()}
    client0 = time.process_time()
    counts0 = triton_counts(metrics_url)
    point = closed_loop(factory, concurrency, opts.duration_s, opts.warmup_s)
    counts1 = triton_counts(metrics_url)
    client = time.process_time() - client0
    after = {k: _cpu_seconds(v) for k, v in pids.items()}
    images = counts1[0] - counts0[0]
    executions = counts1[1] - counts0[1]
    if images <= 0:
        return {"error": "Triton served no image during the budget run"}
    per = {k: (after[k] - before[k]) * 1000 / images for k in pids}
    mean_batch = images / executions if executions else None
    served = raw.get(model.chosen.name, {})
    model_ms, at = _model_cpu_at(served.get("cpu_ms_per_image", {}), mean_batch or 1.0)
    rows = [
        ("client (load generator: HTTP, this process)", client * 1000 / images),
        ("gateway: decode + resize (measured alone)", decode_ms),
        ("gateway: HTTP, Flask, JSON, gRPC client (rest of the workers)", per["gateway"] - decode_ms),
        ("Triton server: gRPC, batcher, IPC", per["triton_server"]),
        (f"model: {model.chosen.name} alone at batch {at}", model_ms or 0.0),
        (
            "Triton python backend: IPC, concat, outputs (rest of the model process)",
            per["triton_model"] - (model_ms or 0.0),
        ),
    ]
    total = sum(ms for _, ms in rows)
    cores = usable_cores()
    return {
        "concurrency": concurrency,
        "throughput_ips": point.throughput_ips,
        "images": images,
        "triton_executions": executions,
        "mean_batch_size": round(mean_batch, 2) if mean_batch else None,
        "rows": [{"part": name, "cpu_ms_per_image": round(ms, 2)} for name, ms in rows],
        "total_cpu_ms_per_image": round(total, 2),
        "cores": cores,
        "ceiling_ips_from_budget": round(cores * 1000 / total, 1) if total > 0 else None,
        "model_only_ceiling_ips": round(cores * 1000 / model_ms, 1) if model_ms else None,
    }


def budget_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Why a "rest of" row is negative: it is a process's CPU minus a part timed alone, minutes apart."""
    negative = [r["part"] for r in rows if "(rest of" in r["part"] and r["cpu_ms_per_image"] < 0]
    if not negative:
        return []
    return [
        "",
        f"Negative: {'; '.join(negative)}. Such a row is the process's CPU minus the part measured alone "
        "(minutes earlier, outside the server); here that part cost more alone than the whole process did "
        "under load, so the two measurements disagree by at least that much (e.g. the VM's speed drifted, "
        "or the model's CPU interpolated at the mean batch is not that of the mixed batches Triton formed).",
    ]


def _model_cpu_at(by_batch: dict[str, float], batch: float) -> tuple[float | None, str]:
    """The model's CPU ms per image at a mean batch size, interpolated between the measured sizes."""
    points = sorted((int(b), ms) for b, ms in by_batch.items())
    if not points:
        return None, "?"
    below = [p for p in points if p[0] <= batch] or points[:1]
    above = [p for p in points if p[0] >= batch] or points[-1:]
    (b0, m0), (b1, m1) = below[-1], above[0]
    ms = m0 if b1 == b0 else m0 + (m1 - m0) * (batch - b0) / (b1 - b0)
    return ms, f"{batch:.2f} (interpolated)" if b1 != b0 else str(b0)


def triton_counts(metrics_url: str) -> tuple[float, float]:
    """(images inferred, model executions) of the bench model so far, from Triton's Prometheus metrics."""

    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()

    def total(name: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") and f'model="{MODEL_NAME}"' in line
        )

    return total("nv_inference_count"), total("nv_inference_exec_count")


def markdown(doc: dict[str, Any]) -> str:
    """bench.md: the setup, the candidates as the export ranked them, the systems, the targets, the CPU
    budget and preprocessing against the model."""
    setup = doc["setup"]
    best = doc.get("raw_best") or {}
    lines = [
        f"# fashion bench — {setup['model']}",
        "",
        f"{setup['date']}, {setup['host']}, `{setup['command']}`; photos: {setup['image_source']}; "
        f"{setup['duration_s']} s per point, concurrencies {setup['concurrencies']}, "
        f"best = highest throughput with p95 ≤ {setup['slo_p95_ms']} ms. Served: {setup['served']}.",
        "",
        "The CPU candidates as the export ranked them (images/s: its timing, taking turns; p50 and CPU: the "
        "served one and ONNX Runtime FP32 run alone here, one caller, all cores):",
        "",
        _raw_table(doc.get("raw", {})),
        "",
        f"raw_best (fastest that passed the gate): {best.get('runtime')} {best.get('precision')} "
        f"{best.get('throughput_ips')} img/s at batch {best.get('batch_size')}",
        "",
        _systems_table(doc),
        "",
        table(
            ["target", "value", "bound", "met", "missed by"],
            [
                [name, t["value"], t["bound"], t["met"], t["missed_by"] or ""]
                for name, t in doc["targets"].items()
            ],
        ),
        "",
        f"gateway / raw ONNX Runtime FP32: {doc['ratios']['gateway_over_raw_onnxruntime']}; "
        f"gateway / naive at the same concurrency: {doc['gateway_over_naive_by_concurrency']}",
    ]
    return "\n".join([*lines, *_budget_lines(doc.get("cpu_budget") or {}), *_preprocess_lines(doc)]) + "\n"


def _raw_table(raw: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, r in raw.items():
        if "unavailable" in r:
            rows.append([name, "-", "", "", "", r["unavailable"][:90]])
            continue
        rows.append(
            [
                name,
                f"{r['throughput_ips']:.1f}",
                f"batch {r['best_batch_size']}",
                r.get("p50_ms", ""),
                r.get("cpu_ms_per_image", ""),
                "passed" if r["passed_gate"] else "REFUSED",
            ]
        )
    headers = ["runtime-precision", "images/s", "at", "p50 ms", "CPU ms / image by batch", "accuracy gate"]
    return table(headers, rows)


def _systems_table(doc: dict[str, Any]) -> str:
    rows = []
    for system in ("triton", "gateway", "naive"):
        s = doc.get(system)
        if not s:
            rows.append([system, "skipped", "", "", "", "", ""])
            continue
        rows.append(
            [
                system,
                f"{s['throughput_ips']:.1f}",
                s["p50_ms"],
                s["p95_ms"],
                s["p99_ms"],
                f"c={s['best_concurrency']}",
                _memory_cell(doc["memory"], system),
            ]
        )
    return table(["system", "images/s", "p50 ms", "p95 ms", "p99 ms", "at", "peak RSS MiB"], rows)


def _budget_lines(budget: dict[str, Any]) -> list[str]:
    if not budget.get("rows"):
        return []
    return [
        "",
        f"CPU budget of the gateway path at c={budget['concurrency']} ({budget['throughput_ips']} img/s; "
        f"Triton formed batches of {budget['mean_batch_size']} on average):",
        "",
        table(["part", "CPU ms / image"], [[r["part"], r["cpu_ms_per_image"]] for r in budget["rows"]]),
        "",
        f"Total {budget['total_cpu_ms_per_image']} CPU ms per image on {budget['cores']} cores: "
        f"a ceiling of {budget['ceiling_ips_from_budget']} img/s for the whole path, against "
        f"{budget['model_only_ceiling_ips']} img/s for the model alone.",
        *budget_notes(budget["rows"]),
    ]


def _preprocess_lines(doc: dict[str, Any]) -> list[str]:
    return [
        "",
        f"Preprocessing (decode with JPEG draft, EXIF, trim {doc['setup']['trim']}, resize; one core) "
        "vs the model (ONNX Runtime FP32, batch 1, p50) per image:",
        "",
        table(
            ["photo (JPEG q90)", "bytes", "preprocess ms", "model ms", "preprocess / model"],
            [
                [r["image"], r["bytes"], r["preprocess_p50_ms"], r["model_ms"], r["preprocess_over_model"]]
                for r in doc["preprocess"]["images"]
            ],
        ),
    ]


def _memory_cell(memory: dict[str, Any], system: str) -> str:
    if system == "triton" and memory.get("triton"):
        t = memory["triton"]
        return f"{t['total_mb']} (server {t['server_mb']} + stubs {t['model_stubs_mb']})"
    if system == "gateway" and memory.get("gateway_workers_mb"):
        return f"workers {memory['gateway_workers_mb']}, master {memory.get('gateway_master_mb')}"
    if system == "naive" and memory.get("naive_mb"):
        return str(memory["naive_mb"])
    if system == "raw_onnxruntime" and memory.get("bench_process_mb"):
        return f"{memory['bench_process_mb']} (bench process)"
    return ""


# ------------------------------------------------------------------------------------------- driver
@dataclass
class Measured:
    """What the systems measured, filled in as they run."""

    results: dict[str, Any] = field(default_factory=dict)  # system -> summary
    memory: dict[str, Any] = field(default_factory=dict)
    added_latency: dict[str, Any] | None = None
    budget: dict[str, Any] | None = None


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Measure every system not skipped, write bench.json and bench.md (and the sweep), print the table."""

    opts.out.mkdir(parents=True, exist_ok=True)
    work = opts.out / "work"
    work.mkdir(exist_ok=True)
    clock = time.perf_counter()
    model = build_bench_model(work / f"model-{int(time.time())}", opts)
    log.info(
        "model %s, %d JPEGs (%s), serving %s; ready in %.0f s",
        model.description,
        len(model.jpegs),
        model.image_source,
        model.chosen.name,
        time.perf_counter() - clock,
    )
    measured = Measured()
    raw: dict[str, dict[str, Any]] = {}
    model_ms = None
    if "raw_onnxruntime" not in opts.skip:
        raw = bench_raw(model, opts)
        measured.results["raw_onnxruntime"] = raw.get("onnxruntime-fp32")
        model_ms = next(
            (p["p50_ms"] for p in raw["onnxruntime-fp32"]["points"] if p["batch_size"] == 1), None
        )
    preprocessing = bench_preprocess(model, opts, model_ms)
    if "triton" not in opts.skip or "gateway" not in opts.skip:
        measure_served(model, opts, work, raw, preprocessing["pool_cpu_ms_per_image"], measured)
    if "naive" not in opts.skip:
        with NaiveServer(model.checkpoint, work / "naive.log", error=LoadtestError) as naive:
            factory = http_client_factory(naive.url, "/predict", model.jpegs)
            measured.results["naive"] = summarise(sweep_points(factory, opts, "naive"), opts.slo_p95_ms)
            measured.memory["naive_mb"] = peak_rss_mb(naive.process.pid) if naive.process else None
    measured.memory["bench_process_mb"] = peak_rss_mb(os.getpid())
    doc = assemble(opts, model, raw, preprocessing, measured)
    if opts.sweep:
        doc["sweep"] = run_sweep(model, opts, work)
    (opts.out / "bench.json").write_text(json.dumps(_finite(doc), indent=2) + "\n")
    text = markdown(doc)
    if opts.sweep:
        text += "\n" + (opts.out / "sweep.md").read_text()
    (opts.out / "bench.md").write_text(text)
    emit(text)
    return doc


def measure_served(
    model: BenchModel,
    opts: BenchOptions,
    work: Path,
    raw: dict[str, dict[str, Any]],
    decode_ms: float,
    measured: Measured,
) -> None:
    """Triton alone, the gateway in front of it, what the gateway adds, the CPU budget and the memory."""
    results, memory = measured.results, measured.memory
    with TritonServer(model.repository, [MODEL_NAME], log_file=work / "tritonserver.log") as triton:
        if "triton" not in opts.skip:
            points = sweep_points(triton_client_factory(triton.grpc_url, model), opts, "triton")
            results["triton"] = summarise(points, opts.slo_p95_ms)
        if "gateway" not in opts.skip:
            env = gateway_env(
                triton.grpc_url, model.repository, opts.gateway_workers, opts.gateway_threads, work
            )
            with GatewayProcess(env, work / "gunicorn.log", error=LoadtestError) as gateway:
                factory = http_client_factory(gateway.url, "/v1/predict", model.jpegs)
                results["gateway"] = summarise(sweep_points(factory, opts, "gateway"), opts.slo_p95_ms)
                if "triton" not in opts.skip:
                    triton_factory = triton_client_factory(triton.grpc_url, model)
                    measured.added_latency = measure_added_latency(triton_factory, factory, opts)
                if triton.pid is not None and gateway.process is not None:
                    pids = {
                        "gateway": [gateway.process.pid, *gateway.worker_pids()],
                        "triton_server": [triton.pid],
                        "triton_model": children(triton.pid),
                    }
                    concurrency = results["gateway"]["best_concurrency"]
                    measured.budget = cpu_budget(
                        model, factory, concurrency, opts, pids, triton.metrics_url, raw, decode_ms
                    )
                memory["gateway_workers_mb"] = [peak_rss_mb(p) for p in gateway.worker_pids()]
                memory["gateway_master_mb"] = peak_rss_mb(gateway.process.pid) if gateway.process else None
        memory["triton"] = triton_rss_mb(triton.pid)


def assemble(
    opts: BenchOptions,
    model: BenchModel,
    raw: dict[str, dict[str, Any]],
    preprocessing: dict[str, Any],
    measured: Measured,
) -> dict[str, Any]:
    """bench.json's document."""
    best_raw = raw_best(raw, model.chosen.name)
    doc: dict[str, Any] = {
        **measured.results,
        "raw": raw,
        "raw_best": best_raw,
        "ratios": ratios(measured.results, best_raw, measured.added_latency),
        "memory": measured.memory,
        "added_latency": measured.added_latency,
        "cpu_budget": measured.budget,
        "preprocess": preprocessing,
        "gateway_over_naive_by_concurrency": same_concurrency_ratio(measured.results),
    }
    doc["targets"] = targets(doc)
    doc["setup"] = setup(opts, model)
    return doc


def setup(opts: BenchOptions, model: BenchModel) -> dict[str, Any]:
    import onnxruntime

    record = _record(model)
    return {
        "model": model.description,
        "checkpoint": str(model.checkpoint),
        "heads": model.heads,
        "images": len(model.jpegs),
        "image_source": model.image_source,
        "served": f"{record.chosen.runtime} {record.chosen.precision} ({record.cpu.why})",
        "trim": model.preprocessing.trim,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": f"{platform.node()}: {os.cpu_count()} CPUs ({usable_cores()} usable), {platform.machine()}, "
        f"{platform.platform()}",
        "cpu": cpu_info().to_dict(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "command": opts.command,
        "duration_s": opts.duration_s,
        "warmup_s": opts.warmup_s,
        "concurrencies": list(opts.concurrencies),
        "slo_p95_ms": opts.slo_p95_ms,
        "gateway": {"workers": opts.gateway_workers, "threads": opts.gateway_threads},
        "notes": [
            "triton and gateway latencies both start from JPEG bytes (the triton client decodes with "
            "fashion.contract), so their difference is what the gateway adds",
            "raw throughput_ips is the export's, timed with the candidates taking turns (its ranking); raw "
            "latency and CPU are measured here alone, per batch of best_batch_size preprocessed images",
            "client, servers and model share this machine's CPUs",
        ],
    }


def _finite(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
