"""``fashion serve``'s command line (argparse only; ``orchestration.serve`` does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

EPILOG = """examples:
  fashion serve                                   # export the shipped default model once, serve it on :8080
  fashion serve --demo --repository demo/repo     # the synthetic demo model instead (built once)
  fashion serve --port 0 --triton-http-port 0 --triton-grpc-port 0 --triton-metrics-port 0   # free ports
  fashion serve --checkpoint runs/kaggle/best.pt  # export and serve your own model
  fashion serve --smoke                           # start, send one request, stop (CI)
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the local stack: Triton + the gateway (exports the shipped default model if there is none)",
        description="Serve the model repository with the pip-installed Triton and the gateway under "
        "gunicorn. If the repository has no servable model, export the shipped default model first (or "
        "your --checkpoint, or build the synthetic --demo). Stops both on Ctrl-C or SIGTERM.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("--repository", default="model_repository", help="Triton model repository (default model_repository)")
    a("--checkpoint", help="export and serve this checkpoint instead of the shipped default model")
    a("--demo", action="store_true", help="build and serve the synthetic demo model (for tests and "
      "demos without real photos) instead of the shipped default model")
    a(
        "--rebuild",
        action="store_true",
        help="export the model again (with --demo: retrain it) as a new version even if the "
        "repository already has one",
    )
    a("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    a("--port", type=int, default=8080, help="gateway port (default 8080; 0 = a free one)")
    a("--triton-http-port", type=int, default=8000, help="default 8000; 0 = a free one")
    a("--triton-grpc-port", type=int, default=8001, help="default 8001; 0 = a free one")
    a("--triton-metrics-port", type=int, default=8002, help="default 8002; 0 = a free one")
    a("--startup-timeout-s", type=float, default=180.0, help="how long to wait for readiness (default 180)")
    a("--smoke", action="store_true", help="start, send the sample request, stop and exit 0")
    a(
        "--status-file",
        type=Path,
        default=None,
        help="write what was started (model version, URLs, PIDs, logs) to this file as JSON once ready; "
        "rewritten when Triton is restarted, removed on exit",
    )
    d = p.add_argument_group("demo model (--demo)")
    d.add_argument("--demo-dir", default="demo", help="where synth/ and run/ go (default demo)")
    d.add_argument("--demo-count", type=int, default=800, help="synthetic products (default 800)")
    d.add_argument(
        "--backbone",
        default="efficientnet_b0",
        help="default efficientnet_b0; test_efficientnet is tiny (CI)",
    )
    d.add_argument("--image-size", type=int, default=96, help="default 96")
    d.add_argument("--epochs", type=int, default=8, help="default 8")
    p.set_defaults(func=_command)


def _command(args: Any) -> int:
    # lazy: the stack's modules import numpy and PIL (the metadata parser); `fashion --help` imports this file
    from fashion.console import emit
    from orchestration.serve import DemoSettings, ServeConfig, ServedStack, banner, sample_image, serve

    config = ServeConfig(
        repository=args.repository,
        checkpoint=args.checkpoint,
        rebuild=args.rebuild,
        demo=args.demo,
        demo_settings=DemoSettings(
            directory=args.demo_dir,
            count=args.demo_count,
            backbone=args.backbone,
            image_size=args.image_size,
            epochs=args.epochs,
        ),
        host=args.host,
        port=args.port,
        triton_http_port=args.triton_http_port,
        triton_grpc_port=args.triton_grpc_port,
        triton_metrics_port=args.triton_metrics_port,
        startup_timeout_s=args.startup_timeout_s,
        smoke=args.smoke,
        status_file=args.status_file,
    )

    def started(stack: ServedStack) -> None:
        for line in banner(stack, sample_image(config)):
            emit(line)

    serve(config, on_ready=started)
    return 0
