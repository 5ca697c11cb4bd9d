"""CPU runtimes × precisions as measured choices: what this CPU can run, how fast, and which one to serve.

A *candidate* is one runtime running one file of the version at one precision:

=============  =========  ==================  ===================================================
runtime        precision  file                available when
=============  =========  ==================  ===================================================
onnxruntime    fp32       model.onnx          always (the reference every other one is gated on)
openvino       fp32       model.onnx          ``openvino`` is installed
openvino       bf16       model.onnx          … and the CPU has BF16 (AMX or AVX512-BF16)
onnxruntime    int8       model.int8.onnx     INT8 was exported (Q/DQ from NNCF)
openvino       int8       model.int8.onnx     … and ``openvino`` is installed
=============  =========  ==================  ===================================================

BF16 is a property of the CPU, not of the file: OpenVINO runs ``model.onnx`` with
``INFERENCE_PRECISION_HINT=bf16``. Where the CPU lacks BF16 OpenVINO would silently run FP32 under that
name, so the candidate is reported unavailable instead (``cpu_info``).

Each available candidate is gated on real photos (``export.parity.gate``) and timed here, on the machine
that exports, at batch 1 and 8, all candidates taking turns (``time_taking_turns``: timed one after the
other on a shared VM, they drift more than they differ); ``choose`` serves the fastest that passed. The
Triton python backend builds the same session:
``session_settings`` writes the parameters ``export/triton_python_model.py`` builds it from (runtime, file,
precision hint, threads), so the timing is of what serves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ExportError

Runner = Callable[[np.ndarray], list[np.ndarray]]
RUNTIMES = ("onnxruntime", "openvino")
FILES = {"fp32": "model.onnx", "bf16": "model.onnx", "int8": "model.int8.onnx"}
OPENVINO_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # INT8 comes from the graph's Q/DQ nodes
TIMED_BATCHES = (1, 8)
TURN_ROUNDS = 3  # rounds in which the candidates are timed, taking turns


@dataclass(frozen=True)
class CpuInfo:
    """What the exporting CPU offers: its name, the ISA flags that matter, OpenVINO's own view."""

    model: str
    flags: tuple[str, ...]  # of interest: avx2, avx512f, avx512_bf16, amx_bf16, amx_int8, avx512_vnni…
    openvino: str | None  # version, None when not installed
    openvino_capabilities: tuple[str, ...]

    @property
    def bf16(self) -> bool:
        return "BF16" in self.openvino_capabilities

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bf16": self.bf16}


_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile", "avx_vnni")


