"""``export_checkpoint``: checkpoint → checked ONNX (+ FP16/INT8/TensorRT) → a new model repository version.

Steps: ONNX export and ``onnx.checker``; parity of PyTorch vs ONNX Runtime (max |Δp| ≤ tolerance, or
``ParityError``); the asked precision variants with their agreement with FP32 per attribute (below
``min_agreement`` → ``PrecisionError`` unless ``force``); the metadata; an atomic new version; TensorRT
plans where a GPU and TensorRT exist.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.errors import ExportError, ParityError, PrecisionError
from export.parity import FP32_ATOL, Agreement, agreement_table, compare, worst
from export.repository import ServingConfig, write_model_version, write_trt_model

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8", "trt-fp16", "trt-int8")


def parse_precisions(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"fp16,int8"`` → ``("fp32", "fp16", "int8")``; FP32 is always exported, ``trt-X`` implies ``X``."""
    items = [x.strip() for x in text.split(",")] if isinstance(text, str) else list(text)
    items = [x for x in items if x]
    unknown = [x for x in items if x not in PRECISIONS]
    if unknown:
        raise ExportError(f"unknown precision {unknown[0]!r}; choose from {', '.join(PRECISIONS)}")
    wanted = {"fp32", *items, *(x.removeprefix("trt-") for x in items if x.startswith("trt-"))}
    return tuple(p for p in PRECISIONS if p in wanted)


@dataclass(frozen=True)
class ExportOptions:
    """What ``fashion export`` does; checked on construction."""

    checkpoint: Path
    repository: Path = Path("model_repository")
    name: str = "fashion"
    version: int | None = None
    precisions: tuple[str, ...] = ("fp32",)
    calibration_data: Path | None = None
    max_batch_size: int = 32
    force: bool = False
    parity_atol: float = FP32_ATOL
    min_agreement: float = 0.97  # per attribute, FP32 vs variant, ties excused (see export.parity)
    calibration_images: int = 128
    eval_images: int = 64
    cpu_threads: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoint", Path(self.checkpoint))
        object.__setattr__(self, "repository", Path(self.repository))
        object.__setattr__(self, "precisions", parse_precisions(self.precisions))
        if self.calibration_data is not None:
            object.__setattr__(self, "calibration_data", Path(self.calibration_data))
        if not 0 <= self.min_agreement <= 1:
            raise ExportError(f"min_agreement must be between 0 and 1, got {self.min_agreement}")
        if self.calibration_images < 1 or self.eval_images < 1:
            raise ExportError("calibration_images and eval_images must be at least 1")
        if self.parity_atol <= 0:
            raise ExportError("parity_atol must be positive")
        ServingConfig(max_batch_size=self.max_batch_size)  # validates the batch size early


