"""``export_checkpoint``: checkpoint → checked ONNX (+ FP16/INT8/TensorRT) → a new model repository version.

A short sequence of typed steps, each a function from dataclasses to a dataclass that can be run and
tested alone:

``load`` → ``pick_photos`` → ``export_fp32`` (ONNX, ``onnx.checker``, parity with PyTorch or
``ParityError``) → ``make_variants`` (FP16, INT8 by NNCF) → ``gate_variants`` (every CPU candidate and the
FP16 file against ONNX Runtime FP32 on the gate photos, ``export.parity.gate``; then the one refusal
policy, ``decide``) → ``rank`` (the candidates that ran, timed taking turns; ``choose`` serves the fastest
that passed) → ``build_record`` (``fashion.metadata.ExportRecord``) → ``publish`` (an atomic new version
whose ``configs/cpu.pbtxt`` carries the chosen candidate's session spec) → ``build_trt_plans`` (where a
GPU and TensorRT exist).

The refusal policy (``Refusal``) is resolved once from the options and is the same for every precision:
a variant that fails the gate — or that cannot be checked, having no real photos — stops the export
(``REFUSE``, the default), is left out (``LEAVE_OUT``, ``--precision auto``) or is written but never served
(``FORCE``, ``--force``; nothing unchecked is ever written).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import yaml

from export.errors import ExportError, ParityError, PrecisionError
from export.images import ExportImages, GateBatch, ImageSet, export_images
from export.onnx_export import OPSET, export_onnx, run_torch
from export.parity import (
    FP32_ATOL,
    GATE_MAX_ACCURACY_DROP,
    GATE_MAX_MEAN_CONFIDENCE_DELTA,
    GATE_MIN_AGREEMENT,
    GateRule,
    TitleGate,
    agreement_table,
    compare,
    gate,
    gate_table,
    heads_and_conflict,
)
from export.precision import count_ops, to_fp16, to_int8
from export.repository import CpuServing, ServingConfig, write_model_version, write_trt_model
from export.runtimes import (
    TIMED_BATCHES,
    TURN_ROUNDS,
    candidates,
    choose,
    cpu_info,
    run_all,
    time_taking_turns,
    unavailable,
)
from export.sessions import Session, SessionSpec, open_session
from export.tensorrt import build_plan, require_tensorrt
from fashion.console import emit, table
from fashion.metadata import (
    CandidateRecord,
    CpuRecord,
    ExportRecord,
    FileRecord,
    GateVerdict,
    HostRecord,
    ParityRecord,
    ParityRow,
    Quantisation,
    TimingRecord,
    TitleSpec,
    TrainingRecord,
    VariantRecord,
    build_metadata,
    file_sha256,
)
from fashion.text import has_title
from training.checkpoint import Checkpoint, load_checkpoint, weights_digest

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "trt-fp16", "trt-int8")
# ``auto``: every CPU precision this machine may serve; a variant that fails the gate is left out (not an
# error), and the fastest that passes is served. What ``fashion serve`` exports when real photos exist.
AUTO = ("fp32", "bf16", "int8")
REDUCED = ("fp16", "bf16", "int8")  # the precisions the gate can refuse
Say = Callable[[str], None]


def parse_precisions(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"fp16,int8"`` → ``("fp32", "fp16", "int8")``; FP32 is always exported, ``trt-X`` implies ``X``."""
    items = [x.strip() for x in text.split(",")] if isinstance(text, str) else [x.strip() for x in text]
    items = [x for x in items if x]
    if "auto" in items:
        items = [*(x for x in items if x != "auto"), *AUTO]
    unknown = [x for x in items if x not in PRECISIONS]
    if unknown:
        raise ExportError(f"unknown precision {unknown[0]!r}; choose from auto, {', '.join(PRECISIONS)}")
    wanted = {"fp32", *items, *(x.removeprefix("trt-") for x in items if x.startswith("trt-"))}
    return tuple(p for p in PRECISIONS if p in wanted)


class Refusal(Enum):
    """What happens to a variant the gate does not pass (the same for every precision)."""

    REFUSE = "refuse"  # the export stops with PrecisionError (ExportError without real photos)
    LEAVE_OUT = "leave out"  # --precision auto: the variant is left out and the export goes on
    FORCE = "force"  # --force: written, recorded as forced, never served


