"""``fashion bench``: how fast the stack is on this machine, against the ceiling and against the naive way.

One run, one model (EfficientNet-B0 at 224×224 with the synthetic catalogue's 7 heads, random weights:
speed needs no training), one pool of real JPEGs (``training.synth`` renders), four systems:

- ``raw_onnxruntime``: ONNX Runtime alone on already preprocessed batches — the ceiling;
- ``triton``: the pip Triton (python backend + ONNX Runtime, dynamic batching), called over gRPC by
  clients that decode the JPEG with ``fashion.contract`` themselves (JPEG bytes in, probabilities out:
  the same work the gateway does, so ``gateway − triton`` is what the gateway adds);
- ``gateway``: HTTP client → gunicorn/Flask (``gateway``) → Triton over gRPC;
- ``naive``: ``loadtest/naive_server.py``, one Flask process running PyTorch eagerly per request.

Writes ``OUT/bench.json`` and ``OUT/bench.md``; ``--sweep`` adds ``OUT/sweep.json``, ``OUT/sweep.md`` and
``OUT/recommended/`` (see ``loadtest.sweep``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.errors import LoadtestError
from loadtest.loadgen import Point, best, closed_loop, percentiles
from loadtest.stack import ROOT, Gunicorn, children, peak_rss_mb, wait_for_http

log = logging.getLogger(__name__)

MODEL_NAME = "fashion"
SYSTEMS = ("raw_onnxruntime", "triton", "gateway", "naive")
TARGETS = {"gateway_over_raw_min": 0.5, "gateway_over_naive_min": 5.0, "gateway_added_p50_ms_max": 3.0}


@dataclass(frozen=True)
class BenchOptions:
    """What ``fashion bench`` measures; checked on construction."""

    out: Path
    backbone: str = "efficientnet_b0"
    image_size: int = 224
    images: int = 64
    duration_s: float = 10.0
    warmup_s: float = 2.0
    concurrencies: tuple[int, ...] = (1, 2, 4, 8, 16)
    raw_batch_sizes: tuple[int, ...] = (1, 8, 32)
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
            backbone=args.backbone,
            image_size=args.image_size,
            images=args.images if not quick else min(args.images, 16),
            duration_s=duration,
            warmup_s=min(2.0, max(0.5, duration / 4)),
            concurrencies=concurrencies,
            raw_batch_sizes=(1, 8) if quick else (1, 8, 32),
            slo_p95_ms=args.slo_p95_ms,
            skip=tuple(s.strip() for s in args.skip.split(",") if s.strip()),
            sweep=bool(args.sweep),
            quick=quick,
            command="fashion " + " ".join(sys.argv[1:]) if sys.argv else "",
        )


@dataclass
class BenchModel:
    """The exported model, its PyTorch twin for the naive server, and the image pool."""

    repository: Path
    onnx: Path
    naive_dir: Path
    jpegs: list[bytes]
    arrays: np.ndarray  # contract-preprocessed uint8 NHWC
    heads: int
    preprocessing: Any
    schema: Any


def build_bench_model(work: Path, backbone: str, image_size: int, count: int) -> BenchModel:
    """Render ``count`` catalogue JPEGs, build the product's heads from them, export the ONNX and publish."""
    import torch

    from export.metadata import build_metadata
    from export.onnx_export import export_onnx
    from export.repository import ServingConfig, write_model_version
    from fashion.contract import preprocess
    from training.config import TrainConfig
    from training.data import build_schema, read_catalogue
    from training.model import build_model
    from training.synth import generate
    from training.train import preprocessing_for

    generate(work / "catalogue", count, seed=0)
    catalogue = read_catalogue(work / "catalogue")
    schema = build_schema(catalogue, catalogue.samples)
    # The contract a trained model ships with: the trainer's defaults, background trimming included.
    settings = TrainConfig(data=str(work), out=str(work), backbone=backbone, image_size=image_size)
    pre = preprocessing_for(settings)
    torch.manual_seed(0)
    net = build_model(backbone, schema, pre).eval()
    onnx_path = export_onnx(net, work / "model.onnx")
    naive_dir = work / "naive"
    naive_dir.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), naive_dir / "weights.pt")
    (naive_dir / "model.json").write_text(
        json.dumps({"backbone": backbone, "schema": schema.to_dict(), "preprocessing": pre.to_dict()})
    )
    jpegs = [Path(s.image_path).read_bytes() for s in catalogue.samples]
    arrays = np.stack([preprocess(j, pre) for j in jpegs])
    metadata = build_metadata(
        schema=schema,
        preprocessing=pre,
        backbone=backbone,
        temperatures={},
        thresholds={},
        training={"note": "random weights (fashion bench)"},
        export={},
    )
    repository = work / "model_repository"
    write_model_version(
        repository,
        MODEL_NAME,
        schema=schema,
        image_size=image_size,
        model_files={"fp32": onnx_path},
        metadata=metadata,
        warmup_image=arrays[0],
        serving=ServingConfig(cpu_threads=os.cpu_count() or 2),
    )
    return BenchModel(repository, onnx_path, naive_dir, jpegs, arrays, len(schema.attributes), pre, schema)


