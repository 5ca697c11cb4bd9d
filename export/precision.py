"""Reduced-precision ONNX variants of the FP32 graph: FP16 (for GPUs) and INT8 with Q/DQ nodes.

Both keep the served interface: UINT8 NHWC ``image`` in, FP32 probabilities out. TensorRT 11 takes the
precision from the graph itself (no builder flags), so these files are also what a plan is built from.

What stays in FP32, and why
---------------------------
FP16 (``to_fp16``):
  * the normalisation (``Cast`` uint8→float, ``Sub`` mean, ``Div`` std): pixel values up to 255 and the
    division are cheap and exact in FP32; it is where every client's input passes through.
  * ``Softmax`` (and everything after the heads' ``Gemm``): probabilities near 0/1 and the temperature
    division lose digits in FP16, and the abstain thresholds compare exactly these numbers.
  * ONNX Runtime's default block list (ops without FP16 kernels or numerically fragile ones).

INT8 (``to_int8``, ``onnxruntime.quantization.quantize_static``, QDQ, per-channel symmetric weights,
symmetric activations as TensorRT requires):
  * the normalisation nodes and the **stem convolution**: its input is the raw image distribution and
    quantising the first layer costs the most accuracy for the least speed;
  * **depthwise convolutions** (``group > 1``): EfficientNet's per-channel weight ranges vary widely and
    these layers are memory-bound, so INT8 buys little speed for a large error;
  * ``Sigmoid``/``Mul`` — the SiLU activations and squeeze-excitation gates — are not in the quantised op
    list: their outputs feed multiplicative gates whose error compounds;
  * the **heads** (``Gemm``) and ``Softmax``: tiny layers whose error lands directly on the calibrated
    probabilities.
  Quantised: the pointwise/expansion convolutions (most of the FLOPs) and the residual ``Add`` nodes.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from export.errors import ExportError

log = logging.getLogger(__name__)

INPUT_NAME = "image"


def _normalisation_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes between the uint8 input and the first Conv (Transpose, Cast, Sub, Div)."""
    out = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            break
        out.append(node)
    return out


def _stem_conv(model: onnx.ModelProto) -> onnx.NodeProto:
    for node in model.graph.node:
        if node.op_type == "Conv":
            return node
    raise ExportError("the graph has no Conv node (unexpected backbone for INT8 quantisation)")


def _group(node: onnx.NodeProto) -> int:
    return next((int(a.i) for a in node.attribute if a.name == "group"), 1)


def to_fp16(src: str | Path, dst: str | Path) -> Path:
    """FP16 weights and activations; UINT8 input and FP32 outputs kept (see the module docstring)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(src)
    blocked = [n.name for n in _normalisation_nodes(model)]
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, "Softmax"],
        node_block_list=blocked,
    )
    _sort_topologically(converted.graph)  # the converter appends its Cast nodes at the end
    _check_io(converted, onnx.load(src))
    onnx.save(converted, dst)
    return Path(dst)


def int8_exclusions(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Names of the nodes kept out of INT8, by reason (recorded in the metadata)."""
    return {
        "normalisation": [n.name for n in _normalisation_nodes(model)],
        "stem_conv": [_stem_conv(model).name],
        "depthwise_conv": [n.name for n in model.graph.node if n.op_type == "Conv" and _group(n) > 1],
        "heads": [n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul", "Softmax")],
    }


class _Calibration:
    """ONNX Runtime's CalibrationDataReader protocol over a uint8 NHWC array."""

    def __init__(self, images: np.ndarray, batch_size: int = 16) -> None:
        self._batches: Iterator[np.ndarray] = iter(
            [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def to_int8(src: str | Path, dst: str | Path, calibration: np.ndarray) -> tuple[Path, dict[str, list[str]]]:
    """Static INT8 quantisation with Q/DQ nodes, calibrated (MinMax) on ``calibration`` images.

    Returns the file and the excluded nodes by reason.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) < 1:
        raise ExportError("INT8 calibration needs at least one image")
    model = onnx.load(src)
    excluded = int8_exclusions(model)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference + graph clean-up that the quantiser relies on; skip ORT's optimiser so node
        # names (and therefore the exclusions) stay those of the exported graph.
        quant_pre_process(str(src), str(prepared), skip_optimization=True, skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(dst),
            _Calibration(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv", "Add"],
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=[name for names in excluded.values() for name in names],
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    quantized = onnx.load(dst)
    if count_ops(quantized, "QuantizeLinear") == 0:
        raise ExportError("INT8 quantisation produced no QuantizeLinear node (nothing was quantised)")
    _check_io(quantized, model)
    return Path(dst), excluded


def _sort_topologically(graph: onnx.GraphProto) -> None:
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(x in available for x in n.input)]
        if not ready:
            raise ExportError("the FP16 graph has a cycle or a dangling input")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


def count_ops(model: onnx.ModelProto, op_type: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op_type)


def _check_io(variant: onnx.ModelProto, reference: onnx.ModelProto) -> None:
    def io(m: onnx.ModelProto) -> list[tuple[str, int]]:
        return [(v.name, v.type.tensor_type.elem_type) for v in [*m.graph.input, *m.graph.output]]

    if io(variant) != io(reference):
        raise ExportError(f"the variant changed the model's interface: {io(variant)} vs {io(reference)}")
    onnx.checker.check_model(variant)