def resolve_refusal(precisions: str | Sequence[str], force: bool) -> Refusal:
    """``--force`` wins; ``auto`` among the precisions (a string or a sequence) leaves out; else refuse."""
    if force:
        return Refusal.FORCE
    items = precisions.split(",") if isinstance(precisions, str) else list(precisions)
    return Refusal.LEAVE_OUT if "auto" in (x.strip() for x in items) else Refusal.REFUSE


@dataclass(frozen=True)
class ExportOptions:
    """What ``fashion export`` does; checked on construction."""

    checkpoint: Path
    repository: Path = Path("model_repository")
    name: str = "fashion"
    version: int | None = None
    precisions: tuple[str, ...] = ("fp32",)
    calibration_data: Path | None = None
    synthetic_calibration: bool = False  # calibrate and gate on synthetic renders when no real photos exist
    int8_keep: tuple[str, ...] = ()  # node names kept out of INT8 besides the built-in exclusions
    max_batch_size: int = 32
    force: bool = False
    parity_atol: float = FP32_ATOL
    min_agreement: float = GATE_MIN_AGREEMENT  # per attribute, FP32 vs variant, near-ties excluded
    max_accuracy_drop: float = GATE_MAX_ACCURACY_DROP  # per attribute, against the labels
    max_confidence_delta: float = GATE_MAX_MEAN_CONFIDENCE_DELTA  # per attribute, mean |Δ top-1 confidence|
    calibration_images: int = 300
    gate_images: int = 500
    eval_images: int = 64  # of the gate photos, for the PyTorch vs ONNX Runtime parity
    cpu_threads: int = 2
    time_s: float = 1.5  # timing per candidate and batch size, over the rounds taking turns
    # Resolved from ``precisions`` and ``force`` when not given (``resolve_refusal``).
    refusal: Refusal | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoint", Path(self.checkpoint))
        object.__setattr__(self, "repository", Path(self.repository))
        if self.refusal is None:
            object.__setattr__(self, "refusal", resolve_refusal(self.precisions, self.force))
        object.__setattr__(self, "precisions", parse_precisions(self.precisions))
        object.__setattr__(self, "int8_keep", tuple(self.int8_keep))
        if self.calibration_data is not None:
            object.__setattr__(self, "calibration_data", Path(self.calibration_data))
        if not 0 <= self.min_agreement <= 1:
            raise ExportError(f"min_agreement must be between 0 and 1, got {self.min_agreement}")
        for name in ("max_accuracy_drop", "max_confidence_delta"):
            if not 0 <= getattr(self, name) <= 1:
                raise ExportError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.calibration_images < 1 or self.eval_images < 1 or self.gate_images < 2:
            raise ExportError("calibration_images and eval_images must be at least 1, gate_images at least 2")
        if self.parity_atol <= 0:
            raise ExportError("parity_atol must be positive")
        if self.time_s <= 0 or self.cpu_threads < 1:
            raise ExportError("time_s and cpu_threads must be positive")
        ServingConfig(max_batch_size=self.max_batch_size)  # validates the batch size early

    @property
    def gate_rule(self) -> GateRule:
        return GateRule(
            min_agreement=self.min_agreement,
            max_accuracy_drop=self.max_accuracy_drop,
            max_mean_confidence_delta=self.max_confidence_delta,
        )

    @property
    def reference(self) -> SessionSpec:
        """ONNX Runtime FP32 with the export's threads: what parity and every gate compare against."""
        return SessionSpec("onnxruntime", "fp32", self.cpu_threads)


EXPORT_SETTINGS = "export.yaml"  # next to a checkpoint: export settings that belong to that model
SHIPPED_PHOTOS = "photos"  # beside a checkpoint: real validation photos shipped with it (export/images.py)


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


# ------------------------------------------------------------------------------------ the step values
@dataclass(frozen=True)
class Loaded:
    checkpoint: Checkpoint
    sha256: str  # of the checkpoint file: which checkpoint a version was exported from
    path: Path  # the file, resolved


@dataclass(frozen=True)
class PhotoPlan:
    """The photos, and the reduced CPU precisions (bf16, int8) that can be made and gated with them."""

    photos: ExportImages
    reduced: tuple[str, ...]


@dataclass(frozen=True)
class Fp32Export:
    """The checked FP32 ONNX file, its parity with PyTorch, and ONNX Runtime's outputs on the gate's inputs
    (``ExportImages.gate_batch``: a title model's photos with and without their titles)."""

    path: Path
    reference: Session
    outputs: tuple[np.ndarray, ...]
    parity: ParityRecord
    batch: GateBatch


