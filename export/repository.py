"""The Triton model repository writer: one model folder that both the NGC image and the pip Triton serve.

Layout written for ``--name fashion`` (see ``model_repository/README.md``)::

    <repository>/fashion/
        config.pbtxt              platform onnxruntime_onnx, model.onnx (the production NGC image)
        configs/cpu.pbtxt         backend python running the chosen CPU candidate (pip Triton)
        configs/cpu_<runtime>_<precision>.pbtxt   the same for each candidate that passed the gate
        configs/openvino.pbtxt    the NGC image's openvino backend, best OpenVINO file (Helm CPU profile)
        configs/gpu_fp16.pbtxt    onnxruntime_onnx with model.fp16.onnx (when exported)
        configs/gpu_int8.pbtxt    onnxruntime_onnx with model.int8.onnx (when exported)
        labels_<tensor>.txt       one class per line, per output (label_filename: classification extension)
        warmup/image              one real preprocessed image, raw uint8 HWC (model_warmup)
        <version>/model.onnx      FP32; model.fp16.onnx, model.int8.onnx when asked
        <version>/model.py        the python-backend model (export/triton_python_model.py)
        <version>/sessions.py     the one session factory it builds from (export/sessions.py)
        <version>/metadata.json   what the gateway reads (format fashion-tagger/metadata@1)

A model that reads titles has, in every config, a second input ``title`` (``TYPE_INT64``, dims
``[max_tokens]``) and a last output ``conflict`` (``TYPE_FP32``, dims ``[attributes]``), and its warm-up
sends a zero title. The title is not optional: a request without a title sends all-zero ids (that is the
contract: the model answers it from the photo alone), so that Triton's dynamic batcher batches requests
with and without a title together — requests that differed in their set of inputs could not share a batch.

A version folder is assembled next to its final place under a name Triton ignores (``.staging-*``,
not a number) and renamed into place, so a polling Triton never sees half a version; versions are never
overwritten. The model-level files describe the newest version and are each replaced atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ExportError
from export.sessions import FILES, SessionSpec
from fashion.metadata import INPUT_NAME, TitleSpec, version_folders, write_metadata
from fashion.schema import LabelSchema

PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")
# Copied next to model.py: Triton's python stub cannot import the project, so the backend loads the one
# session factory from its own version folder.
SESSIONS_MODULE = Path(__file__).with_name("sessions.py")
VARIANTS = ("fp32", "fp16", "int8")  # the files a version can hold (export.sessions.FILES names them)
ORT_FP32 = SessionSpec()  # ONNX Runtime FP32, 2 threads: the python backend's default session
# configs/<name>.pbtxt → (precision, backend) of the GPU variants (fp16 is for GPUs only).
GPU_VARIANTS = {
    "gpu_fp16": ("fp16", "onnxruntime_onnx"),
    "gpu_int8": ("int8", "onnxruntime_onnx"),
}


@dataclass(frozen=True)
class CpuServing:
    """Which CPU candidate ``configs/cpu.pbtxt`` serves, and every one that gets its own config (each the
    session spec the export gated and timed)."""

    chosen: SessionSpec = ORT_FP32
    configured: tuple[SessionSpec, ...] = (ORT_FP32,)
    openvino: SessionSpec | None = None  # what configs/openvino.pbtxt (NGC openvino backend) runs

    def __init__(
        self,
        chosen: SessionSpec = ORT_FP32,
        configured: Sequence[SessionSpec] = (ORT_FP32,),
        openvino: SessionSpec | None = None,
    ) -> None:
        object.__setattr__(self, "chosen", chosen)
        object.__setattr__(self, "configured", tuple(dict.fromkeys([chosen, *configured])))
        object.__setattr__(self, "openvino", openvino)


_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ServingConfig:
    """How Triton batches and places the model; written into every config of the model folder."""

    max_batch_size: int = 32
    max_queue_delay_us: int = 2000
    # Triton's queue policy (dynamic_batching.default_queue_policy), the server half of the bounded queue
    # (the gateway's FASHION_MAX_INFLIGHT is the other): a request that waited longer than queue_timeout_us
    # is rejected, not served late (the gateway answers 504); beyond max_queue_size queued requests a new one
    # is rejected at once (the gateway answers 503 triton_overloaded, with Retry-After). 256 is ~20 gateway
    # pods at their default in-flight limit; at CPU speeds (~200 img/s) the timeout bites first.
    queue_timeout_us: int = 1_000_000  # 0 = no timeout
    max_queue_size: int = 256  # at least 1: Triton reads 0 as "unbounded"
    gpu_instances: int = 1
    cpu_instances: int = 1  # each runs one session of export.sessions.SessionSpec (its threads)

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch_size <= 1024:
            raise ExportError(f"max_batch_size must be between 1 and 1024, got {self.max_batch_size}")
        for name in ("max_queue_delay_us", "queue_timeout_us", "max_queue_size"):
            if getattr(self, name) < 0:
                raise ExportError(f"{name} must not be negative")
        if self.max_queue_size < 1:
            raise ExportError(
                "max_queue_size must be at least 1: Triton treats 0 as an unbounded queue, and an unbounded "
                "queue turns overload into ever-growing latency instead of fast rejections"
            )
        if self.gpu_instances < 1 or self.cpu_instances < 1:
            raise ExportError("instance counts must be at least 1")

    @property
    def preferred_batch_sizes(self) -> list[int]:
        """Powers of two from 4 up to ``max_batch_size``, plus ``max_batch_size`` itself."""
        sizes = [s for s in (4, 8, 16, 32, 64, 128, 256, 512) if s < self.max_batch_size]
        return [*sizes, self.max_batch_size]


def model_config(
    name: str,
    schema: LabelSchema,
    image_size: int,
    serving: ServingConfig,
    *,
    backend: str = "onnxruntime_onnx",
    model_filename: str = "model.onnx",
    warmup: bool = True,
    session: SessionSpec = ORT_FP32,
    title: TitleSpec | None = None,
) -> str:
    """The text of a ``config.pbtxt``: ``backend`` ``onnxruntime_onnx`` (NGC, GPU), ``python`` (pip Triton,
    CPU, running ``session``: its parameters) or ``openvino`` (NGC, CPU, running ``model_filename`` with
    ``session``'s threads, streams and hint); ``title``: the title input and conflict output of a model
    that reads titles (the module docstring)."""
    lines = [f'name: "{name}"']
    if backend in ("python", "openvino"):
        lines.append(f'backend: "{backend}"')
    if backend == "openvino":
        lines.append(f'default_model_filename: "{model_filename}"')
    elif backend != "python":
        lines += [f'platform: "{backend}"', f'default_model_filename: "{model_filename}"']
    lines += [
        f"max_batch_size: {serving.max_batch_size}",
        "version_policy: { latest: { num_versions: 1 } }",
        *io_lines(schema, image_size, title),
    ]
    lines += _instances(backend, serving, session) + _batching(serving)
    if warmup:
        lines += _warmup(image_size, title)
    return "\n".join(lines) + "\n"


def io_lines(schema: LabelSchema, image_size: int, title: TitleSpec | None = None) -> list[str]:
    """The ``input`` and ``output`` blocks of a config: the uint8 NHWC image (and a title model's ids), one
    FP32 probability output per attribute with its label file (and a title model's conflict scores). Shared
    by every config of the model, the ensemble's included (``export.ensemble``)."""
    lines = [
        "input [",
        "  {",
        f'    name: "{INPUT_NAME}"',
        "    data_type: TYPE_UINT8",
        "    format: FORMAT_NHWC",
        f"    dims: [ {image_size}, {image_size}, 3 ]",
        "  }" + ("," if title is not None else ""),
    ]
    if title is not None:
        lines += [
            "  {",
            f'    name: "{title.input}"',
            "    data_type: TYPE_INT64",
            f"    dims: [ {title.max_tokens} ]",
            "  }",
        ]
    lines += ["]", "output ["]
    outputs = []
    for a in schema.attributes:
        outputs.append(
            "  {\n"
            f'    name: "{a.tensor}"\n'
            "    data_type: TYPE_FP32\n"
            f"    dims: [ {a.num_classes} ]\n"
            f'    label_filename: "{label_filename(a.tensor)}"\n'
            "  }"
        )
    if title is not None:
        outputs.append(
            "  {\n"
            f'    name: "{title.conflict_output}"\n'
            "    data_type: TYPE_FP32\n"
            f"    dims: [ {len(schema.attributes)} ]\n"
            "  }"
        )
    lines += [",\n".join(outputs), "]"]
    return lines


def _instances(backend: str, serving: ServingConfig, session: SessionSpec) -> list[str]:
    """The instance group and, on the CPU, the session's parameters."""
    if backend not in ("python", "openvino"):
        return [f"instance_group [ {{ count: {serving.gpu_instances}, kind: KIND_GPU }} ]"]
    if backend == "python":
        params = session.parameters()
    else:  # the openvino backend's own parameters (triton-inference-server/openvino_backend)
        own = session.openvino_properties()
        params = {k: own[k] for k in ("INFERENCE_NUM_THREADS", "NUM_STREAMS", "PERFORMANCE_HINT")}
    return [
        f"instance_group [ {{ count: {serving.cpu_instances}, kind: KIND_CPU }} ]",
        *(f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items()),
    ]


def _batching(serving: ServingConfig) -> list[str]:
    preferred = ", ".join(str(s) for s in serving.preferred_batch_sizes)
    return [
        "dynamic_batching {",
        f"  preferred_batch_size: [ {preferred} ]",
        f"  max_queue_delay_microseconds: {serving.max_queue_delay_us}",
        "  default_queue_policy {",
        "    timeout_action: REJECT",
        f"    default_timeout_microseconds: {serving.queue_timeout_us}",
        "    allow_timeout_override: true",
        f"    max_queue_size: {serving.max_queue_size}",
        "  }",
        "}",
    ]


def _warmup(image_size: int, title: TitleSpec | None = None) -> list[str]:
    """One real catalogue image (``warmup/image``) and, for a model that reads titles, a zero title."""
    zero_title = []
    if title is not None:
        zero_title = [
            "    inputs {",
            f'      key: "{title.input}"',
            "      value: {",
            "        data_type: TYPE_INT64",
            f"        dims: [ {title.max_tokens} ]",
            "        zero_data: true",
            "      }",
            "    }",
        ]
    return [
        "model_warmup [",
        "  {",
        '    name: "catalogue_image"',
        "    batch_size: 1",
        "    inputs {",
        f'      key: "{INPUT_NAME}"',
        "      value: {",
        "        data_type: TYPE_UINT8",
        f"        dims: [ {image_size}, {image_size}, 3 ]",
        '        input_data_file: "image"',
        "      }",
        "    }",
        *zero_title,
        "  }",
        "]",
    ]


_PARAMETER = re.compile(r'^parameters: \{ key: "([^"]+)" value: \{ string_value: "([^"]*)" \} \}$')


def read_session_spec(model_dir: str | Path, config_name: str) -> SessionSpec:
    """The session ``<model_dir>/configs/<config_name>.pbtxt`` runs: its parameters (as ``model_config``
    writes them) read back into a spec, as the python backend reads them."""
    path = Path(model_dir) / "configs" / f"{config_name}.pbtxt"
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ExportError(f"{path} is not readable: {e}") from e
    params = {m[1]: m[2] for line in lines if (m := _PARAMETER.match(line.strip()))}
    if "runtime" not in params:
        raise ExportError(f"{path} has no session parameters (not a python-backend CPU config)")
    return SessionSpec.from_parameters(params)


def label_filename(tensor: str) -> str:
    return f"labels_{tensor}.txt"


def existing_versions(model_dir: Path) -> list[int]:
    return version_folders(model_dir)


def next_version(model_dir: Path) -> int:
    """One more than the highest numeric version folder (1 for a new model)."""
    versions = existing_versions(model_dir)
    return versions[-1] + 1 if versions else 1


@contextlib.contextmanager
def _locked(model_dir: Path) -> Iterator[None]:
    """Serialise writers of one model folder (two exports at once get different versions)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    with (model_dir / ".export.lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_atomic(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_model_version(
    repository: str | Path,
    name: str,
    *,
    schema: LabelSchema,
    image_size: int,
    model_files: Mapping[str, str | Path],
    metadata: Mapping[str, Any],
    warmup_image: np.ndarray,
    serving: ServingConfig = ServingConfig(),
    version: int | None = None,
    cpu: CpuServing = CpuServing(),
    title: TitleSpec | None = None,
) -> Path:
    """Publish a new version of model ``name`` in ``repository``; returns the version folder.

    Args:
        repository: the Triton model repository root (created when missing).
        name: the model folder name.
        schema: the label schema (output tensors, their classes → label files).
        image_size: side of the square uint8 NHWC input.
        model_files: precision (``fp32`` required, ``fp16``, ``int8``) → ONNX file to copy in (named as
            ``export.sessions.FILES`` says).
        metadata: the metadata document; ``model.version`` is filled in here.
        warmup_image: one ``(size, size, 3)`` uint8 image for ``model_warmup``.
        serving: batching, queue and instance settings.
        cpu: the CPU candidate ``configs/cpu.pbtxt`` runs and those that get their own config.
        title: the title input of a model that reads titles (in every config; the module docstring).
        version: the version number; ``None`` takes the next free one. An existing version is an error.
    """
    if not _NAME.match(name):
        raise ExportError(f"model name {name!r} must be letters, digits, '_', '-' or '.'")
    if "fp32" not in model_files:
        raise ExportError("the FP32 model.onnx is required in every version")
    unknown = set(model_files) - set(VARIANTS)
    if unknown:
        raise ExportError(f"unknown precisions {sorted(unknown)}")
    if warmup_image.shape != (image_size, image_size, 3) or warmup_image.dtype != np.uint8:
        raise ExportError(f"the warm-up image must be uint8 {image_size}x{image_size}x3")
    if version is not None and version < 1:
        raise ExportError(f"--version must be a positive integer, got {version}")
    model_dir = Path(repository) / name
    with _locked(model_dir):
        chosen = next_version(model_dir) if version is None else version
        final = model_dir / str(chosen)
        if final.exists():
            raise ExportError(
                f"{final} already exists: versions are never overwritten (omit --version to add "
                f"version {next_version(model_dir)})"
            )
        staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".staging-{chosen}-"))
        try:
            for precision, src in model_files.items():
                shutil.copyfile(src, staging / FILES[precision])
            shutil.copyfile(PYTHON_MODEL, staging / "model.py")
            shutil.copyfile(SESSIONS_MODULE, staging / SESSIONS_MODULE.name)
            for a in schema.attributes:
                (staging / label_filename(a.tensor)).write_text("\n".join(a.classes) + "\n")
            doc = dict(metadata)
            doc["model"] = {**doc.get("model", {}), "name": name, "version": chosen}
            write_metadata(staging, doc)
            os.chmod(staging, 0o755)
            os.rename(staging, final)  # atomic: Triton sees the whole version or none of it
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _write_model_level(
            model_dir, name, schema, image_size, serving, set(model_files), warmup_image, cpu, title
        )
    return final


def _write_model_level(
    model_dir: Path,
    name: str,
    schema: LabelSchema,
    image_size: int,
    serving: ServingConfig,
    precisions: set[str],
    warmup_image: np.ndarray,
    cpu: CpuServing,
    title: TitleSpec | None = None,
) -> None:
    for a in schema.attributes:
        _write_atomic(model_dir / label_filename(a.tensor), "\n".join(a.classes) + "\n")
    _write_atomic(model_dir / "warmup" / "image", np.ascontiguousarray(warmup_image).tobytes())

    def config(**kwargs: Any) -> str:
        return model_config(name, schema, image_size, serving, title=title, **kwargs)

    _write_atomic(model_dir / "config.pbtxt", config())
    wanted: dict[str, str] = {}
    # A candidate gets a config when its file is in this version (bf16 runs model.onnx).
    configured = [c for c in cpu.configured if c.file in {FILES[p] for p in precisions}]
    wanted["cpu"] = config(backend="python", session=cpu.chosen)
    for c in configured:
        wanted[c.config_name] = config(backend="python", session=c)
    if cpu.openvino is not None and cpu.openvino in configured:
        wanted["openvino"] = config(
            backend="openvino", model_filename=cpu.openvino.file, session=cpu.openvino
        )
    for config_name, (precision, backend) in GPU_VARIANTS.items():
        if precision in precisions:
            wanted[config_name] = config(backend=backend, model_filename=FILES[precision])
    folder = model_dir / "configs"
    for text_name, text in wanted.items():
        _write_atomic(folder / f"{text_name}.pbtxt", text)
    for old in folder.glob("*.pbtxt") if folder.is_dir() else []:
        if old.stem not in wanted:
            old.unlink(missing_ok=True)  # a variant of an older version that the newest one lacks


def write_trt_model(
    repository: str | Path,
    name: str,
    version: int,
    plan: str | Path,
    metadata_path: str | Path,
    max_batch_size: int,
) -> Path:
    """``<name>/<version>/model.plan`` + ``config.pbtxt`` (``tensorrt_plan``), as scripts/build_trt_plan.sh
    writes them; inputs and outputs are completed by Triton from the engine."""
    model_dir = Path(repository) / name
    final = model_dir / str(version)
    if final.exists():
        raise ExportError(f"{final} already exists: versions are never overwritten")
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".staging-{version}-"))
    shutil.copyfile(plan, staging / "model.plan")
    shutil.copyfile(metadata_path, staging / "metadata.json")
    os.chmod(staging, 0o755)
    os.rename(staging, final)
    text = (
        f'name: "{name}"\n'
        'platform: "tensorrt_plan"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"version_policy: {{ specific: {{ versions: [ {version} ] }} }}\n"
        "instance_group [ { kind: KIND_GPU, count: 1 } ]\n"
        "dynamic_batching { }\n"
    )
    _write_atomic(model_dir / "config.pbtxt", text)
    return final


def read_labels(model_dir: Path, tensors: Sequence[str]) -> dict[str, list[str]]:
    """The classes of each output from the model-level label files (for tests and tools)."""
    return {t: (model_dir / label_filename(t)).read_text().splitlines() for t in tensors}