# ------------------------------------------------------------------------------------------- systems
def bench_raw(model: BenchModel, opts: BenchOptions) -> list[Point]:
    """ONNX Runtime alone, one caller, on preprocessed batches of each size (latency = one batch)."""
    from export.onnx_export import INPUT_NAME, session

    sess = session(model.onnx, threads=os.cpu_count() or 2)
    points = []
    for batch_size in opts.raw_batch_sizes:
        batches = [np.resize(model.arrays, (batch_size, *model.arrays.shape[1:]))]
        sess.run(None, {INPUT_NAME: batches[0]})  # warm-up
        latencies, images = [], 0
        start = time.perf_counter()
        while time.perf_counter() - start < opts.duration_s:
            t0 = time.perf_counter()
            sess.run(None, {INPUT_NAME: batches[0]})
            latencies.append(time.perf_counter() - t0)
            images += batch_size
        elapsed = time.perf_counter() - start
        p50, p95, p99 = percentiles(latencies)
        points.append(Point(1, round(images / elapsed, 2), p50, p95, p99, len(latencies), 0, batch_size))
        log.info("raw_onnxruntime batch %d: %.1f img/s, p50 %.1f ms", batch_size, images / elapsed, p50)
    return points


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
    import io

    from PIL import Image

    from fashion.contract import preprocess

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
    return {"repetitions": reps, "images": rows}


def triton_client_factory(url: str, model: BenchModel) -> Callable[[], Callable[[int], int]]:
    import tritonclient.grpc as grpcclient

    from fashion.contract import preprocess

    outputs = [a.tensor for a in model.schema.attributes]

    def factory() -> Callable[[int], int]:
        client = grpcclient.InferenceServerClient(url)
        requested = [grpcclient.InferRequestedOutput(o) for o in outputs]

        def send(i: int) -> int:
            array = preprocess(model.jpegs[i % len(model.jpegs)], model.preprocessing)[None]
            tensor = grpcclient.InferInput("image", list(array.shape), "UINT8")
            tensor.set_data_from_numpy(array)
            client.infer(MODEL_NAME, [tensor], outputs=requested, client_timeout=30)
            return 1

        return send

    return factory


def http_client_factory(url: str, path: str, jpegs: list[bytes]) -> Callable[[], Callable[[int], int]]:
    """Raw ``image/jpeg`` POSTs on a keep-alive connection per thread."""
    host, port = url.removeprefix("http://").split(":")

    def factory() -> Callable[[int], int]:
        conn = {"c": http.client.HTTPConnection(host, int(port), timeout=30)}

        def send(i: int) -> int:
            body = jpegs[i % len(jpegs)]
            try:
                conn["c"].request("POST", path, body, {"Content-Type": "image/jpeg"})
                response = conn["c"].getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                conn["c"].close()
                conn["c"] = http.client.HTTPConnection(host, int(port), timeout=30)
                raise
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")
            return 1

        return send

    return factory


def sweep_points(
    factory: Callable[[], Callable[[int], int]],
    opts: BenchOptions,
    name: str,
    concurrencies: tuple[int, ...] | None = None,
) -> list[Point]:
    points = []
    for c in concurrencies or opts.concurrencies:
        point = closed_loop(factory, c, opts.duration_s, opts.warmup_s)
        log.info(
            "%s c=%d: %.1f img/s, p50 %.1f p95 %.1f p99 %.1f ms, %d errors",
            name,
            c,
            point.throughput_ips,
            point.p50_ms,
            point.p95_ms,
            point.p99_ms,
            point.errors,
        )
        points.append(point)
    return points


def gateway_env(triton_grpc: str, repository: Path, workers: int, threads: int, work: Path) -> dict[str, str]:
    prom = work / f"prometheus-{time.monotonic_ns()}"
    prom.mkdir(parents=True)
    return {
        "FASHION_TRITON_URL": triton_grpc,
        "FASHION_TRITON_PROTOCOL": "grpc",
        "FASHION_MODEL_REPOSITORY": str(repository),
        "FASHION_MODEL_NAME": MODEL_NAME,
        "FASHION_WORKERS": str(workers),
        "FASHION_THREADS": str(threads),
        "PROMETHEUS_MULTIPROC_DIR": str(prom),
    }