@dataclass(frozen=True)
class Variants:
    """Every file made (``fp32`` always) and, with INT8, how it was quantised."""

    files: Mapping[str, Path]  # precision -> file
    quantisation: Quantisation | None = None

    def path(self, spec: SessionSpec) -> Path:
        """The file ``spec`` runs (BF16 runs the FP32 file)."""
        return next(p for p in self.files.values() if p.name == spec.file)


@dataclass(frozen=True)
class GateSubject:
    """What the gate checks: a CPU candidate, or a GPU variant (FP16) as ONNX Runtime's CPU runs it."""

    spec: SessionSpec
    name: str
    candidate: bool = True  # a CPU candidate: timed, and may be served


@dataclass(frozen=True)
class Gated:
    subject: GateSubject
    verdict: GateVerdict | None  # None: it could not run here
    unavailable: str | None = None
    session: Session | None = None  # kept for the timing (CPU candidates that ran)


@dataclass(frozen=True)
class Decision:
    """The refusal policy applied: which precisions are written, which of them only by ``--force``."""

    written: frozenset[str]
    forced: frozenset[str] = frozenset()


@dataclass(frozen=True)
class GateResult:
    host: HostRecord
    gated: tuple[Gated, ...]
    decision: Decision

    def verdicts(self) -> dict[str, GateVerdict]:
        return {g.subject.name: g.verdict for g in self.gated if g.verdict is not None}


@dataclass(frozen=True)
class Ranking:
    """Every CPU candidate with its gate and timing, the chosen one, and the spec each was timed with."""

    candidates: tuple[CandidateRecord, ...]
    chosen: CandidateRecord
    why: str
    timed: Mapping[str, SessionSpec]  # candidate name -> the spec of the session the timer ran


@dataclass
class ExportResult:
    version_dir: Path
    version: int
    parity: tuple[ParityRow, ...]
    gates: dict[str, GateVerdict]  # variant or candidate name -> its verdict
    files: dict[str, Path]
    cpu: tuple[CandidateRecord, ...]
    chosen: CandidateRecord
    record: ExportRecord
    timed: Mapping[str, SessionSpec]
    plans: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ the steps
def load(opts: ExportOptions) -> Loaded:
    path = Path(opts.checkpoint)
    return Loaded(load_checkpoint(path), file_sha256(path), path.resolve())


def shipped_photos(checkpoint: Path) -> Path | None:
    """``photos/`` beside the checkpoint when it holds a catalogue (the shipped model's validation photos)."""
    folder = checkpoint.parent / SHIPPED_PHOTOS
    return folder if (folder / "styles.csv").is_file() else None  # the Kaggle layout the script writes


def pick_photos(opts: ExportOptions, loaded: Loaded, say: Say) -> PhotoPlan:
    """The gate and calibration photos; without real ones the reduced CPU precisions are refused (or
    left out under ``LEAVE_OUT``) unless synthetic calibration was asked for."""
    ckpt = loaded.checkpoint
    reduced = tuple(p for p in ("bf16", "int8") if p in opts.precisions)
    photos = export_images(
        ckpt,
        gate_count=max(opts.gate_images, opts.eval_images),
        calibration_count=opts.calibration_images if "int8" in opts.precisions else 0,
        data=opts.calibration_data,
        shipped=shipped_photos(opts.checkpoint),
        synthetic_calibration=opts.synthetic_calibration,
        seed=ckpt.config.get("seed", 0),
    )
    if reduced and not photos.real and not opts.synthetic_calibration:
        message = (
            f"{' and '.join(reduced)} must be calibrated and checked on real photos, and none are here "
            f"({photos.gate.source}). Pass --calibration-data DIR (any `fashion train` layout), or "
            "--synthetic-calibration to use synthetic renders (recorded in metadata.json)"
        )
        if opts.refusal is not Refusal.LEAVE_OUT:
            raise ExportError(message)
        say(f"note: {message}; exporting FP32 only")
        reduced = ()
    return PhotoPlan(photos, reduced)


