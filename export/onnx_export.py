"""PyTorch → ONNX: the probability model with the preprocessing contract's tail inside the graph.

The graph takes what ``fashion.contract.preprocess`` produces — ``image``, UINT8, ``[batch, H, W, 3]``
(NHWC) with a dynamic batch — and does the cast, mean/std normalisation and NHWC→NCHW itself, so a
client sends 4× fewer bytes than FP32 and cannot get the normalisation wrong. It has one FP32 output per
attribute, named ``Attribute.tensor``, holding the temperature-calibrated softmax probabilities.
"""

from __future__ import annotations

import io
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from export.errors import ExportError
from fashion.metadata import INPUT_NAME
from fashion.schema import LabelSchema
from training.inference import collect, head_widths, image_batches
from training.model import FashionNet, ProbabilityModel

log = logging.getLogger(__name__)

OPSET = 17


def export_onnx(net: FashionNet, path: str | Path, *, optimize: bool = True) -> Path:
    """Write ``net``'s probability model to ``path`` as ONNX and check it.

    Args:
        net: the trained model (put in eval mode here).
        path: the ``.onnx`` file to write.
        optimize: also run ONNX Runtime's *basic* graph optimisations (constant folding, redundant
            node elimination) and keep the result when it passes ``onnx.checker``. Basic-level
            rewrites produce standard ONNX operators only, so the file still loads in Triton's ONNX
            Runtime and TensorRT backends; the extended levels would add ORT-only fused operators.
    """
    path = Path(path)
    net = net.eval().cpu()
    size = net.preprocessing.image_size
    outputs = [a.tensor for a in net.schema.attributes]
    dummy = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings from timm's shape arithmetic are expected
        torch.onnx.export(
            ProbabilityModel(net),
            (dummy,),
            buffer,  # type: ignore[arg-type]  # torch's annotation says path; file objects work and are documented
            dynamo=False,  # the TorchScript exporter: no onnxscript dependency, fine for this graph
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buffer.getvalue())
    model.doc_string = f"fashion-tagger: {len(outputs)} attributes, uint8 NHWC {size}x{size} input"
    _check(model, net.schema, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    if optimize:
        _optimize_in_place(path, net.schema, size)
    return path


def _check(model: onnx.ModelProto, schema: LabelSchema, size: int) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported ONNX graph is invalid: {e}") from e
    graph = model.graph
    (inp,) = [i for i in graph.input if i.name == INPUT_NAME] or [None]
    if inp is None:
        raise ExportError(f"the ONNX graph has no input named {INPUT_NAME!r}")
    shape = inp.type.tensor_type.shape.dim
    dims = [d.dim_param or d.dim_value for d in shape]
    if inp.type.tensor_type.elem_type != onnx.TensorProto.UINT8 or dims[1:] != [size, size, 3]:
        raise ExportError(f"unexpected ONNX input: {onnx.helper.printable_value_info(inp)}")
    if not isinstance(dims[0], str):
        raise ExportError("the ONNX input's batch dimension is not dynamic")
    names = [o.name for o in graph.output]
    if names != [a.tensor for a in schema.attributes]:
        raise ExportError(f"ONNX outputs {names} do not match the schema's tensors")


def _optimize_in_place(path: Path, schema: LabelSchema, size: int) -> None:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(optimized)
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        model = onnx.load(optimized)
        try:
            _check(model, schema, size)
        except ExportError as e:
            log.warning("keeping the unoptimised graph: the ORT-optimised one fails the check (%s)", e)
            return
        before = len(onnx.load(path).graph.node)
        model.doc_string = onnx.load(path).doc_string
        onnx.save(model, path)
        log.info("ONNX Runtime basic optimisation: %d → %d nodes", before, len(model.graph.node))


def run_torch(net: FashionNet, images: np.ndarray, batch_size: int = 32) -> list[np.ndarray]:
    """The reference: PyTorch probabilities per attribute (schema order) for a uint8 NHWC array."""
    net.eval().cpu()
    probs = collect(net.probabilities, image_batches(images, batch_size), head_widths(net.schema))
    return [probs[a.name] for a in net.schema.attributes]
