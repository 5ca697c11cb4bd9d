"""``export_checkpoint``: checkpoint → checked ONNX (+ FP16/INT8/TensorRT) → a new model repository version.

Steps: ONNX export and ``onnx.checker``; parity of PyTorch vs ONNX Runtime (max |Δp| ≤ tolerance, or
``ParityError``); the asked precision variants (FP16, INT8 by NNCF); every CPU candidate (runtime ×
precision, ``export.runtimes``) gated on real validation photos (``export.parity.gate``) and timed here; a
variant that fails the gate → ``PrecisionError`` (or left out with ``--precision auto``, or kept with
``force``); the metadata, which records every candidate and the one served; an atomic new version whose
``configs/cpu.pbtxt`` serves the fastest candidate that passed; TensorRT plans where a GPU and TensorRT
exist.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from export.errors import ExportError, ParityError, PrecisionError
from export.images import export_images
from export.onnx_export import OPSET, export_onnx, run_torch
from export.parity import (
    FP32_ATOL,
    GATE_MAX_ACCURACY_DROP,
    GATE_MIN_AGREEMENT,
    Agreement,
    agreement_table,
    compare,
    gate,
    gate_table,
    worst,
)
from export.precision import count_ops, to_fp16, to_int8
from export.repository import CpuServing, ServingConfig, write_model_version, write_trt_model
from export.runtimes import (
    REFERENCE,
    TIMED_BATCHES,
    TURN_ROUNDS,
    Measured,
    candidates,
    choose,
    cpu_info,
    make_runner,
    run_all,
    time_taking_turns,
    unavailable,
)
from export.tensorrt import build_plan, require_tensorrt
from fashion.console import emit, table
from fashion.metadata import build_metadata, file_sha256
from training.checkpoint import load_checkpoint, weights_digest

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "trt-fp16", "trt-int8")
# ``auto``: every CPU precision this machine may serve; a variant that fails the gate is left out (not an
# error), and the fastest that passes is served. What ``fashion serve`` exports when real photos exist.
AUTO = ("fp32", "bf16", "int8")


def parse_precisions(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"fp16,int8"`` → ``("fp32", "fp16", "int8")``; FP32 is always exported, ``trt-X`` implies ``X``."""
    items = [x.strip() for x in text.split(",")] if isinstance(text, str) else list(text)
    items = [x for x in items if x]
    if "auto" in items:
        items = [*(x for x in items if x != "auto"), *AUTO]
    unknown = [x for x in items if x not in PRECISIONS]
    if unknown:
        raise ExportError(f"unknown precision {unknown[0]!r}; choose from auto, {', '.join(PRECISIONS)}")
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
    # True (``--precision auto``): a reduced precision that fails the gate is left out and the export goes
    # on; False: it stops the export with PrecisionError (unless ``force``).
    skip_refused: bool = False
    calibration_data: Path | None = None
    synthetic_calibration: bool = False  # calibrate and gate on synthetic renders when no real photos exist
    int8_keep: tuple[str, ...] = ()  # node names kept out of INT8 besides the built-in exclusions
    max_batch_size: int = 32
    force: bool = False
    parity_atol: float = FP32_ATOL
    min_agreement: float = GATE_MIN_AGREEMENT  # per attribute, FP32 vs variant, near-ties excluded
    max_accuracy_drop: float = GATE_MAX_ACCURACY_DROP  # per attribute, against the labels
    calibration_images: int = 300
    gate_images: int = 500
    eval_images: int = 64  # of the gate photos, for the PyTorch vs ONNX Runtime parity
    cpu_threads: int = 2
    time_s: float = 1.5  # timing per candidate and batch size, over the rounds taking turns

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoint", Path(self.checkpoint))
        object.__setattr__(self, "repository", Path(self.repository))
        if isinstance(self.precisions, str) and "auto" in self.precisions.split(","):
            object.__setattr__(self, "skip_refused", True)
        object.__setattr__(self, "precisions", parse_precisions(self.precisions))
        object.__setattr__(self, "int8_keep", tuple(self.int8_keep))
        if self.calibration_data is not None:
            object.__setattr__(self, "calibration_data", Path(self.calibration_data))
        if not 0 <= self.min_agreement <= 1:
            raise ExportError(f"min_agreement must be between 0 and 1, got {self.min_agreement}")
        if not 0 <= self.max_accuracy_drop <= 1:
            raise ExportError(f"max_accuracy_drop must be between 0 and 1, got {self.max_accuracy_drop}")
        if self.calibration_images < 1 or self.eval_images < 1 or self.gate_images < 2:
            raise ExportError("calibration_images and eval_images must be at least 1, gate_images at least 2")
        if self.parity_atol <= 0:
            raise ExportError("parity_atol must be positive")
        if self.time_s <= 0 or self.cpu_threads < 1:
            raise ExportError("time_s and cpu_threads must be positive")
        ServingConfig(max_batch_size=self.max_batch_size)  # validates the batch size early


