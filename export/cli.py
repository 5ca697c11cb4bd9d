"""`fashion export` and `fashion deploy`: argument parsing only; the work is in ``export.pipeline`` and
``export.deploy``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fashion.console import emit

EPILOG = """examples:
  fashion export --checkpoint models/default/model.pt --precision auto   # what `fashion serve` does
  fashion export --checkpoint runs/kaggle/best.pt --precision fp32,fp16,int8 \\
      --calibration-data ~/kaggle/fashion-product-images --max-batch-size 32
  fashion export --checkpoint best.pt --precision trt-fp16    # on a GPU machine with TensorRT
  fashion export --ensemble runs/lite0/best.pt runs/lite2/best.pt   # two backbones, one served model

Writes <repository>/<name>/<next version>/ (model.onnx, model.fp16.onnx, model.int8.onnx, model.py,
metadata.json) and the model's config.pbtxt (onnxruntime_onnx, for the NGC Triton image),
configs/cpu.pbtxt (python backend running the fastest CPU candidate that passed the accuracy gate, for
the pip-installed Triton: --model-config-name cpu) and configs/openvino.pbtxt (the NGC image's openvino
backend). Every export checks PyTorch vs ONNX Runtime and stops (exit 2) beyond the tolerance; a reduced
precision that fails the gate stops it too, unless --precision auto (left out) or --force (written).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX (FP32/FP16/INT8, TensorRT) as a Triton model repository version",
        description="Export a checkpoint as a new version of a Triton model: ONNX with uint8 NHWC input and "
        "one probability output per attribute, parity-checked against PyTorch, with optional FP16, INT8 "
        "(Q/DQ) and TensorRT variants whose agreement with FP32 is printed and stored in metadata.json.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="best.pt or last.pt written by `fashion train`")
    which.add_argument(
        "--ensemble",
        nargs=2,
        metavar=("A.pt", "B.pt"),
        help="two checkpoints with the same label schema, served as one model: each member its own Triton "
        "model (B resizes A's input inside its graph), per-attribute weights fitted on validation photos, "
        "a Triton ensemble and one composed ONNX graph (docs/ensemble.md). FP32 only",
    )
    a(
        "--ensemble-serve",
        choices=("composed", "ensemble"),
        default="composed",
        help="with --ensemble: the form configs/cpu.pbtxt serves: one composed ONNX graph (default) or "
        "Triton's ensemble scheduler; `fashion bench-ensemble --apply` times both and serves the faster",
    )
    a("--repository", default="model_repository", help="Triton model repository (default model_repository)")
    a("--name", default="fashion", help="model name = folder in the repository (default fashion)")
    a("--version", type=int, help="version number (default: the next free one; existing ones are kept)")
    a(
        "--precision",
        default="fp32",
        help="comma-separated: fp32 (always), fp16, bf16, int8, trt-fp16, trt-int8, or auto = every CPU "
        "precision, leaving out those that fail the gate (default fp32). Every CPU candidate (ONNX Runtime "
        "and OpenVINO × the exported precisions) is gated and timed; configs/cpu.pbtxt serves the fastest "
        "that passed",
    )
    a(
        "--calibration-data",
        help="labelled dataset (any `fashion train` layout) for INT8 calibration and the accuracy gate "
        "(default: the checkpoint's training data — calibration on its training split, the gate on its "
        "validation split)",
    )
    a(
        "--synthetic-calibration",
        action="store_true",
        help="with no real photos, calibrate and gate bf16/int8 on synthetic renders (recorded in metadata)",
    )
    a(
        "--int8-keep",
        default="",
        help="comma-separated ONNX node names or regular expressions over them (whole-name match) to keep "
        "out of INT8, besides the stem, heads and gate; e.g. '/backbone/blocks/blocks\\.[0-2]/.*' keeps "
        "the first three stages in FP32. Default: the int8_keep list of an export.yaml next to the "
        "checkpoint (models/default has one)",
    )
    a(
        "--max-batch-size",
        type=int,
        default=32,
        help="Triton max_batch_size and TensorRT profile max (default 32)",
    )
    a(
        "--min-agreement",
        type=float,
        default=0.99,
        help="refuse a variant whose top-1 agreement with FP32, near-ties excluded, is lower for any "
        "attribute (default 0.99)",
    )
    a(
        "--max-accuracy-drop",
        type=float,
        default=0.005,
        help="refuse a variant whose accuracy against the labels is lower than FP32's by more, for any "
        "attribute (default 0.005 = 0.5 points)",
    )
    a(
        "--max-confidence-delta",
        type=float,
        default=0.02,
        help="refuse a variant whose top-1 confidence differs from FP32's by more on average, for any "
        "attribute (default 0.02)",
    )
    a("--parity-tolerance", type=float, default=1e-4, help="max |Δp| PyTorch vs ONNX Runtime (default 1e-4)")
    a("--calibration-images", type=int, default=300, help="photos for INT8 calibration (default 300)")
    a("--gate-images", type=int, default=500, help="labelled photos for the accuracy gate (default 500)")
    a("--eval-images", type=int, default=64, help="of those, photos for the PyTorch parity (default 64)")
    a("--threads", type=int, default=2, help="CPU threads per model instance, timed and served (default 2)")
    a("--force", action="store_true", help="write variants that fail the accuracy gate (never served)")
    p.set_defaults(func=_export)

    d = sub.add_parser(
        "deploy",
        help="make a running Triton serve one version of a model (update or rollback, no downtime)",
        description="Ask Triton (explicit model control) to serve exactly VERSION of the model: it loads "
        "the version while the old one keeps answering, then unloads the old one. A failed load leaves the "
        "old version serving. Gateways that follow the newest version switch with Triton, forward or back.",
        epilog=DEPLOY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument(
        "--triton-url", default="127.0.0.1:8000", help="Triton's HTTP host:port (default 127.0.0.1:8000)"
    )
    d.add_argument("--model", default="fashion", help="model name (default fashion)")
    d.add_argument(
        "--version", type=int, required=True, help="the version to serve (an older one rolls back)"
    )
    d.add_argument(
        "--repository",
        default="model_repository",
        help="local model repository to check the version against first (metadata.json present, same heads "
        "and class counts as the served configuration); skipped when it has no such model "
        "(default model_repository)",
    )
    d.add_argument(
        "--timeout-s", type=float, default=300.0, help="how long Triton may take to load (default 300)"
    )
    d.set_defaults(func=_deploy)


DEPLOY_EPILOG = """examples:
  fashion export --checkpoint runs/new/best.pt          # writes model_repository/fashion/2/ (not served yet)
  fashion deploy --version 2                            # Triton serves 2; the gateways follow
  fashion deploy --version 1                            # rollback

A deployed version lasts until Triton restarts (it then serves the newest version folder again): remove a bad
version from the repository to make a rollback permanent.
"""


def _deploy(args: argparse.Namespace) -> int:

    # lazy: the command's modules import torch/ONNX; `fashion --help` imports this file and must not
    from export.deploy import deploy

    repository: Path | None = Path(args.repository) if args.repository else None
    if repository is not None and not (repository / args.model).is_dir():
        logging.getLogger(__name__).warning(
            "%s has no model %r: version %s is not checked before the load",
            repository,
            args.model,
            args.version,
        )
        repository = None
    result = deploy(
        args.triton_url, args.model, args.version, repository=repository, timeout_s=args.timeout_s
    )
    emit(result.summary())
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.ensemble:
        return _export_ensemble(args)
    # lazy: the command's modules import torch/ONNX; `fashion --help` imports this file and must not
    from export.pipeline import ExportOptions, export_checkpoint

    opts = ExportOptions(
        checkpoint=args.checkpoint,
        repository=args.repository,
        name=args.name,
        version=args.version,
        precisions=args.precision,
        calibration_data=args.calibration_data,
        max_batch_size=args.max_batch_size,
        force=args.force,
        parity_atol=args.parity_tolerance,
        min_agreement=args.min_agreement,
        max_accuracy_drop=args.max_accuracy_drop,
        max_confidence_delta=args.max_confidence_delta,
        calibration_images=args.calibration_images,
        gate_images=args.gate_images,
        eval_images=args.eval_images,
        synthetic_calibration=args.synthetic_calibration,
        int8_keep=tuple(n.strip() for n in args.int8_keep.split(",") if n.strip()),
        cpu_threads=args.threads,
    )
    export_checkpoint(opts)
    return 0


def _export_ensemble(args: argparse.Namespace) -> int:
    # lazy: the command's modules import torch/ONNX; `fashion --help` imports this file and must not
    from export.ensemble import EnsembleOptions, export_ensemble
    from export.errors import ExportError

    if args.precision != "fp32" or args.version is not None:
        raise ExportError("--ensemble exports FP32 at the next free versions: drop --precision and --version")
    opts = EnsembleOptions(
        members=(Path(args.ensemble[0]), Path(args.ensemble[1])),
        repository=args.repository,
        name=args.name,
        calibration_data=args.calibration_data,
        gate_images=args.gate_images,
        eval_images=args.eval_images,
        max_batch_size=args.max_batch_size,
        cpu_threads=args.threads,
        parity_atol=args.parity_tolerance,
        serve=args.ensemble_serve,
    )
    export_ensemble(opts)
    return 0
