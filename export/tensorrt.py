"""TensorRT plans from the FP16 / Q/DQ INT8 ONNX, with the TensorRT Python API, on the serving GPU.

TensorRT 11 has no FP16/INT8 builder flags: the precision is in the ONNX graph and the network is
built *strongly typed*. A plan only runs on the GPU model and TensorRT version that built it, so in
production it is built inside the serving ``tritonserver`` image on the target GPU, by
``scripts/build_trt_plan.sh`` (``trtexec``, run by the Helm chart's init container). This module is the
same build for a machine that has a GPU and the ``tensorrt`` wheel: ``fashion export --precision trt-fp16``.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

from export.errors import ExportError, TensorRTUnavailable
from fashion.metadata import INPUT_NAME, TITLE_INPUT

log = logging.getLogger(__name__)

HOW_TO = (
    "build the plan where it is served instead: on a GPU node, inside the tritonserver image, run "
    "scripts/build_trt_plan.sh --repo-dir=<repository> --precision=fp16|int8 (it calls trtexec "
    "--stronglyTyped), or install TensorRT (pip install tensorrt) on a machine with an NVIDIA GPU and "
    "run fashion export there"
)


def unavailable_reason() -> str | None:
    """Why a plan cannot be built here, or None when TensorRT and a GPU are present."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed"
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA driver is visible (nvidia-smi not found)"
    probe = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    if probe.returncode != 0 or "GPU" not in probe.stdout:
        return "nvidia-smi lists no GPU"
    return None


def require_tensorrt() -> None:
    """Raise ``TensorRTUnavailable`` with what to do when a plan cannot be built here."""
    reason = unavailable_reason()
    if reason is not None:
        raise TensorRTUnavailable(f"cannot build a TensorRT plan here: {reason}. To get one, {HOW_TO}.")


def build_plan(
    onnx_path: str | Path,
    plan_path: str | Path,
    *,
    image_size: int,
    max_batch_size: int,
    opt_batch_size: int = 8,
    timing_cache: str | Path | None = None,
    workspace_bytes: int = 2 << 30,
    title_tokens: int | None = None,
) -> Path:
    """Build a strongly typed engine with a batch profile 1 / ``opt_batch_size`` / ``max_batch_size``.

    Args:
        onnx_path: ``model.fp16.onnx`` or the Q/DQ ``model.int8.onnx``.
        plan_path: the serialised engine to write (``model.plan``).
        image_size: side of the uint8 NHWC input.
        max_batch_size: the profile's maximum = Triton's ``max_batch_size``.
        opt_batch_size: the batch TensorRT tunes kernels for (clamped to ``max_batch_size``).
        timing_cache: file reused across builds on the same GPU + TensorRT (created when missing).
        workspace_bytes: builder workspace memory limit.
        title_tokens: a model that reads titles: its ``title`` input's ``max_tokens`` (the same batch
            profile; an image-only request sends all-zero ids).
    """
    require_tensorrt()
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    opt = min(opt_batch_size, max_batch_size)
    shape = (image_size, image_size, 3)
    profile.set_shape(INPUT_NAME, (1, *shape), (opt, *shape), (max_batch_size, *shape))
    if title_tokens is not None:
        profile.set_shape(TITLE_INPUT, (1, title_tokens), (opt, title_tokens), (max_batch_size, title_tokens))
    config.add_optimization_profile(profile)
    cache_file = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(
        cache_file.read_bytes() if cache_file and cache_file.is_file() else b""
    )
    config.set_timing_cache(cache, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    plan_path = Path(plan_path)
    plan_path.write_bytes(bytes(engine))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    log.info("built %s (%d bytes) from %s", plan_path, plan_path.stat().st_size, onnx_path)
    return plan_path