def export_fp32(opts: ExportOptions, loaded: Loaded, plan: PhotoPlan, work: Path, say: Say) -> Fp32Export:
    """The FP32 ONNX file, checked against PyTorch on the first ``eval_images`` gate photos — for a model
    that reads titles, with their titles (probabilities and conflict scores) and without (all-zero ids)."""
    ckpt, photos = loaded.checkpoint, plan.photos
    path = export_onnx(ckpt.model, work / "model.onnx")
    reference = open_session(opts.reference, path)
    parity = check_parity(opts, ckpt, reference, photos.gate.head(opts.eval_images), say)
    batch = photos.gate_batch()
    outputs = run_all(reference, batch.images, titles=batch.titles)
    return Fp32Export(path, reference, tuple(outputs), parity, batch)


def check_parity(
    opts: ExportOptions, ckpt: Checkpoint, session: Session, photos: ImageSet, say: Say
) -> ParityRecord:
    """PyTorch against ``session`` on ``photos`` (with their titles, and without, for a title model);
    ``ParityError`` beyond ``parity_atol``."""
    images, titles = photos.images, photos.titles
    torch_out, ort_out = run_torch(ckpt.model, images, titles), run_all(session, images, titles=titles)
    heads, conflict = heads_and_conflict(ckpt.schema, torch_out)
    ort_heads, ort_conflict = heads_and_conflict(ckpt.schema, ort_out)
    rows = compare(ckpt.schema, heads, ort_heads)
    with_titles = "" if titles is None else f", {int(has_title(titles).sum())} with their titles"
    header = (
        f"parity: PyTorch vs ONNX Runtime FP32 ({photos.source}, {len(images)} images{with_titles}; "
        f"tolerance max |Δp| ≤ {opts.parity_atol:g})"
    )
    say(agreement_table(rows, header))
    record = ParityRecord(opts.parity_atol, len(images), photos.source, tuple(rows))
    if titles is not None and conflict is not None and ort_conflict is not None:
        plain_torch = heads_and_conflict(ckpt.schema, run_torch(ckpt.model, images))[0]
        plain = compare(
            ckpt.schema, plain_torch, heads_and_conflict(ckpt.schema, run_all(session, images))[0]
        )
        say(agreement_table(plain, "the same photos without titles (all-zero title ids)"))
        delta = float(np.abs(conflict.astype(np.float64) - ort_conflict).max()) if conflict.size else 0.0
        say(f"conflict scores: max |Δ| {delta:.2e}")
        record = replace(record, without_title=tuple(plain), conflict_max_abs_diff=delta)
    if record.max_abs_diff > opts.parity_atol:
        raise ParityError(
            f"ONNX Runtime differs from PyTorch by up to {record.max_abs_diff:.3g} "
            f"(tolerance {opts.parity_atol:g}); nothing was written"
        )
    return record


def make_variants(opts: ExportOptions, plan: PhotoPlan, fp32: Fp32Export, work: Path, say: Say) -> Variants:
    """FP16 (when asked) and INT8 (when asked and calibratable), next to the FP32 file."""
    import onnx

    files = {"fp32": fp32.path}
    if "fp16" in opts.precisions:
        files["fp16"] = to_fp16(fp32.path, work / "model.fp16.onnx")
    calibration = plan.photos.calibration
    if "int8" not in plan.reduced or calibration is None:
        return Variants(files)
    keep, keep_source = int8_keep(opts)
    if keep_source is not None:
        say(f"int8: keeping {', '.join(keep)} in FP32 ({keep_source})")
    files["int8"], excluded = to_int8(
        fp32.path, work / "model.int8.onnx", calibration.images, keep, titles=calibration.titles
    )
    quantisation = Quantisation(
        quantiser=f"nncf {_version('nncf')} post-training quantisation, PERFORMANCE preset "
        "(symmetric, per-channel weights)",
        calibration=calibration.record(),
        excluded_nodes={reason: tuple(nodes) for reason, nodes in excluded.items()},
        keep_patterns=tuple(keep),
        keep_from=keep_source,
        quantize_linear_nodes=count_ops(onnx.load(files["int8"]), "QuantizeLinear"),
    )
    return Variants(files, quantisation)


def gate_subjects(opts: ExportOptions, plan: PhotoPlan, variants: Variants) -> list[GateSubject]:
    """The FP16 file (a GPU precision, checked as ONNX Runtime's CPU runs it) and every CPU candidate."""
    out = []
    if "fp16" in variants.files:
        out.append(GateSubject(SessionSpec("onnxruntime", "fp16", opts.cpu_threads), "fp16", candidate=False))
    specs = candidates(("fp32", *plan.reduced), opts.cpu_threads)
    return out + [GateSubject(spec, spec.name) for spec in specs]