def cpu_info() -> CpuInfo:
    model, flags = "unknown", set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    try:
        import openvino

        version = openvino.__version__
        caps = tuple(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except ImportError:
        version, caps = None, ()
    return CpuInfo(model, tuple(f for f in _FLAGS if f in flags), version, caps)


@dataclass(frozen=True)
class Candidate:
    runtime: str
    precision: str

    @property
    def name(self) -> str:
        return f"{self.runtime}-{self.precision}"

    @property
    def file(self) -> str:
        return FILES[self.precision]

    @property
    def config_name(self) -> str:
        """``configs/cpu_<runtime>_<precision>.pbtxt`` in the model folder."""
        return f"cpu_{self.runtime}_{self.precision}"


REFERENCE = Candidate("onnxruntime", "fp32")


def candidates(precisions: Sequence[str]) -> list[Candidate]:
    """The CPU candidates for the exported ``precisions`` (fp16 and TensorRT are GPU-only)."""
    out = [REFERENCE, Candidate("openvino", "fp32")]
    if "bf16" in precisions:
        out.append(Candidate("openvino", "bf16"))
    if "int8" in precisions:
        out += [Candidate("onnxruntime", "int8"), Candidate("openvino", "int8")]
    return out


def unavailable(candidate: Candidate, cpu: CpuInfo) -> str | None:
    """Why ``candidate`` cannot run here, or None."""
    if candidate.runtime == "openvino" and cpu.openvino is None:
        return "openvino is not installed (pip install 'fashion-tagger[export]' or pip install openvino)"
    if candidate.precision == "bf16" and not cpu.bf16:
        return (
            f"this CPU ({cpu.model}) has no BF16: OpenVINO reports {', '.join(cpu.openvino_capabilities)}; "
            "BF16 needs AMX or AVX512-BF16 (e.g. a 4th-generation Xeon)"
        )
    return None


def session_settings(candidate: Candidate, threads: int) -> dict[str, str]:
    """The python backend's parameters for ``candidate`` (also what ``make_runner`` uses here)."""
    return {
        "runtime": candidate.runtime,
        "model_filename": candidate.file,
        "precision": candidate.precision,
        "inference_precision": OPENVINO_HINT[candidate.precision] if candidate.runtime == "openvino" else "",
        "intra_op_threads": str(threads),
    }


def make_runner(candidate: Candidate, path: str | Path, threads: int) -> Runner:
    """A callable running ``path`` on uint8 NHWC batches, outputs in graph order."""
    if candidate.runtime == "onnxruntime":
        from export.onnx_export import INPUT_NAME, session  # lazy: it imports torch; runners need none

        sess = session(path, threads)
        return lambda batch: list(sess.run(None, {INPUT_NAME: batch}))
    if candidate.runtime == "openvino":
        try:
            import openvino
        except ImportError as e:
            raise ExportError("OpenVINO is not installed: pip install openvino") from e
        compiled = openvino.Core().compile_model(
            str(path),
            "CPU",
            {
                "INFERENCE_NUM_THREADS": str(threads),
                "INFERENCE_PRECISION_HINT": OPENVINO_HINT[candidate.precision],
                "PERFORMANCE_HINT": "LATENCY",
            },
        )
        request = compiled.create_infer_request()
        outputs = list(compiled.outputs)

        def run(batch: np.ndarray) -> list[np.ndarray]:
            result = request.infer({0: batch})
            return [np.asarray(result[o], dtype=np.float32) for o in outputs]

        return run
    raise ExportError(f"unknown runtime {candidate.runtime!r}; choose from {', '.join(RUNTIMES)}")


def run_all(runner: Runner, images: np.ndarray, batch_size: int = 32) -> list[np.ndarray]:
    """``runner`` over ``images`` in batches; outputs concatenated per tensor."""
    chunks = [runner(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return [np.concatenate(c) for c in zip(*chunks, strict=True)]


def time_taking_turns(
    runners: Sequence[Runner], images: np.ndarray, batches: Sequence[int], rounds: int, seconds: float
) -> list[dict[int, float]]:
    """Images/s of each runner at each of ``batches``: the median of ``rounds`` rounds in which the
    runners take turns (the order rotates every round), ``seconds`` per runner, batch and round.

    Timed one after the other, candidates a few percent apart swap places from run to run: this VM's speed
    drifts by tens of percent within minutes (model_repository/README.md). Taking turns puts every
    candidate through the same drift, so their ranking holds where separate timings disagree."""
    per: list[dict[int, list[float]]] = [{b: [] for b in batches} for _ in runners]
    for r in range(rounds):
        for k in range(len(runners)):
            i = (k + r) % len(runners)
            for b in batches:
                per[i][b].append(time_runner(runners[i], images, b, seconds))
    return [{b: float(np.median(v)) for b, v in rates.items()} for rates in per]


def time_runner(runner: Runner, images: np.ndarray, batch: int, seconds: float) -> float:
    """Images per second of ``runner`` at ``batch``, one caller, after one warm-up call."""
    x = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))
    runner(x)
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or done == 0:
        runner(x)
        done += batch
    return done / elapsed if elapsed > 0 else float("inf")


@dataclass
class Measured:
    """One candidate's timing, gate and verdict (recorded in ``metadata.json`` under ``export.cpu``)."""

    candidate: Candidate
    unavailable: str | None = None
    throughput_ips: dict[int, float] = field(default_factory=dict)  # batch -> images/s (time_taking_turns)
    gate: dict[str, Any] | None = None  # export.parity.gate's document
    forced: bool = False

    @property
    def passed(self) -> bool:
        return self.unavailable is None and self.gate is not None and bool(self.gate["passed"])

    @property
    def best_batch(self) -> int | None:
        return max(self.throughput_ips, key=self.throughput_ips.__getitem__) if self.throughput_ips else None

    @property
    def best_ips(self) -> float:
        return max(self.throughput_ips.values(), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.candidate.runtime,
            "precision": self.candidate.precision,
            "file": self.candidate.file,
            "config": f"configs/{self.candidate.config_name}.pbtxt" if self.passed or self.forced else None,
            "unavailable": self.unavailable,
            "throughput_ips": {str(b): round(v, 1) for b, v in sorted(self.throughput_ips.items())},
            "best_batch": self.best_batch,
            "passed_gate": self.passed,
            "forced": self.forced,
            "gate": self.gate,
        }


def choose(measured: Sequence[Measured]) -> tuple[Measured, str]:
    """The fastest candidate (best batch) that passed the gate, and why, in words."""
    passed = sorted((m for m in measured if m.passed), key=lambda m: -m.best_ips)
    if not passed:
        raise ExportError("no CPU candidate passed the accuracy gate, not even ONNX Runtime FP32")
    best = passed[0]
    others = ", ".join(f"{m.candidate.name} {m.best_ips:.0f}" for m in passed[1:])
    refused = [m.candidate.name for m in measured if m.unavailable is None and not m.passed]
    why = (
        f"fastest that passed the accuracy gate: {best.best_ips:.0f} img/s at batch {best.best_batch}, "
        f"the candidates taking turns over {TURN_ROUNDS} rounds"
        + (f" (then {others})" if others else "")
        + (f"; refused by the gate: {', '.join(refused)}" if refused else "")
    )
    return best, why
