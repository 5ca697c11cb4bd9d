"""`fashion export`: argument parsing only; the work is in ``export.pipeline.export_checkpoint``."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  fashion export --checkpoint runs/kaggle/best.pt
  fashion export --checkpoint runs/kaggle/best.pt --precision fp32,fp16,int8 \\
      --calibration-data ~/kaggle/fashion-product-images --max-batch-size 32
  fashion export --checkpoint best.pt --precision trt-fp16    # on a GPU machine with TensorRT

Writes <repository>/<name>/<next version>/ (model.onnx, model.fp16.onnx, model.int8.onnx, model.py,
metadata.json) and the model's config.pbtxt (onnxruntime_onnx, for the NGC Triton image) plus
configs/cpu.pbtxt (python backend, for the pip-installed Triton: --model-config-name cpu).
Every export checks PyTorch vs ONNX Runtime and stops (exit 2) beyond the tolerance.
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
    a("--checkpoint", required=True, help="best.pt or last.pt written by `fashion train`")
    a("--repository", default="model_repository", help="Triton model repository (default model_repository)")
    a("--name", default="fashion", help="model name = folder in the repository (default fashion)")
    a("--version", type=int, help="version number (default: the next free one; existing ones are kept)")
    a(
        "--precision",
        default="fp32",
        help="comma-separated: fp32 (always), fp16, int8, trt-fp16, trt-int8 (default fp32)",
    )
    a(
        "--calibration-data",
        help="dataset (any `fashion train` layout) for INT8 calibration and the checks "
        "(default: the checkpoint's training data if present, else synthetic images)",
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
        default=0.97,
        help="refuse a variant whose top-1 agreement with FP32 is lower for any attribute (default 0.97)",
    )
    a("--parity-tolerance", type=float, default=1e-4, help="max |Δp| PyTorch vs ONNX Runtime (default 1e-4)")
    a("--calibration-images", type=int, default=128, help="images for INT8 calibration (default 128)")
    a("--eval-images", type=int, default=64, help="images for parity and precision deltas (default 64)")
    a("--force", action="store_true", help="write variants even below --min-agreement")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
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
        calibration_images=args.calibration_images,
        eval_images=args.eval_images,
    )
    export_checkpoint(opts)
    return 0
