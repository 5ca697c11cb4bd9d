"""``fashion tag`` and ``fashion tag-bench``: argument parsing only; the work is in ``tagging.run`` and
``tagging.bench``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EPILOG = """examples:
  fashion tag ~/catalogue/images --out tags/ --local                      # no servers, the export's choice
  fashion tag catalogue.csv --out tags/ --triton 127.0.0.1:8001           # gRPC to Triton, decoding here
  fashion tag catalogue.parquet --out tags/ --gateway http://tagger:8080  # the deployed gateway
  fashion tag catalogue.parquet --out tags/ --triton triton:8001 --ray ray://head:10001 --ray-actors 8

INPUT: a folder of images (id = file name without extension) or a manifest, CSV or Parquet, with the
columns id, image (a path, relative to the manifest) and optionally title. OUT: Parquet parts, one row per
input: id, <attr>, <attr>_probability, <attr>_uncertain ... per attribute of the model, model,
model_version, error. Kill it at any moment and run the same command again: it resumes.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tag",
        help="tag a whole catalogue (a folder or a CSV/Parquet manifest) into Parquet, resumable",
        description="Tag every input with the model's attributes into Parquet parts, with progress; rerun "
        "the same command after a crash or a stop to resume.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("input", type=Path, help="a folder of images, or a .csv / .parquet manifest")
    a("--out", required=True, type=Path, help="the output folder of Parquet parts (resumed when it exists)")
    engine = p.add_mutually_exclusive_group(required=True)
    engine.add_argument(
        "--local", action="store_true", help="no servers: the export's chosen CPU runtime here"
    )
    engine.add_argument("--triton", metavar="HOST:PORT", help="Triton's gRPC address; decoding happens here")
    engine.add_argument("--gateway", metavar="URL", help="the gateway, e.g. http://127.0.0.1:8080")
    a(
        "--repository",
        help="model repository with metadata.json, for --local and --triton "
        "(default: $FASHION_MODEL_REPOSITORY or model_repository)",
    )
    a("--model", default="fashion", help="model name in the repository (default fashion)")
    a("--version", default="", help="model version (default: the newest)")
    a(
        "--batch-size",
        type=int,
        default=0,
        help="inputs per call (default: the export's best batch for --local, 16 for the servers)",
    )
    a(
        "--concurrency",
        type=int,
        default=0,
        help="calls in flight (default: --local one per usable core, each on its own OpenVINO stream; "
        "4 for the servers)",
    )
    a("--decode-threads", type=int, default=2, help="threads reading and decoding images (default 2)")
    a(
        "--part-size",
        type=int,
        default=1000,
        help="inputs per Parquet part, the unit of resuming (default 1000)",
    )
    a("--timeout", type=float, default=30.0, help="seconds one call may take (default 30)")
    a(
        "--give-up-after",
        type=float,
        default=120.0,
        help="seconds a server may stay busy or away (429/503, down) before the run stops (default 120)",
    )
    a("--api-key", help="the gateway's API key (default: $FASHION_API_KEY)")
    a(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run as a Ray Data pipeline: on a local Ray runtime, or on the cluster at ADDRESS",
    )
    a(
        "--ray-actors",
        type=int,
        default=2,
        help="Ray actor pool size: bounds the load on the server (default 2)",
    )
    a("--id-column", default="id", help="manifest column with the id (default id)")
    a("--image-column", default="image", help="manifest column with the image path (default image)")
    a("--title-column", default="title", help="manifest column with the title, if any (default title)")
    a("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_tag)

    b = sub.add_parser(
        "tag-bench",
        help="what tagging costs: images/s, CPU per image and per million, each engine and fashion predict",
        description="Tag the same real photos with every engine and with `fashion predict`; print images/s, "
        "CPU-seconds per image of the whole path, CPU-hours and dollars per million images.",
    )
    b.add_argument("--out", required=True, type=Path, help="a fresh folder for the outputs and the report")
    b.add_argument("--images", type=int, default=2000, help="photos to tag (default 2000)")
    b.add_argument("--photos", type=Path, help="folder of photos (default: the shared catalogue sample)")
    b.add_argument(
        "--repository",
        type=Path,
        default=Path("model_repository"),
        help="model repository (exported into first when it has no version)",
    )
    b.add_argument("--model", default="fashion", help="model name (default fashion)")
    b.add_argument(
        "--checkpoint", type=Path, help="the checkpoint for fashion predict (default: the shipped one)"
    )
    b.add_argument(
        "--systems",
        default="local,triton,gateway,predict",
        help="comma-separated: local, triton, gateway, predict (default all)",
    )
    b.add_argument(
        "--price-per-vcpu-hour",
        type=float,
        default=0.04,
        help="USD per vCPU-hour for the dollar column (default 0.04)",
    )
    b.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="local engine runs, taking turns with timings of its bare session; the median is reported "
        "(default 3)",
    )
    b.set_defaults(func=_bench)


def _tag(args: argparse.Namespace) -> int:
    # lazy: the command's modules import NumPy, Pillow and the runtimes; `fashion --help` must not
    from tagging.engines import EngineSpec
    from tagging.inputs import ManifestColumns
    from tagging.run import TagJob, tag

    kind = "local" if args.local else "triton" if args.triton else "gateway"
    repository = args.repository or os.environ.get("FASHION_MODEL_REPOSITORY") or "model_repository"
    spec = EngineSpec(
        kind,
        url=args.triton or args.gateway or "",
        repository=str(repository),
        model_name=args.model,
        version=args.version,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        decode_threads=args.decode_threads,
        timeout_s=args.timeout,
        give_up_s=args.give_up_after,
        api_key=args.api_key or os.environ.get("FASHION_API_KEY", ""),
    )
    job = TagJob(
        args.input,
        args.out,
        spec,
        part_size=args.part_size,
        manifest=ManifestColumns(args.id_column, args.image_column, args.title_column),
        ray=args.ray,
        ray_actors=args.ray_actors,
        progress=not args.no_progress,
    )
    tag(job)
    return 0


def _bench(args: argparse.Namespace) -> int:
    # lazy: the bench starts servers and imports torch for the predict row
    from tagging.bench import PHOTOS, CostOptions, run_bench

    run_bench(
        CostOptions(
            out=args.out,
            images=args.images,
            photos=args.photos or PHOTOS,
            repository=args.repository,
            model_name=args.model,
            checkpoint=args.checkpoint,
            systems=tuple(s.strip() for s in args.systems.split(",") if s.strip()),
            price_per_vcpu_hour=args.price_per_vcpu_hour,
            rounds=args.rounds,
            command=" ".join(["fashion", *sys.argv[1:]]),
        )
    )
    return 0