def gate_variants(
    opts: ExportOptions,
    loaded: Loaded,
    plan: PhotoPlan,
    fp32: Fp32Export,
    variants: Variants,
    say: Say,
    host: HostRecord | None = None,
) -> GateResult:
    """Every subject against ONNX Runtime FP32 on the gate photos, then the refusal policy. ``host`` is
    the CPU the candidates' availability is judged on (default: this one, ``cpu_info``)."""
    ckpt, photos, host = loaded.checkpoint, plan.photos, host or cpu_info()
    batch = fp32.batch
    titled = batch.titled
    title = None if titled is None else TitleGate(titled, ckpt.conflict_thresholds)
    where = photos.gate.source + ("" if titled is None else ", each photo with its title and without")
    gated = []
    for subject in gate_subjects(opts, plan, variants):
        why = unavailable(subject.spec, host) if subject.candidate else None
        if why is not None:
            say(f"{subject.name}: not measured: {why}")
            gated.append(Gated(subject, None, why))
            continue
        same = subject.spec == fp32.reference.spec
        session = fp32.reference if same else open_session(subject.spec, variants.path(subject.spec))
        outputs = fp32.outputs if same else run_all(session, batch.images, titles=batch.titles)
        verdict = gate(
            ckpt.schema, fp32.outputs, outputs, batch.labels, ckpt.thresholds, opts.gate_rule, title
        )
        say(gate_table(verdict, f"{subject.name} vs ONNX Runtime FP32 on {where}: {verdict.rule}"))
        gated.append(Gated(subject, verdict, None, session if subject.candidate else None))
    decision = decide(tuple(gated), tuple(variants.files), opts.refusal or Refusal.REFUSE, say)
    return GateResult(host, tuple(gated), decision)


def decide(gated: Sequence[Gated], made: Sequence[str], refusal: Refusal, say: Say) -> Decision:
    """The refusal policy, once for every precision: a precision none of whose subjects that ran passed
    stops the export (``REFUSE``), is left out (``LEAVE_OUT``) or is written as forced (``FORCE``)."""
    left_out, forced = set(), set()
    for precision in REDUCED:
        ran = [g.verdict for g in gated if g.subject.spec.precision == precision and g.verdict is not None]
        if not ran or any(v.passed for v in ran):
            continue
        verdict = ran[0]
        message = f"{precision} fails the accuracy gate on {', '.join(verdict.failed)} ({verdict.rule})"
        if refusal is Refusal.REFUSE:
            raise PrecisionError(
                f"{message}; nothing was written. Calibrate on more representative photos "
                "(--calibration-data), keep sensitive nodes in FP32 (--int8-keep), or pass --force to "
                "write it anyway"
            )
        if refusal is Refusal.LEAVE_OUT:
            say(f"{message}: left out")
            left_out.add(precision)
        else:
            say(f"{message}: written anyway (--force), never served")
            forced.add(precision)
    return Decision(frozenset(set(made) - left_out), frozenset(forced))


def rank(opts: ExportOptions, gates: GateResult, plan: PhotoPlan, say: Say) -> Ranking:
    """Every CPU candidate that ran, timed taking turns (after the gate: a refused export stops before
    this); the fastest that passed is chosen."""
    ran = [g for g in gates.gated if g.session is not None]
    turn_s = opts.time_s / TURN_ROUNDS
    sessions = [g.session for g in ran if g.session is not None]
    rates = time_taking_turns(sessions, plan.photos.gate.images, TIMED_BATCHES, TURN_ROUNDS, turn_s)
    # Rounded as metadata.json records them, so that the record read back equals this one.
    by_name = {
        s.spec.name: {b: round(v, 1) for b, v in r.items()} for s, r in zip(sessions, rates, strict=True)
    }
    records = tuple(
        CandidateRecord(
            runtime=g.subject.spec.runtime,
            precision=g.subject.spec.precision,
            file=g.subject.spec.file,
            config_name=g.subject.spec.config_name,
            unavailable=g.unavailable,
            throughput_ips=by_name.get(g.subject.name, {}),
            gate=g.verdict,
            forced=g.verdict is not None and g.subject.spec.precision in gates.decision.forced,
        )
        for g in gates.gated
        if g.subject.candidate
    )
    chosen, why = choose(records)
    title = f"CPU candidates on {gates.host.model} ({opts.cpu_threads} threads); serving {chosen.name}: {why}"
    say(candidates_table(records, title))
    return Ranking(records, chosen, why, {s.spec.name: s.spec for s in sessions})