def triton_rss_mb(pid: int | None) -> dict[str, Any]:
    if pid is None:
        return {}
    server = peak_rss_mb(pid)
    stubs = [mb for mb in (peak_rss_mb(c) for c in children(pid)) if mb is not None]
    return {"server_mb": server, "model_stubs_mb": stubs, "total_mb": round((server or 0) + sum(stubs), 1)}


class NaiveServer:
    """``python -m loadtest.naive_server`` on a free port; always stopped."""

    def __init__(self, model_dir: Path, log_path: Path) -> None:
        from export.tritonserver import free_ports

        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_dir, self.log_path = model_dir, log_path
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> NaiveServer:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        command = [sys.executable, "-m", "loadtest.naive_server", "--model-dir", str(self.model_dir)]
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [*command, "--port", str(self.port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )
        try:
            wait_for_http(self.url + "/healthz", 120.0, self.process.poll, self.log_path, "the naive server")
        except LoadtestError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        from export.tritonserver import stop_process_group

        process, self.process = self.process, None
        if process is not None:
            stop_process_group(process, 20.0, "the naive server")


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


def ratios(results: dict[str, Any], added_latency: dict[str, Any] | None = None) -> dict[str, float | None]:
    def get(system: str, key: str) -> float | None:
        return results.get(system, {}).get(key)

    def at_c1(system: str) -> float | None:
        points = results.get(system, {}).get("points", [])
        return next((p["p50_ms"] for p in points if p["concurrency"] == 1), None)

    gw, raw, naive = (
        get("gateway", "throughput_ips"),
        get("raw_onnxruntime", "throughput_ips"),
        get("naive", "throughput_ips"),
    )
    gw1, tr1 = at_c1("gateway"), at_c1("triton")
    added = None
    if added_latency is not None:
        added = added_latency["median_ms"]
    elif gw1 is not None and tr1 is not None:
        added = round(gw1 - tr1, 2)
    return {
        "gateway_over_raw": round(gw / raw, 3) if gw and raw else None,
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


def targets(doc: dict[str, Any]) -> dict[str, Any]:
    r = doc["ratios"]
    gw = doc.get("gateway", {})

    def check(value: float | None, ok: Callable[[float], bool]) -> bool | None:
        return None if value is None else bool(ok(value))

    return {
        "gateway_over_raw >= 0.5 at p95 < SLO": check(
            r["gateway_over_raw"], lambda v: v >= TARGETS["gateway_over_raw_min"] and gw.get("slo_p95_met")
        ),
        "gateway_over_naive >= 5": check(
            r["gateway_over_naive"], lambda v: v >= TARGETS["gateway_over_naive_min"]
        ),
        "gateway_added_p50_ms <= 3": check(
            r["gateway_added_p50_ms"], lambda v: v <= TARGETS["gateway_added_p50_ms_max"]
        ),
    }


def markdown(doc: dict[str, Any]) -> str:
    from fashion.console import table

    rows = []
    for system in SYSTEMS:
        s = doc.get(system)
        if not s:
            rows.append([system, "skipped", "", "", "", "", ""])
            continue
        where = (
            f"batch {s['best_batch_size']}" if system == "raw_onnxruntime" else f"c={s['best_concurrency']}"
        )
        rows.append(
            [
                system,
                f"{s['throughput_ips']:.1f}",
                s["p50_ms"],
                s["p95_ms"],
                s["p99_ms"],
                where,
                _memory_cell(doc["memory"], system),
            ]
        )
    setup = doc["setup"]
    lines = [
        f"# fashion bench — {setup['model']}",
        "",
        f"{setup['date']}, {setup['host']}, `{setup['command']}`; {setup['duration_s']} s per point, "
        f"concurrencies {setup['concurrencies']}, "
        f"best = highest throughput with p95 ≤ {setup['slo_p95_ms']} ms.",
        "",
        table(["system", "images/s", "p50 ms", "p95 ms", "p99 ms", "at", "peak RSS MiB"], rows),
        "",
        table(
            ["ratio", "value", "target met"],
            [
                [
                    "gateway / raw_onnxruntime",
                    doc["ratios"]["gateway_over_raw"],
                    doc["targets"]["gateway_over_raw >= 0.5 at p95 < SLO"],
                ],
                [
                    "gateway / naive",
                    doc["ratios"]["gateway_over_naive"],
                    doc["targets"]["gateway_over_naive >= 5"],
                ],
                [
                    "gateway added p50 ms (c=1, alternating rounds)",
                    doc["ratios"]["gateway_added_p50_ms"],
                    doc["targets"]["gateway_added_p50_ms <= 3"],
                ],
            ],
        ),
        "",
        f"gateway / naive at the same concurrency: {doc['gateway_over_naive_by_concurrency']}",
        "",
        f"Preprocessing (decode with JPEG draft, EXIF, trim {doc['setup']['trim']}, resize; one core) "
        "vs the model (ONNX Runtime, batch 1, p50) per image:",
        "",
        table(
            ["photo (JPEG q90)", "bytes", "preprocess ms", "model ms", "preprocess / model"],
            [
                [r["image"], r["bytes"], r["preprocess_p50_ms"], r["model_ms"], r["preprocess_over_model"]]
                for r in doc["preprocess"]["images"]
            ],
        ),
    ]
    return "\n".join(lines) + "\n"


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
def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Measure every system not skipped, write bench.json and bench.md (and the sweep), print the table."""
    from export.tritonserver import TritonServer
    from fashion.console import emit

    opts.out.mkdir(parents=True, exist_ok=True)
    work = opts.out / "work"
    work.mkdir(exist_ok=True)
    clock = time.perf_counter()
    model = build_bench_model(work / f"model-{int(time.time())}", opts.backbone, opts.image_size, opts.images)
    log.info(
        "model %s %d px, %d heads, %d JPEGs ready in %.0f s",
        opts.backbone,
        opts.image_size,
        model.heads,
        len(model.jpegs),
        time.perf_counter() - clock,
    )
    results: dict[str, Any] = {}
    memory: dict[str, Any] = {}
    added_latency: dict[str, Any] | None = None
    model_ms = None
    if "raw_onnxruntime" not in opts.skip:
        raw_points = bench_raw(model, opts)
        results["raw_onnxruntime"] = summarise(raw_points, opts.slo_p95_ms)
        model_ms = next((p.p50_ms for p in raw_points if p.batch_size == 1), None)
    preprocessing = bench_preprocess(model, opts, model_ms)
    if "triton" not in opts.skip or "gateway" not in opts.skip:
        with TritonServer(model.repository, [MODEL_NAME], log_file=work / "tritonserver.log") as triton:
            if "triton" not in opts.skip:
                points = sweep_points(triton_client_factory(triton.grpc_url, model), opts, "triton")
                results["triton"] = summarise(points, opts.slo_p95_ms)
            if "gateway" not in opts.skip:
                env = gateway_env(
                    triton.grpc_url, model.repository, opts.gateway_workers, opts.gateway_threads, work
                )
                with Gunicorn(env, work / "gunicorn.log") as gateway:
                    factory = http_client_factory(gateway.url, "/v1/predict", model.jpegs)
                    results["gateway"] = summarise(sweep_points(factory, opts, "gateway"), opts.slo_p95_ms)
                    if "triton" not in opts.skip:
                        triton_factory = triton_client_factory(triton.grpc_url, model)
                        added_latency = measure_added_latency(triton_factory, factory, opts)
                    memory["gateway_workers_mb"] = [peak_rss_mb(p) for p in gateway.worker_pids()]
                    memory["gateway_master_mb"] = (
                        peak_rss_mb(gateway.process.pid) if gateway.process else None
                    )
            memory["triton"] = triton_rss_mb(triton.pid)
    if "naive" not in opts.skip:
        with NaiveServer(model.naive_dir, work / "naive.log") as naive:
            factory = http_client_factory(naive.url, "/predict", model.jpegs)
            results["naive"] = summarise(sweep_points(factory, opts, "naive"), opts.slo_p95_ms)
            memory["naive_mb"] = peak_rss_mb(naive.process.pid) if naive.process else None
    memory["bench_process_mb"] = peak_rss_mb(os.getpid())
    doc: dict[str, Any] = {**results, "ratios": ratios(results, added_latency), "memory": memory}
    doc["added_latency"] = added_latency
    doc["preprocess"] = preprocessing
    doc["gateway_over_naive_by_concurrency"] = same_concurrency_ratio(results)
    doc["targets"] = targets(doc)
    doc["setup"] = setup(opts, model)
    if opts.sweep:
        from loadtest.sweep import run_sweep

        doc["sweep"] = run_sweep(model, opts, work)
    (opts.out / "bench.json").write_text(json.dumps(_finite(doc), indent=2) + "\n")
    text = markdown(doc)
    if opts.sweep:
        text += "\n" + (opts.out / "sweep.md").read_text()
    (opts.out / "bench.md").write_text(text)
    emit(text)
    return doc


def setup(opts: BenchOptions, model: BenchModel) -> dict[str, Any]:
    import onnxruntime

    return {
        "model": f"{opts.backbone} {opts.image_size}x{opts.image_size}, {model.heads} heads, random weights",
        "backbone": opts.backbone,
        "image_size": opts.image_size,
        "heads": model.heads,
        "images": len(model.jpegs),
        "image_source": "training.synth catalogue renders (JPEG, 512 px wide)",
        "trim": model.preprocessing.trim,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.machine()}, {platform.platform()}",
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
            "raw_onnxruntime latency is per batch of best_batch_size preprocessed images",
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
