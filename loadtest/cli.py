"""CLI of the loadtest stage: ``fashion loadtest`` (Locust against a deployed stack), ``fashion bench`` and
``fashion overload`` (answers/s against offered load, ``loadtest.overload``).

Exit status: 0 when every objective holds, **1** when the run was made but an SLO was broken
(``SloViolation``), 2 when the run could not be made (``LoadtestError``, via ``fashion.cli``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from fashion.console import emit

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "loadtest",
        help="run Locust headless against the gateway; reports + SLO check (exit 1 when broken)",
        description="Locust headless against a running gateway (and optionally Triton over gRPC). "
        "Writes Locust's CSV and HTML reports, latency.png and summary.json into --out; exit status 1 "
        "when an SLO is broken, 2 when the test could not run.",
    )
    p.add_argument("--host", required=True, help="gateway base URL, e.g. http://localhost:8080")
    p.add_argument("--users", type=int, default=8, help="concurrent users (the step shape's maximum)")
    p.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second")
    p.add_argument("--duration", type=int, default=30, help="run time in seconds")
    p.add_argument("--slo-p95-ms", type=float, default=None, help="fail when any endpoint's p95 is above")
    p.add_argument("--slo-p99-ms", type=float, default=None, help="fail when any endpoint's p99 is above")
    p.add_argument(
        "--max-error-rate",
        type=float,
        default=0.01,
        help="fail above this failure fraction (default 0.01: a run that fails cannot pass; 1 = unchecked)",
    )
    p.add_argument(
        "--polite",
        action="store_true",
        help="users wait Retry-After plus a jittered back-off after a 429/503 (default: resend at once)",
    )
    p.add_argument(
        "--triton-grpc",
        default="",
        metavar="HOST:PORT",
        help="also run TritonGrpcUser against Triton's gRPC port (shows the gateway's overhead)",
    )
    p.add_argument(
        "--images",
        type=Path,
        default=None,
        help="folder of JPEGs to send (default: render a synthetic pool into OUT/images)",
    )
    p.add_argument(
        "--shape",
        choices=("users", "step", "constant"),
        default="users",
        help="load shape: plain users, a step ramp (FASHION_LOADTEST_STEP_*) or a constant rate",
    )
    p.add_argument("--rps", type=float, default=None, help="constant shape: total requests per second")
    p.add_argument("--api-key", default="", help="API key (default: $FASHION_API_KEY)")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.set_defaults(func=loadtest_command)

    b = sub.add_parser(
        "bench",
        help="every CPU runtime x precision vs Triton vs gateway vs naive Flask+PyTorch, on this machine",
        description="Benchmark the serving stack on this machine with the same model and photos; "
        "writes OUT/bench.json and OUT/bench.md, with the CPU budget of the gateway path. --sweep searches "
        "Triton batching/instances and gateway workers under a p95 SLO and writes the recommended settings.",
    )
    b.add_argument("--out", type=Path, required=True, help="result folder")
    b.add_argument("--quick", action="store_true", help="short runs at fewer concurrencies (smoke test)")
    b.add_argument("--sweep", action="store_true", help="also sweep the serving settings under --slo-p95-ms")
    b.add_argument(
        "--checkpoint",
        default=None,
        help="the model to bench (default: the shipped models/default/model.pt), exported as `fashion serve` "
        "does; photos come from its validation split when its dataset is on disk",
    )
    b.add_argument(
        "--backbone", default=None, help="instead: random weights of this timm backbone (smoke tests)"
    )
    b.add_argument("--image-size", type=int, default=224, help="input size with --backbone")
    b.add_argument("--images", type=int, default=64, help="size of the JPEG pool")
    b.add_argument("--duration", type=float, default=None, help="seconds per measurement point")
    b.add_argument("--concurrency", default=None, help="comma-separated client concurrencies")
    b.add_argument("--slo-p95-ms", type=float, default=100.0, help="p95 objective for 'best' and the sweep")
    b.add_argument("--skip", default="", help="comma-separated systems not to measure (naive, ...)")
    b.set_defaults(func=bench_command)
    register_overload(sub)
    register_bench_ensemble(sub)


def register_bench_ensemble(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "bench-ensemble",
        help="time an exported ensemble's two forms (Triton ensemble vs one composed graph); --apply serves "
        "the faster",
        description="Loads both forms of a `fashion export --ensemble` model into one pip Triton and times "
        "them over gRPC taking turns (batch 1 and 8, one caller); --apply makes the faster form the "
        "model's configs/cpu.pbtxt (docs/ensemble.md).",
    )
    e.add_argument("--repository", type=Path, default=Path("model_repository"), help="model repository")
    e.add_argument("--name", default="fashion", help="the ensemble's served name (default fashion)")
    e.add_argument("--seconds", type=float, default=2.0, help="per form, batch and round (default 2)")
    e.add_argument("--rounds", type=int, default=3, help="rounds taking turns (default 3)")
    e.add_argument("--apply", action="store_true", help="serve the faster form (configs/cpu.pbtxt)")
    e.set_defaults(func=bench_ensemble_command)


def register_overload(sub: argparse._SubParsersAction) -> None:
    o = sub.add_parser(
        "overload",
        help="answers/s against offered load, from below capacity to far past it (table + PNG)",
        description="Closed-loop clients post JPEGs to a running gateway at each --clients count in turn; "
        "impatient clients resend at once after a 429/503, polite ones wait Retry-After plus a jittered "
        "back-off. Writes OUT/overload.md, .json and .png; exit status 1 when the answers/s at the highest "
        "count fall below --min-goodput-share of the best, or the p99 of answered requests passes "
        "--slo-p99-ms.",
    )
    o.add_argument("--host", required=True, help="gateway base URL, e.g. http://127.0.0.1:8080")
    o.add_argument("--clients", default="1,2,4,8,16,32,64", help="comma-separated client counts, in order")
    o.add_argument("--duration", type=float, default=20.0, help="measured seconds per point (default 20)")
    o.add_argument("--warmup", type=float, default=3.0, help="seconds before each measurement (default 3)")
    o.add_argument("--mode", choices=("impatient", "polite"), default="impatient", help="how clients retry")
    o.add_argument(
        "--images",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "models" / "default" / "examples",
        help="folder of JPEGs to send (default: the shipped model's example photos)",
    )
    o.add_argument("--slo-p99-ms", type=float, default=1000.0, help="p99 of answered requests (default 1000)")
    o.add_argument("--min-goodput-share", type=float, default=0.8, help="of the best answers/s (default 0.8)")
    o.add_argument(
        "--knee",
        type=int,
        default=8,
        help="clients at which the stack reaches its capacity; offered load is counted in these (default 8)",
    )
    o.add_argument("--out", type=Path, required=True, help="result folder")
    o.set_defaults(func=overload_cli)


def loadtest_command(args: argparse.Namespace) -> int:

    # lazy: the command's modules import torch/ONNX; `fashion --help` imports this file and must not
    from loadtest.errors import SLO_EXIT_CODE, SloViolation
    from loadtest.report import Slo
    from loadtest.run import LoadtestOptions, check, run_loadtest, summary_table

    opts = LoadtestOptions(
        host=args.host,
        out=args.out,
        users=args.users,
        spawn_rate=args.spawn_rate,
        duration_s=args.duration,
        slo=Slo(args.slo_p95_ms, args.slo_p99_ms, args.max_error_rate),
        triton_grpc=args.triton_grpc,
        images=args.images,
        shape=args.shape,
        rps=args.rps,
        api_key=args.api_key or os.environ.get("FASHION_API_KEY", ""),
        polite=args.polite,
    )
    result = run_loadtest(opts)
    emit(summary_table(result))
    emit(f"reports: {', '.join(str(p) for p in result.files.values())}")
    try:
        check(result)
    except SloViolation as e:
        sys.stderr.write(f"fashion loadtest: {e}\n")
        return SLO_EXIT_CODE
    emit("SLO: passed" if any(v is not None for v in vars(opts.slo).values()) else "SLO: none given")
    return 0


def overload_cli(args: argparse.Namespace) -> int:
    # lazy: matplotlib and the gateway's retry policy; `fashion --help` imports this file and must not
    from loadtest.errors import LoadtestError
    from loadtest.overload import OverloadOptions, overload_command

    images = tuple(p.read_bytes() for p in sorted(Path(args.images).glob("*.jp*g")))
    try:
        clients = tuple(int(c) for c in args.clients.split(",") if c.strip())
    except ValueError as e:
        raise LoadtestError(f"--clients is a comma-separated list of counts, got {args.clients!r}") from e
    opts = OverloadOptions(
        host=args.host.rstrip("/"),
        out=args.out,
        images=images,
        clients=clients,
        duration_s=args.duration,
        warmup_s=args.warmup,
        mode=args.mode,
        slo_p99_ms=args.slo_p99_ms,
        min_goodput_share=args.min_goodput_share,
        knee_clients=args.knee,
    )
    return overload_command(opts)


def bench_ensemble_command(args: argparse.Namespace) -> int:
    # lazy: the command's modules import ONNX and tritonclient; `fashion --help` imports this file
    from loadtest.ensemble import FormBenchOptions, bench_forms

    opts = FormBenchOptions(
        args.repository, args.name, rounds=args.rounds, seconds=args.seconds, apply=args.apply
    )
    emit(bench_forms(opts).table())
    return 0


def bench_command(args: argparse.Namespace) -> int:
    # lazy: the command's modules import torch/ONNX; `fashion --help` imports this file and must not
    from loadtest.bench import BenchOptions, run_bench

    opts = BenchOptions.from_args(args)
    run_bench(opts)
    return 0