def build_record(
    opts: ExportOptions,
    loaded: Loaded,
    plan: PhotoPlan,
    fp32: Fp32Export,
    variants: Variants,
    gates: GateResult,
    ranking: Ranking,
) -> ExportRecord:
    """What this export measured and chose, as ``metadata.json`` records it."""
    import onnxruntime
    import torch

    ckpt, verdicts = loaded.checkpoint, gates.verdicts()
    written = {p: f for p, f in variants.files.items() if p in gates.decision.written}
    reduced_files = [p for p in variants.files if p != "fp32"]
    return ExportRecord(
        training=TrainingRecord(
            checkpoint_sha256=loaded.sha256,
            checkpoint_path=str(loaded.path),
            weights_sha256=weights_digest(ckpt.model),
            run_config=ckpt.config,
            epoch=ckpt.epoch,
            val_score=ckpt.val_score,
            val_metrics=ckpt.val_metrics,
            # The gate that flags unseen product types (training.novelty); inside model.onnx.
            novelty=ckpt.model.novelty.describe() if ckpt.model.novelty is not None else None,
        ),
        versions={
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "openvino": gates.host.openvino,
        },
        opset=OPSET,
        files=tuple(FileRecord(p, f.name, f.stat().st_size) for p, f in written.items()),
        photos=plan.photos.record(),
        parity=fp32.parity,
        variants=tuple(
            VariantRecord(
                precision=p,
                file=variants.files[p].name,
                gates={n: v for n, v in verdicts.items() if _precision_of(n, gates) == p},
                written=p in gates.decision.written,
                forced=p in gates.decision.forced,
                quantisation=variants.quantisation if p == "int8" else None,
            )
            for p in reduced_files
        ),
        cpu=CpuRecord(
            host=gates.host,
            threads=opts.cpu_threads,
            timing=TimingRecord(TIMED_BATCHES, TURN_ROUNDS, opts.time_s / TURN_ROUNDS),
            candidates=ranking.candidates,
            chosen=ranking.chosen,
            why=ranking.why,
        ),
    )


def _precision_of(name: str, gates: GateResult) -> str:
    return next(g.subject.spec.precision for g in gates.gated if g.subject.name == name)


def publish(
    opts: ExportOptions,
    loaded: Loaded,
    plan: PhotoPlan,
    variants: Variants,
    ranking: Ranking,
    record: ExportRecord,
) -> Path:
    """A new version of the model: the written files, the metadata, and a config per served spec."""
    ckpt = loaded.checkpoint
    title = title_spec(ckpt)
    metadata = build_metadata(
        schema=ckpt.schema,
        preprocessing=ckpt.preprocessing,
        backbone=ckpt.backbone,
        temperatures=ckpt.temperatures(),
        thresholds=ckpt.thresholds,
        record=record,
        title=title,
    )
    chosen = ranking.timed[ranking.chosen.name]
    configured = [ranking.timed[c.name] for c in ranking.candidates if c.configured]
    # The NGC image's openvino backend (Helm CPU profile): the OpenVINO candidate `choose` would serve.
    openvino = [c for c in ranking.candidates if c.runtime == "openvino"]
    ngc = choose(openvino)[0] if any(c.passed for c in openvino) else None
    return write_model_version(
        opts.repository,
        opts.name,
        schema=ckpt.schema,
        image_size=ckpt.preprocessing.image_size,
        model_files={p: f for p, f in variants.files.items() if p in {r.precision for r in record.files}},
        metadata=metadata,
        warmup_image=plan.photos.gate.images[0],
        serving=ServingConfig(max_batch_size=opts.max_batch_size),
        version=opts.version,
        cpu=CpuServing(chosen, configured, None if ngc is None else ranking.timed[ngc.name]),
        title=title,
    )


