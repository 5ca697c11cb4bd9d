"""One CPU inference session, from one spec: what the export times and gates is what Triton serves.

A ``SessionSpec`` names the runtime (ONNX Runtime or OpenVINO), the precision (and with it the file of the
version folder) and every option the session is built with. ``open_session`` is the one function that
turns a spec into a running session; the export's accuracy gate and timing, ``fashion bench`` and the
Triton python backend (``export/triton_python_model.py``) all call it. The export writes
``spec.parameters()`` into ``configs/*.pbtxt``, and the backend reads them back with
``SessionSpec.from_parameters``, so the timed and the served session are built from equal values.

Self-contained (NumPy, and the runtimes imported when a session is opened): the export copies this file
into every version folder next to ``model.py``, because Triton's python stub cannot import the project.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

# precision -> the file of the version folder that runs it. BF16 is a property of the CPU, not of the
# file: OpenVINO runs model.onnx with INFERENCE_PRECISION_HINT=bf16.
FILES = {"fp32": "model.onnx", "bf16": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
# OpenVINO's INFERENCE_PRECISION_HINT per precision: INT8 comes from the graph's Q/DQ nodes, so f32.
OPENVINO_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
RUNTIMES = ("onnxruntime", "openvino")
GRAPH_OPTIMIZATIONS = ("disabled", "basic", "extended", "all")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")


class SessionSpecError(ValueError):
    """A session spec (or the config parameters it was read from) that cannot be built."""


@dataclass(frozen=True)
class SessionSpec:
    """How one CPU session runs: runtime, precision (→ file), threads and every runtime option."""

    runtime: str = "onnxruntime"
    precision: str = "fp32"
    threads: int = 2  # ONNX Runtime intra-op threads; OpenVINO INFERENCE_NUM_THREADS
    # ONNX Runtime. Busy-waiting intra-op threads stay off: on a few cores shared with Triton and the
    # gateway they stole the CPU those need (measured on 2 cores: p99 520 ms with spinning, 27 ms without).
    allow_spinning: bool = False
    inter_op_threads: int = 1
    graph_optimization: str = "all"
    # OpenVINO
    performance_hint: str = "LATENCY"
    num_streams: int = 1

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise SessionSpecError(f"unknown runtime {self.runtime!r}; choose from {', '.join(RUNTIMES)}")
        known = OPENVINO_HINTS if self.runtime == "openvino" else FILES
        if self.precision not in known:
            raise SessionSpecError(f"{self.runtime} does not run precision {self.precision!r}")
        if self.threads < 0 or self.inter_op_threads < 0 or self.num_streams < 1:
            raise SessionSpecError("threads must not be negative and num_streams must be at least 1")
        if self.graph_optimization not in GRAPH_OPTIMIZATIONS:
            raise SessionSpecError(f"graph_optimization must be one of {', '.join(GRAPH_OPTIMIZATIONS)}")
        if self.performance_hint not in PERFORMANCE_HINTS:
            raise SessionSpecError(f"performance_hint must be one of {', '.join(PERFORMANCE_HINTS)}")

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

    @property
    def inference_precision(self) -> str:
        """OpenVINO's INFERENCE_PRECISION_HINT ("" for ONNX Runtime)."""
        return OPENVINO_HINTS[self.precision] if self.runtime == "openvino" else ""

    def parameters(self) -> dict[str, str]:
        """The python backend's ``parameters`` in ``configs/*.pbtxt`` (``from_parameters`` reads them)."""
        return {
            "runtime": self.runtime,
            "precision": self.precision,
            "model_filename": self.file,
            "inference_precision": self.inference_precision,
            "intra_op_threads": str(self.threads),
            "inter_op_threads": str(self.inter_op_threads),
            "allow_spinning": "1" if self.allow_spinning else "0",
            "graph_optimization": self.graph_optimization,
            "performance_hint": self.performance_hint,
            "num_streams": str(self.num_streams),
        }

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> SessionSpec:
        """The spec a config's parameters describe; the file and hint they name must be the spec's own."""
        defaults = cls()
        try:
            spec = cls(
                runtime=params.get("runtime") or defaults.runtime,
                precision=params.get("precision") or defaults.precision,
                threads=int(params.get("intra_op_threads") or defaults.threads),
                allow_spinning=params.get("allow_spinning", "0") == "1",
                inter_op_threads=int(params.get("inter_op_threads") or defaults.inter_op_threads),
                graph_optimization=params.get("graph_optimization") or defaults.graph_optimization,
                performance_hint=params.get("performance_hint") or defaults.performance_hint,
                num_streams=int(params.get("num_streams") or defaults.num_streams),
            )
        except ValueError as e:
            raise SessionSpecError(f"unreadable session parameters {dict(params)}: {e}") from e
        for key, own in (("model_filename", spec.file), ("inference_precision", spec.inference_precision)):
            if params.get(key, own) != own:
                raise SessionSpecError(f"parameter {key}={params[key]!r} contradicts {spec.name} ({own!r})")
        return spec

    def for_throughput(self, cores: int) -> SessionSpec:
        """The same runtime, precision and file, tuned for bulk work rather than one request's latency:
        OpenVINO runs one single-threaded stream per core, fed by as many callers (measured on 2 cores, Zen 5,
        shipped model, BF16, batch 8: 448-460 images/s and 4.2-4.4 CPU ms/image against 402-432 and 4.6-4.9
        for one two-threaded stream). ONNX Runtime sessions are returned as they are."""
        if self.runtime != "openvino" or cores <= 1:
            return self
        return replace(self, threads=cores, performance_hint="THROUGHPUT", num_streams=cores)

    def runtime_settings(self) -> dict[str, str]:
        """What a session built from this spec must report (``Session.reported``)."""
        if self.runtime == "openvino":
            return self.openvino_properties()
        params = self.parameters()
        keys = ("intra_op_threads", "inter_op_threads", "allow_spinning", "graph_optimization")
        return {k: params[k] for k in keys}

    def openvino_properties(self) -> dict[str, str]:
        """What ``compile_model`` is given (also the NGC openvino backend's parameters)."""
        return {
            "INFERENCE_NUM_THREADS": str(self.threads),
            "INFERENCE_PRECISION_HINT": self.inference_precision or "f32",
            "PERFORMANCE_HINT": self.performance_hint,
            "NUM_STREAMS": str(self.num_streams),
        }