@dataclass
class ExportResult:
    version_dir: Path
    version: int
    parity: list[Agreement]
    gates: dict[str, dict[str, Any]]  # variant or candidate name -> export.parity.gate document
    files: dict[str, Path]
    cpu: list[Measured] = field(default_factory=list)
    chosen: Measured | None = None
    plans: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


EXPORT_SETTINGS = "export.yaml"  # next to a checkpoint: export settings that belong to that model


def int8_keep(opts: ExportOptions) -> tuple[tuple[str, ...], str | None]:
    """The nodes (names or patterns) kept out of INT8 and where they came from: ``--int8-keep``, else the
    ``int8_keep`` list of an ``export.yaml`` next to the checkpoint (the shipped model has one: its INT8
    passes the accuracy gate only with its first stages in FP32), else none."""
    if opts.int8_keep:
        return opts.int8_keep, "--int8-keep"
    settings = opts.checkpoint.parent / EXPORT_SETTINGS
    if not settings.is_file():
        return (), None
    try:
        doc = yaml.safe_load(settings.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ExportError(f"{settings} is not readable YAML: {e}") from e
    keep = doc.get("int8_keep", []) if isinstance(doc, dict) else None
    if not isinstance(keep, list) or not all(isinstance(k, str) for k in keep):
        raise ExportError(f"{settings}: int8_keep must be a list of node names or patterns")
    return tuple(keep), str(settings) if keep else None


def export_checkpoint(opts: ExportOptions, report: Callable[[str], None] | None = None) -> ExportResult:
    """Run the whole export; ``report`` receives the tables (default: standard output)."""

    say = report or emit
    wants_trt = [p for p in opts.precisions if p.startswith("trt-")]
    if wants_trt:
        require_tensorrt()  # before minutes of work, not after

    import onnx
    import onnxruntime
    import torch

    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    ckpt = load_checkpoint(opts.checkpoint)
    schema, pre = ckpt.schema, ckpt.preprocessing
    reduced: list[str] = [p for p in ("bf16", "int8") if p in opts.precisions]
    photos = export_images(
        ckpt,
        gate_count=max(opts.gate_images, opts.eval_images),
        calibration_count=opts.calibration_images if "int8" in opts.precisions else 0,
        data=opts.calibration_data,
        synthetic_calibration=opts.synthetic_calibration,
        seed=ckpt.config.get("seed", 0),
    )
    gate_images, labels = photos.gate.images, photos.labels
    if reduced and not photos.real and not opts.synthetic_calibration:
        message = (
            f"{' and '.join(reduced)} must be calibrated and checked on real photos, and none are here "
            "(the checkpoint's training data is not on disk). Pass --calibration-data DIR (any `fashion "
            "train` layout), or --synthetic-calibration to use synthetic renders (recorded in metadata.json)"
        )
        if not opts.skip_refused:
            raise ExportError(message)
        say(f"note: {message}; exporting FP32 only")
        reduced = []
    eval_images = gate_images[: opts.eval_images]
    seconds["load"] = time.perf_counter() - clock

    with tempfile.TemporaryDirectory(prefix="fashion-export-") as tmp:
        work = Path(tmp)
        clock = time.perf_counter()
        files = {"fp32": export_onnx(ckpt.model, work / "model.onnx")}
        seconds["onnx_export"] = time.perf_counter() - clock

        clock = time.perf_counter()
        reference = make_runner(REFERENCE, files["fp32"], opts.cpu_threads)
        parity = compare(schema, run_torch(ckpt.model, eval_images), run_all(reference, eval_images))
        seconds["parity"] = time.perf_counter() - clock
        say(
            agreement_table(
                parity,
                f"parity: PyTorch vs ONNX Runtime FP32 ({photos.gate.source}, "
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
        fp32 = run_all(reference, gate_images)  # what every candidate is gated against

        def check(name: str, outputs: list[np.ndarray]) -> dict[str, Any]:
            doc = gate(
                schema,
                fp32,
                outputs,
                labels,
                min_agreement=opts.min_agreement,
                max_accuracy_drop=opts.max_accuracy_drop,
            )
            say(gate_table(doc, f"{name} vs ONNX Runtime FP32 on {photos.gate.source}: {doc['rule']}"))
            return doc

        gates: dict[str, dict[str, Any]] = {}
        precision_meta: dict[str, Any] = {}
        if "fp16" in opts.precisions:  # GPU precision; its numbers are checked here as ONNX Runtime runs it
            clock = time.perf_counter()
            files["fp16"] = to_fp16(files["fp32"], work / "model.fp16.onnx")
            gates["fp16"] = check(
                "fp16 (ONNX Runtime CPU)",
                run_all(make_runner(REFERENCE, files["fp16"], opts.cpu_threads), gate_images),
            )
            seconds["fp16"] = time.perf_counter() - clock
            _refuse_or_keep("fp16", gates["fp16"], opts, files)
            if "fp16" in files:
                precision_meta["fp16"] = {
                    "file": "model.fp16.onnx",
                    "gate": gates["fp16"],
                    "forced": not gates["fp16"]["passed"],
                }
        if "int8" in reduced:
            clock = time.perf_counter()
            assert photos.calibration is not None
            keep, keep_source = int8_keep(opts)
            if keep_source is not None:
                say(f"int8: keeping {', '.join(keep)} in FP32 ({keep_source})")
            files["int8"], excluded = to_int8(
                files["fp32"], work / "model.int8.onnx", photos.calibration.images, keep
            )
            seconds["int8_quantise"] = time.perf_counter() - clock
            precision_meta["int8"] = {
                "file": "model.int8.onnx",
                "quantiser": f"nncf {_version('nncf')} post-training quantisation, PERFORMANCE preset "
                "(symmetric, per-channel weights)",
                "calibration": {
                    "source": photos.calibration.source,
                    "images": len(photos.calibration.images),
                    "real_photos": photos.real,
                },
                "excluded_nodes": excluded,
                "keep": {"patterns": list(keep), "from": keep_source},
                "quantize_linear_nodes": count_ops(onnx.load(files["int8"]), "QuantizeLinear"),
            }

        clock = time.perf_counter()
        cpu = cpu_info()
        measured, runners = [], []
        for candidate in candidates(("fp32", *reduced)):
            m = Measured(candidate, unavailable=unavailable(candidate, cpu))
            measured.append(m)
            if m.unavailable:
                say(f"{candidate.name}: not measured: {m.unavailable}")
                continue
            if candidate == REFERENCE:
                runner, outputs = reference, fp32
            else:  # bf16 runs model.onnx
                runner = make_runner(candidate, work / candidate.file, opts.cpu_threads)
                outputs = run_all(runner, gate_images)
            m.gate = gates[candidate.name] = check(candidate.name, outputs)
            runners.append((m, runner))
        for precision in reduced:
            ran = [m for m in measured if m.candidate.precision == precision and m.unavailable is None]
            if (
                ran
                and not any(m.passed for m in ran)
                and _refuse_or_keep(precision, ran[0].gate or {}, opts, files)
            ):
                for m in ran:
                    m.forced = True
        if "int8" in precision_meta:
            precision_meta["int8"]["written"] = "int8" in files
            precision_meta["int8"]["gate"] = {
                m.candidate.name: m.gate for m in measured if m.candidate.precision == "int8"
            }
        # Every candidate that ran, timed taking turns (after the gate: a refused export stops before this).
        turn_s = opts.time_s / TURN_ROUNDS
        rates = time_taking_turns([r for _, r in runners], gate_images, TIMED_BATCHES, TURN_ROUNDS, turn_s)
        for (m, _), rate in zip(runners, rates, strict=True):
            m.throughput_ips = rate
        del runners
        chosen, why = choose(measured)
        seconds["cpu_candidates"] = time.perf_counter() - clock
        say(
            candidates_table(
                measured,
                f"CPU candidates on {cpu.model} ({opts.cpu_threads} threads); "
                f"serving {chosen.candidate.name}: {why}",
            )
        )

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
                "versions": {
                    "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__,
                    "openvino": cpu.openvino,
                },
                "opset": OPSET,
                "files": {p: {"file": f.name, "bytes": f.stat().st_size} for p, f in files.items()},
                "photos": photos.describe(),
                "parity": {
                    "reference": "pytorch",
                    "candidate": "onnxruntime-fp32",
                    "tolerance_abs": opts.parity_atol,
                    "images": len(eval_images),
                    "source": photos.gate.source,
                    "attributes": [r.to_dict() for r in parity],
                },
                "precisions": precision_meta,
                "cpu": {
                    "host": cpu.to_dict(),
                    "threads": opts.cpu_threads,
                    "timing": {
                        "batches": list(TIMED_BATCHES),
                        "rounds": TURN_ROUNDS,
                        "seconds_per_turn": turn_s,
                    },
                    "candidates": [m.to_dict() for m in measured],
                    "chosen": {**chosen.to_dict(), "why": why},
                },
            },
            precision=chosen.candidate.precision,
            runtime=chosen.candidate.runtime,
        )
        serving = ServingConfig(max_batch_size=opts.max_batch_size, cpu_threads=opts.cpu_threads)
        # The NGC image's openvino backend (Helm CPU profile): the OpenVINO candidate `choose` would serve.
        openvino = [m for m in measured if m.candidate.runtime == "openvino"]
        ngc_openvino = choose(openvino)[0] if any(m.passed for m in openvino) else None
        version_dir = write_model_version(
            opts.repository,
            opts.name,
            schema=schema,
            image_size=pre.image_size,
            model_files=files,
            metadata=metadata,
            warmup_image=gate_images[0],
            serving=serving,
            version=opts.version,
            cpu=CpuServing(
                chosen.candidate,
                [m.candidate for m in measured if m.passed or m.forced],
                ngc_openvino.candidate if ngc_openvino else None,
            ),
        )
    version = int(version_dir.name)
    plans: dict[str, Path] = {}
    for precision in wants_trt:
        base = precision.removeprefix("trt-")
        plans[precision] = _build_trt(opts, version_dir, base, pre.image_size)
    files = {p: version_dir / f.name for p, f in files.items()}
    say(f"wrote {version_dir} ({', '.join(f.name for f in files.values())}) in {sum(seconds.values()):.1f} s")
    return ExportResult(version_dir, version, parity, gates, files, measured, chosen, plans, seconds)


def _refuse_or_keep(precision: str, doc: dict[str, Any], opts: ExportOptions, files: dict[str, Path]) -> bool:
    """A variant that failed the gate: stop (PrecisionError), leave it out (auto), or keep it (--force).

    Returns True when it is kept although it failed."""
    if doc.get("passed", False):
        return False
    if opts.force:
        return True
    failed = [r["attribute"] for r in doc.get("attributes", []) if not r["passed"]]
    message = f"{precision} fails the accuracy gate on {', '.join(failed)} ({doc.get('rule', '')})"
    if opts.skip_refused:
        files.pop(precision, None)
        return False
    raise PrecisionError(
        f"{message}; nothing was written. Calibrate on more representative photos (--calibration-data), "
        "keep sensitive nodes in FP32 (--int8-keep), or pass --force to write it anyway"
    )


def _version(package: str) -> str:

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def candidates_table(measured: Sequence[Measured], title: str) -> str:

    rows = []
    for m in measured:
        ips = " / ".join(f"{m.throughput_ips[b]:.0f}" for b in TIMED_BATCHES if b in m.throughput_ips)
        verdict = m.unavailable or ("passed" if m.passed else ("forced" if m.forced else "refused"))
        rows.append((m.candidate.runtime, m.candidate.precision, m.candidate.file, ips or "-", verdict))
    body = table(
        ["runtime", "precision", "file", f"img/s at batch {' / '.join(map(str, TIMED_BATCHES))}", "gate"],
        rows,
    )
    return f"{title}\n{body}"


def _build_trt(opts: ExportOptions, version_dir: Path, precision: str, image_size: int) -> Path:

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