def title_spec(ckpt: Checkpoint) -> TitleSpec | None:
    """The title input of a checkpoint that reads titles, as ``metadata.json`` declares it: its tokenizer
    and the conflict thresholds fitted in training (``Checkpoint.conflict_thresholds``)."""
    encoder = ckpt.model.title
    if encoder is None:
        return None
    thresholds = {a.name: ckpt.conflict_thresholds.get(a.name) for a in ckpt.schema.attributes}
    return TitleSpec(encoder.tokenizer, conflict_thresholds=thresholds)


def build_trt_plans(
    opts: ExportOptions, version_dir: Path, image_size: int, title_tokens: int | None = None
) -> dict[str, Path]:
    """A TensorRT plan per ``trt-X`` precision asked, from the version's ``X`` file (``title_tokens``: the
    title input's ``max_tokens`` of a model that reads titles)."""
    plans = {}
    for precision in (p for p in opts.precisions if p.startswith("trt-")):
        base = precision.removeprefix("trt-")
        name = f"{opts.name}_trt" if base == "fp16" else f"{opts.name}_trt_{base}"
        with tempfile.TemporaryDirectory(prefix="fashion-trt-") as tmp:
            plan = build_plan(
                version_dir / f"model.{base}.onnx",
                Path(tmp) / "model.plan",
                image_size=image_size,
                max_batch_size=opts.max_batch_size,
                timing_cache=opts.repository / ".trt_timing.cache",
                title_tokens=title_tokens,
            )
            out = write_trt_model(
                opts.repository,
                name,
                int(version_dir.name),
                plan,
                version_dir / "metadata.json",
                opts.max_batch_size,
            )
        plans[precision] = out / "model.plan"
    return plans


# ---------------------------------------------------------------------------------------- the sequence
T = TypeVar("T")


def _timed(seconds: dict[str, float], name: str, step: Callable[..., T], *args: Any) -> T:
    start = time.perf_counter()
    try:
        return step(*args)
    finally:
        seconds[name] = time.perf_counter() - start


def export_checkpoint(opts: ExportOptions, report: Say | None = None) -> ExportResult:
    """Run the whole export; ``report`` receives the tables (default: standard output)."""
    say, seconds = report or emit, dict[str, float]()
    if any(p.startswith("trt-") for p in opts.precisions):
        require_tensorrt()  # before minutes of work, not after
    loaded = _timed(seconds, "load", load, opts)
    plan = _timed(seconds, "photos", pick_photos, opts, loaded, say)
    with tempfile.TemporaryDirectory(prefix="fashion-export-") as tmp:
        work = Path(tmp)
        fp32 = _timed(seconds, "parity", export_fp32, opts, loaded, plan, work, say)
        variants = _timed(seconds, "variants", make_variants, opts, plan, fp32, work, say)
        gates = _timed(seconds, "gate", gate_variants, opts, loaded, plan, fp32, variants, say)
        ranking = _timed(seconds, "cpu_candidates", rank, opts, gates, plan, say)
        record = build_record(opts, loaded, plan, fp32, variants, gates, ranking)
        version_dir = publish(opts, loaded, plan, variants, ranking, record)
    title = loaded.checkpoint.model.title
    tokens = None if title is None else title.tokenizer.max_tokens
    plans = build_trt_plans(opts, version_dir, loaded.checkpoint.preprocessing.image_size, tokens)
    files = {f.precision: version_dir / f.file for f in record.files}
    say(f"wrote {version_dir} ({', '.join(f.file for f in record.files)}) in {sum(seconds.values()):.1f} s")
    return ExportResult(
        version_dir=version_dir,
        version=int(version_dir.name),
        parity=fp32.parity.attributes,
        gates=gates.verdicts(),
        files=files,
        cpu=ranking.candidates,
        chosen=ranking.chosen,
        record=record,
        timed=ranking.timed,
        plans=plans,
        seconds=seconds,
    )


def _version(package: str) -> str:

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def candidates_table(measured: Sequence[CandidateRecord], title: str) -> str:

    rows = []
    for m in measured:
        ips = " / ".join(f"{m.throughput_ips[b]:.0f}" for b in TIMED_BATCHES if b in m.throughput_ips)
        verdict = m.unavailable or ("passed" if m.passed else ("forced" if m.forced else "refused"))
        rows.append((m.runtime, m.precision, m.file, ips or "-", verdict))
    body = table(
        ["runtime", "precision", "file", f"img/s at batch {' / '.join(map(str, TIMED_BATCHES))}", "gate"],
        rows,
    )
    return f"{title}\n{body}"