class Session:
    """A compiled model: called with a uint8 NHWC batch (and, for a model that reads titles, their
    ``(N, max_tokens)`` int64 ids), it returns every output in graph order.

    A graph's first input is the image; a second one is the title's ids (``fashion.text``). The session
    feeds both: ``titles=None`` (or all-zero rows) is a request without a title, which the model answers
    from the photo alone; titles given to a model without a title input are not used (``reads_titles``).
    """

    def __init__(
        self,
        spec: SessionSpec,
        path: Path,
        run: Callable[[list[np.ndarray]], list[np.ndarray]],
        output_names: Sequence[str],
        reported: Callable[[], dict[str, str]],
        title_tokens: int | None = None,
    ) -> None:
        self.spec = spec
        self.path = path
        self.output_names = tuple(output_names)
        self.title_tokens = title_tokens  # the title input's max_tokens; None: the graph reads no title
        self._run = run
        self._reported = reported

    @property
    def reads_titles(self) -> bool:
        return self.title_tokens is not None

    def __call__(self, batch: np.ndarray, titles: np.ndarray | None = None) -> list[np.ndarray]:
        if self.title_tokens is None:
            return self._run([batch])
        if titles is None:
            titles = np.zeros((len(batch), self.title_tokens), np.int64)
        elif titles.shape != (len(batch), self.title_tokens):
            raise ValueError(f"title ids of shape {titles.shape} for {len(batch)} images of {self.path.name}")
        return self._run([batch, np.ascontiguousarray(titles, dtype=np.int64)])

    def reported(self) -> dict[str, str]:
        """The settings as the runtime reports them from the built session (not as they were asked)."""
        return self._reported()


def open_session(spec: SessionSpec, path: str | Path) -> Session:
    """Build ``spec``'s session of the ONNX file ``path`` (the one place sessions are made)."""
    path = Path(path)
    if spec.runtime == "openvino":
        return _openvino(spec, path)
    return _onnxruntime(spec, path)


def _onnxruntime(spec: SessionSpec, path: Path) -> Session:
    import onnxruntime as ort

    levels = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads = spec.threads
    options.inter_op_num_threads = spec.inter_op_threads
    options.graph_optimization_level = levels[spec.graph_optimization]
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spec.allow_spinning else "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    names = [i.name for i in inputs]

    def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
        return list(session.run(None, dict(zip(names, arrays, strict=True))))

    def reported() -> dict[str, str]:
        built = session.get_session_options()
        return {
            "intra_op_threads": str(built.intra_op_num_threads),
            "inter_op_threads": str(built.inter_op_num_threads),
            "allow_spinning": built.get_session_config_entry("session.intra_op.allow_spinning"),
            "graph_optimization": next(k for k, v in levels.items() if v == built.graph_optimization_level),
        }

    tokens = _title_tokens([i.shape for i in inputs])
    return Session(spec, path, run, [o.name for o in session.get_outputs()], reported, tokens)


def _openvino(spec: SessionSpec, path: Path) -> Session:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", spec.openvino_properties())
    # One infer request per stream: up to num_streams callers (threads) run at once, each on its own.
    requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
    for _ in range(spec.num_streams):
        requests.put(compiled.create_infer_request())
    outputs = list(compiled.outputs)
    shapes = [
        [d.get_length() if d.is_static else None for d in i.get_partial_shape()] for i in compiled.inputs
    ]

    def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
        request = requests.get()
        try:
            result = request.infer(dict(enumerate(arrays)))
            return [np.asarray(result[o], dtype=np.float32) for o in outputs]
        finally:
            requests.put(request)

    def reported() -> dict[str, str]:
        return {key: _text(compiled.get_property(key)) for key in spec.openvino_properties()}

    return Session(spec, path, run, [o.get_any_name() for o in outputs], reported, _title_tokens(shapes))


def _title_tokens(shapes: Sequence[Sequence[Any]]) -> int | None:
    """The second input's ``max_tokens`` (a graph that reads titles: ``[batch, max_tokens]``), or None."""
    if len(shapes) < 2:
        return None
    if len(shapes) > 2 or len(shapes[1]) != 2 or not isinstance(shapes[1][1], int):
        raise SessionSpecError(f"unexpected model inputs {list(shapes)}: an image and title ids expected")
    return int(shapes[1][1])


def _text(value: Any) -> str:
    """An OpenVINO property as the spec writes it (an element type as its short name: ``f32``, ``bf16``)."""
    name = getattr(value, "get_type_name", None)
    return str(name()) if callable(name) else str(value)
