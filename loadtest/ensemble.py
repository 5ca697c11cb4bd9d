"""``fashion bench-ensemble``: the two forms of an exported ensemble timed against each other through Triton.

``fashion export --ensemble`` writes both forms of the served model (``export.ensemble``): Triton's
``platform: "ensemble"`` (the image to two member models and their probabilities to a combiner model, each a
python-backend model on the pip Triton) and one composed ONNX graph holding both members and the combiner.
Triton's ensemble scheduler has a cost of its own on the CPU (triton-inference-server/server #7080,
#7650), and here every step is a python-backend model, so each request crosses the stub's IPC three times
instead of once. Which form is faster is measured, not assumed:

``side_by_side`` copies the four model folders into a scratch repository where the ensemble serves as
``<name>`` and the composed graph as ``<name>_composed``; one pip Triton loads both, and gRPC clients time
them taking turns (``export.runtimes.time_taking_turns``: the order rotates every round, so both forms see
the same drift of a shared VM) at batch 1 and 8. ``--apply`` makes the faster one ``configs/cpu.pbtxt``
(``export.ensemble.serve_form``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.ensemble import FORMS, serve_form
from export.runtimes import time_taking_turns
from fashion.console import table
from fashion.metadata import (
    FILENAME,
    INPUT_NAME,
    load_metadata,
    read_document,
    version_folders,
    write_metadata,
)
from loadtest.errors import LoadtestError
from orchestration.triton import TritonServer

COMPOSED_SUFFIX = "_composed"
REFERENCE = "member A alone"  # timed beside the forms: what one model costs through the same Triton


@dataclass(frozen=True)
class FormBenchOptions:
    repository: Path
    name: str = "fashion"
    batches: tuple[int, ...] = (1, 8)
    rounds: int = 3
    seconds: float = 2.0  # per form, batch and round
    apply: bool = False  # serve the faster form (configs/cpu.pbtxt)

    def __post_init__(self) -> None:
        object.__setattr__(self, "repository", Path(self.repository))
        if self.rounds < 1 or self.seconds <= 0 or not self.batches or min(self.batches) < 1:
            raise LoadtestError("rounds, seconds and batch sizes must be positive")


@dataclass(frozen=True)
class FormTiming:
    """Images/s of each form at each batch (one gRPC caller), and the faster form (best batch)."""

    rates: dict[str, dict[int, float]]  # form (and REFERENCE, member A alone) -> batch -> img/s
    faster: str
    applied: bool

    def table(self) -> str:
        batches = sorted({b for r in self.rates.values() for b in r})
        rows = [(form, *(f"{rates[b]:.1f}" for b in batches)) for form, rates in self.rates.items()]
        head = ["form", *(f"img/s at batch {b}" for b in batches)]
        verdict = f"faster: {self.faster}" + (" (now configs/cpu.pbtxt)" if self.applied else "")
        return f"{table(head, rows)}\n{verdict}"


def side_by_side(repository: Path, name: str, scratch: Path) -> Path:
    """A scratch repository serving the ensemble form as ``name`` and the composed form as
    ``name + COMPOSED_SUFFIX`` (its metadata renamed to match, so that a gateway can serve it too), from the
    exported folders; the original repository is not touched."""
    folder = repository / name
    if not (folder / "configs" / "cpu_ensemble.pbtxt").is_file():
        raise LoadtestError(f"{folder} is not an ensemble's served model (run `fashion export --ensemble`)")
    for model in (name, f"{name}_a", f"{name}_b", f"{name}_combine"):
        shutil.copytree(repository / model, scratch / model, ignore=shutil.ignore_patterns(".*"))
    serve_form(scratch / name, "ensemble")
    composed = scratch / f"{name}{COMPOSED_SUFFIX}"
    shutil.copytree(scratch / name, composed)
    text = (folder / "configs" / "cpu_composed.pbtxt").read_text()
    (composed / "configs" / "cpu.pbtxt").write_text(
        text.replace(f'name: "{name}"', f'name: "{name}{COMPOSED_SUFFIX}"', 1)
    )
    for version in version_folders(composed, with_metadata=True):  # a gateway may serve the copy too
        doc = read_document(composed / str(version) / FILENAME)
        doc["model"]["name"] = composed.name
        write_metadata(composed / str(version), doc)
    return scratch


def grpc_runner(url: str, model: str, outputs: Sequence[str]) -> Callable[[np.ndarray], list[np.ndarray]]:
    """One gRPC client of ``model``: a uint8 NHWC batch in, the probabilities out."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    requested = [grpcclient.InferRequestedOutput(o) for o in outputs]

    def run(batch: np.ndarray) -> list[np.ndarray]:
        tensor = grpcclient.InferInput(INPUT_NAME, list(batch.shape), "UINT8")
        tensor.set_data_from_numpy(batch)
        result = client.infer(model, [tensor], outputs=requested, client_timeout=60)
        return [result.as_numpy(o) for o in outputs]

    return run


def bench_forms(opts: FormBenchOptions) -> FormTiming:
    """Both forms through one pip Triton, taking turns; the faster served when ``opts.apply``."""
    meta = load_metadata(opts.repository, opts.name)
    outputs = [o.tensor for o in meta.outputs]
    size = meta.preprocessing.image_size
    images = np.random.default_rng(0).integers(0, 256, (max(opts.batches), size, size, 3), dtype=np.uint8)
    names = {"ensemble": opts.name, "composed": f"{opts.name}{COMPOSED_SUFFIX}", REFERENCE: f"{opts.name}_a"}
    with tempfile.TemporaryDirectory(prefix="fashion-ensemble-bench-") as tmp:
        repo = side_by_side(opts.repository, opts.name, Path(tmp))
        with TritonServer(repo, [names[f] for f in FORMS], startup_timeout_s=300) as server:
            runners = {form: grpc_runner(server.grpc_url, model, outputs) for form, model in names.items()}
            first = [runners[f](images[:1]) for f in FORMS]  # the same answers, before any timing
            for x, y in zip(*first, strict=True):
                if not np.allclose(x, y, rtol=0, atol=1e-4):
                    raise LoadtestError("the two forms answer differently: re-export the ensemble")
            timed = time_taking_turns(list(runners.values()), images, opts.batches, opts.rounds, opts.seconds)
    rates = dict(zip(runners, timed, strict=True))
    faster = max(FORMS, key=lambda f: max(rates[f].values()))
    if opts.apply:
        serve_form(opts.repository / opts.name, faster)
    return FormTiming(rates, faster, opts.apply)
