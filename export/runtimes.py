"""CPU runtimes × precisions as measured choices: what this CPU can run, how fast, and which one to serve.

A *candidate* is one runtime running one file of the version at one precision, described by its
``export.sessions.SessionSpec``:

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

Each available candidate is gated on the export's photos (``export.parity.gate``) and timed here, on the
machine that exports, at batch 1 and 8, all candidates taking turns (``time_taking_turns``: timed one
after the other on a shared VM, they drift more than they differ); ``choose`` serves the fastest that
passed. Every session here is built by ``export.sessions.open_session`` from the candidate's spec, the
spec the Triton config of the candidate carries: the timing is of what serves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from export.errors import ExportError
from export.sessions import SessionSpec
from fashion.metadata import CandidateRecord, HostRecord

Runner = Callable[[np.ndarray], list[np.ndarray]]
Timer = Callable[[Runner, np.ndarray, int, float], float]
TIMED_BATCHES = (1, 8)
TURN_ROUNDS = 3  # rounds in which the candidates are timed, taking turns
REFERENCE = SessionSpec("onnxruntime", "fp32")  # what every candidate is gated against (2 threads)

_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile", "avx_vnni")


def cpu_info() -> HostRecord:
    """This CPU: its name, the ISA flags that matter, and OpenVINO's version and view of it."""
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
    return HostRecord(model, tuple(f for f in _FLAGS if f in flags), version, caps)


def candidates(precisions: Sequence[str], threads: int) -> list[SessionSpec]:
    """The CPU candidates for the exported ``precisions`` (fp16 and TensorRT are GPU-only)."""
    out = [SessionSpec("onnxruntime", "fp32", threads), SessionSpec("openvino", "fp32", threads)]
    if "bf16" in precisions:
        out.append(SessionSpec("openvino", "bf16", threads))
    if "int8" in precisions:
        out += [SessionSpec("onnxruntime", "int8", threads), SessionSpec("openvino", "int8", threads)]
    return out


def unavailable(spec: SessionSpec, cpu: HostRecord) -> str | None:
    """Why ``spec`` cannot run here, or None."""
    if spec.runtime == "openvino" and cpu.openvino is None:
        return "openvino is not installed (pip install 'fashion-tagger[export]' or pip install openvino)"
    if spec.precision == "bf16" and not cpu.bf16:
        return (
            f"this CPU ({cpu.model}) has no BF16: OpenVINO reports {', '.join(cpu.openvino_capabilities)}; "
            "BF16 needs AMX or AVX512-BF16 (e.g. a 4th-generation Xeon)"
        )
    return None


def run_all(
    runner: Callable[..., list[np.ndarray]],
    images: np.ndarray,
    batch_size: int = 32,
    titles: np.ndarray | None = None,
) -> list[np.ndarray]:
    """``runner`` over ``images`` in batches (with the rows of ``titles``, a title model's ids, when given:
    ``export.sessions.Session`` takes both); outputs concatenated per tensor."""
    chunks = [
        runner(images[i : i + batch_size])
        if titles is None
        else runner(images[i : i + batch_size], titles[i : i + batch_size])
        for i in range(0, len(images), batch_size)
    ]
    return [np.concatenate(c) for c in zip(*chunks, strict=True)]


def time_taking_turns(
    runners: Sequence[Runner],
    images: np.ndarray,
    batches: Sequence[int],
    rounds: int,
    seconds: float,
    timer: Timer | None = None,
) -> list[dict[int, float]]:
    """Images/s of each runner at each of ``batches``: the median of ``rounds`` rounds in which the
    runners take turns (the order rotates every round), ``seconds`` per runner, batch and round;
    ``timer`` times one turn (``time_runner``).

    Timed one after the other, candidates a few percent apart swap places from run to run: this VM's speed
    drifts by tens of percent within minutes (model_repository/README.md). Taking turns puts every
    candidate through the same drift, so their ranking holds where separate timings disagree."""
    timer = timer or time_runner
    per: list[dict[int, list[float]]] = [{b: [] for b in batches} for _ in runners]
    for r in range(rounds):
        for k in range(len(runners)):
            i = (k + r) % len(runners)
            for b in batches:
                per[i][b].append(timer(runners[i], images, b, seconds))
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


def choose(measured: Sequence[CandidateRecord]) -> tuple[CandidateRecord, str]:
    """The fastest candidate (best batch) that passed the gate, and why, in words."""
    passed = sorted((m for m in measured if m.passed), key=lambda m: -m.best_ips)
    if not passed:
        raise ExportError("no CPU candidate passed the accuracy gate, not even ONNX Runtime FP32")
    best = passed[0]
    others = ", ".join(f"{m.name} {m.best_ips:.0f}" for m in passed[1:])
    refused = [m.name for m in measured if m.unavailable is None and not m.passed]
    why = (
        f"fastest that passed the accuracy gate: {best.best_ips:.0f} img/s at batch {best.best_batch}, "
        f"the candidates taking turns over {TURN_ROUNDS} rounds"
        + (f" (then {others})" if others else "")
        + (f"; refused by the gate: {', '.join(refused)}" if refused else "")
    )
    return best, why