@dataclass
class ExportResult:
    version_dir: Path
    version: int
    parity: list[Agreement]
    deltas: dict[str, list[Agreement]]
    files: dict[str, Path]
    plans: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def export_checkpoint(opts: ExportOptions, report: Callable[[str], None] | None = None) -> ExportResult:
    """Run the whole export; ``report`` receives the tables (default: standard output)."""
    from fashion.console import emit

    say = report or emit
    wants_trt = [p for p in opts.precisions if p.startswith("trt-")]
    if wants_trt:
        from export.tensorrt import require_tensorrt

        require_tensorrt()  # before minutes of work, not after

    import onnxruntime
    import torch

    from export.images import load_images
    from export.metadata import build_metadata, file_sha256
    from export.onnx_export import OPSET, export_onnx, run_onnx, run_torch, session
    from export.precision import count_ops, to_fp16, to_int8
    from training.checkpoint import load_checkpoint, weights_digest

    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    ckpt = load_checkpoint(opts.checkpoint)
    schema, pre = ckpt.schema, ckpt.preprocessing
    wanted = opts.eval_images + (opts.calibration_images if "int8" in opts.precisions else 0)
    image_set = load_images(
        pre,
        wanted,
        data=opts.calibration_data,
        train_data=ckpt.config.get("data"),
        seed=ckpt.config.get("seed", 0),
    )
    images = image_set.images
    if len(images) < 2:
        raise ExportError(f"need at least 2 images for the checks, got {len(images)} from {image_set.source}")
    eval_images = (
        images[: min(opts.eval_images, max(1, len(images) // 2))]
        if "int8" in opts.precisions
        else images[: opts.eval_images]
    )
    calibration = images[len(eval_images) :] if "int8" in opts.precisions else images[:0]
    seconds["load"] = time.perf_counter() - clock

    with tempfile.TemporaryDirectory(prefix="fashion-export-") as tmp:
        work = Path(tmp)
        clock = time.perf_counter()
        files = {"fp32": export_onnx(ckpt.model, work / "model.onnx")}
        seconds["onnx_export"] = time.perf_counter() - clock

        clock = time.perf_counter()
        fp32 = run_onnx(session(files["fp32"], opts.cpu_threads), eval_images)
        parity = compare(schema, run_torch(ckpt.model, eval_images), fp32)
        seconds["parity"] = time.perf_counter() - clock
        say(
            agreement_table(
                parity,
                f"parity: PyTorch vs ONNX Runtime FP32 ({image_set.source}, "
                f"{len(eval_images)} images; tolerance max |Δp| ≤ {opts.parity_atol:g})",
            )
        )
        max_diff, _ = worst(parity)
        if max_diff > opts.parity_atol:
            raise ParityError(
                f"ONNX Runtime differs from PyTorch by up to {max_diff:.3g} "
                f"(tolerance {opts.parity_atol:g}); "
                "nothing was written"
            )

        deltas: dict[str, list[Agreement]] = {}
        precision_meta: dict[str, Any] = {}
        for precision in ("fp16", "int8"):
            if precision not in opts.precisions:
                continue
            clock = time.perf_counter()
            extra: dict[str, Any] = {}
            if precision == "fp16":
                files["fp16"] = to_fp16(files["fp32"], work / "model.fp16.onnx")
            else:
                files["int8"], excluded = to_int8(files["fp32"], work / "model.int8.onnx", calibration)
                import onnx

                extra = {
                    "calibration": {
                        "source": image_set.source,
                        "images": len(calibration),
                        "method": "minmax",
                    },
                    "excluded_nodes": excluded,
                    "quantize_linear_nodes": count_ops(onnx.load(files["int8"]), "QuantizeLinear"),
                }
            rows = compare(schema, fp32, run_onnx(session(files[precision], opts.cpu_threads), eval_images))
            seconds[precision] = time.perf_counter() - clock
            deltas[precision] = rows
            _, lowest = worst(rows)
            say(
                agreement_table(
                    rows,
                    f"{precision} vs fp32 ({len(eval_images)} images; refused below "
                    f"{opts.min_agreement:.0%} agreement excluding ties)",
                )
            )
            refused = lowest < opts.min_agreement
            if refused and not opts.force:
                raise PrecisionError(
                    f"{precision} agrees with FP32 on only {lowest:.1%} of images for some attribute "
                    f"(threshold {opts.min_agreement:.0%}); nothing was written. Calibrate on more "
                    "representative images (--calibration-data), or pass --force to write it anyway"
                )
            precision_meta[precision] = {
                "file": {"fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}[precision],
                "bytes": files[precision].stat().st_size,
                "min_agreement": opts.min_agreement,
                "forced": refused,
                "attributes": [r.to_dict() for r in rows],
                **extra,
            }

        metadata = build_metadata(
            schema=schema,
            preprocessing=pre,
            backbone=ckpt.backbone,
            temperatures=ckpt.temperatures(),
            thresholds=ckpt.thresholds,
            training={
                "run_config": ckpt.config,
                "epoch": ckpt.epoch,
                "val_score": ckpt.val_score,
                "val_metrics": ckpt.val_metrics,
                "weights_sha256": weights_digest(ckpt.model),
                "checkpoint_sha256": file_sha256(opts.checkpoint),
                # The gate that flags unseen product types (training.novelty); inside model.onnx.
                "novelty": ckpt.model.novelty.describe() if ckpt.model.novelty is not None else None,
            },
            export={
                "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
                "opset": OPSET,
                "files": {p: {"file": f.name, "bytes": f.stat().st_size} for p, f in files.items()},
                "parity": {
                    "reference": "pytorch",
                    "candidate": "onnxruntime-fp32",
                    "tolerance_abs": opts.parity_atol,
                    "images": len(eval_images),
                    "source": image_set.source,
                    "attributes": [r.to_dict() for r in parity],
                },
                "precisions": precision_meta,
            },
        )
        version_dir = write_model_version(
            opts.repository,
            opts.name,
            schema=schema,
            image_size=pre.image_size,
            model_files=files,
            metadata=metadata,
            warmup_image=eval_images[0],
            serving=ServingConfig(max_batch_size=opts.max_batch_size, cpu_threads=opts.cpu_threads),
            version=opts.version,
        )
    version = int(version_dir.name)
    plans: dict[str, Path] = {}
    for precision in wants_trt:
        base = precision.removeprefix("trt-")
        plans[precision] = _build_trt(opts, version_dir, base, pre.image_size)
    files = {p: version_dir / f.name for p, f in files.items()}
    say(f"wrote {version_dir} ({', '.join(f.name for f in files.values())}) in {sum(seconds.values()):.1f} s")
    return ExportResult(version_dir, version, parity, deltas, files, plans, seconds)


def _build_trt(opts: ExportOptions, version_dir: Path, precision: str, image_size: int) -> Path:
    from export.tensorrt import build_plan

    name = f"{opts.name}_trt" if precision == "fp16" else f"{opts.name}_trt_{precision}"
    with tempfile.TemporaryDirectory(prefix="fashion-trt-") as tmp:
        plan = build_plan(
            version_dir / f"model.{precision}.onnx",
            Path(tmp) / "model.plan",
            image_size=image_size,
            max_batch_size=opts.max_batch_size,
            timing_cache=opts.repository / ".trt_timing.cache",
        )
        out = write_trt_model(
            opts.repository,
            name,
            int(version_dir.name),
            plan,
            version_dir / "metadata.json",
            opts.max_batch_size,
        )
    return out / "model.plan"
