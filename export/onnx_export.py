"""PyTorch → ONNX: the probability model with the preprocessing contract's tail inside the graph.

The graph takes what ``fashion.contract.preprocess`` produces — ``image``, UINT8, ``[batch, H, W, 3]``
(NHWC) with a dynamic batch — and does the cast, mean/std normalisation and NHWC→NCHW itself, so a
client sends 4× fewer bytes than FP32 and cannot get the normalisation wrong. It has one FP32 output per
attribute, named ``Attribute.tensor``, holding the temperature-calibrated softmax probabilities.

A model with a title branch (``fashion train --title``) takes a second input, ``title``: INT64
``[batch, max_tokens]`` hashed token ids (``fashion.text``; all zeros = no title, the image-only answer),
with the same dynamic batch, and has one more output, ``conflict``: FP32 ``[batch, attributes]``, how much
the photo alone and the title alone disagree per attribute (``training.model.FashionNet.conflict``).
"""

from __future__ import annotations

import io
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from export.errors import ExportError
from fashion.metadata import CONFLICT_OUTPUT, INPUT_NAME, TITLE_INPUT
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
    interface = Interface.of(net)
    size = net.preprocessing.image_size
    dummy = [torch.zeros((2, size, size, 3), dtype=torch.uint8)]
    if interface.title_tokens is not None:
        dummy.append(torch.ones((2, interface.title_tokens), dtype=torch.int64))
    batch = {0: "batch"}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings from timm's shape arithmetic are expected
        torch.onnx.export(
            ProbabilityModel(net),
            tuple(dummy),
            buffer,  # type: ignore[arg-type]  # torch's annotation says path; file objects work and are documented
            dynamo=False,  # the TorchScript exporter: no onnxscript dependency, fine for this graph
            opset_version=OPSET,
            input_names=list(interface.inputs),
            output_names=list(interface.outputs),
            dynamic_axes={name: batch for name in (*interface.inputs, *interface.outputs)},
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buffer.getvalue())
    title = "" if interface.title_tokens is None else f", int64 title ids [batch, {interface.title_tokens}]"
    model.doc_string = (
        f"fashion-tagger: {len(interface.heads)} attributes, uint8 NHWC {size}x{size} input{title}"
    )
    interface.check(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    if optimize:
        _optimize_in_place(path, interface)
    return path


@dataclass(frozen=True)
class Interface:
    """The exported graph's inputs and outputs, in order, as ``FashionNet`` defines them."""

    image_size: int
    heads: tuple[str, ...]  # the attributes' tensors
    title_tokens: int | None = None  # the title input's max_tokens; None: the model reads no title

    @classmethod
    def of(cls, net: FashionNet) -> Interface:
        tokens = None if net.title is None else net.title.tokenizer.max_tokens
        return cls(net.preprocessing.image_size, tuple(a.tensor for a in net.schema.attributes), tokens)

    @property
    def inputs(self) -> tuple[str, ...]:
        return (INPUT_NAME,) if self.title_tokens is None else (INPUT_NAME, TITLE_INPUT)

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.heads if self.title_tokens is None else (*self.heads, CONFLICT_OUTPUT)

    def check(self, model: onnx.ModelProto) -> None:
        """``ExportError`` unless ``model`` is a valid graph with exactly these inputs and outputs."""
        try:
            onnx.checker.check_model(model, full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"the exported ONNX graph is invalid: {e}") from e
        graph = model.graph
        inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
        if [i.name for i in inputs] != list(self.inputs):
            raise ExportError(
                f"the ONNX graph's inputs are {[i.name for i in inputs]}, not {list(self.inputs)}"
            )
        size = self.image_size
        expected = [(onnx.TensorProto.UINT8, [size, size, 3])]
        if self.title_tokens is not None:
            expected.append((onnx.TensorProto.INT64, [self.title_tokens]))
        for inp, (elem_type, dims) in zip(inputs, expected, strict=True):
            shape = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
            if inp.type.tensor_type.elem_type != elem_type or shape[1:] != dims:
                raise ExportError(f"unexpected ONNX input: {onnx.helper.printable_value_info(inp)}")
            if not isinstance(shape[0], str):
                raise ExportError(f"the ONNX input {inp.name!r}'s batch dimension is not dynamic")
        names = [o.name for o in graph.output]
        if names != list(self.outputs):
            raise ExportError(f"ONNX outputs {names} are not {list(self.outputs)} (the schema's tensors)")


def _optimize_in_place(path: Path, interface: Interface) -> None:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(optimized)
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        model = onnx.load(optimized)
        try:
            interface.check(model)
        except ExportError as e:
            log.warning("keeping the unoptimised graph: the ORT-optimised one fails the check (%s)", e)
            return
        before = len(onnx.load(path).graph.node)
        model.doc_string = onnx.load(path).doc_string
        onnx.save(model, path)
        log.info("ONNX Runtime basic optimisation: %d → %d nodes", before, len(model.graph.node))


def run_torch(
    net: FashionNet, images: np.ndarray, titles: np.ndarray | None = None, batch_size: int = 32
) -> list[np.ndarray]:
    """The reference: what the exported graph computes, in PyTorch — the probabilities per attribute (schema
    order) of a uint8 NHWC array and, for a model with a title branch, the conflict scores; ``titles``:
    ``(N, max_tokens)`` ids (None: no titles, all-zero ids)."""
    model = ProbabilityModel(net.eval().cpu())
    if net.title is not None and titles is None:
        titles = np.zeros((len(images), net.title.tokenizer.max_tokens), np.int64)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            args = [torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))]
            if net.title is not None and titles is not None:
                args.append(torch.from_numpy(np.ascontiguousarray(titles[start : start + batch_size])))
            chunks.append([t.float().numpy() for t in model(*args)])
    if not chunks:
        widths = [a.num_classes for a in net.schema.attributes]
        widths += [] if net.title is None else [len(widths)]
        return [np.zeros((0, w), np.float32) for w in widths]
    return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]
