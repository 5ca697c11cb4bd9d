"""Reduced-precision ONNX variants of the FP32 graph: FP16 (for GPUs) and INT8 with Q/DQ nodes.

Both keep the served interface: UINT8 NHWC ``image`` in (and a title model's INT64 ``title`` ids), FP32
probabilities (and ``conflict`` scores) out. TensorRT 11 takes the
precision from the graph itself (no builder flags), so these files are also what a plan is built from.

What stays in FP32, and why
---------------------------
FP16 (``to_fp16``):
  * the normalisation (``Cast`` uint8→float, ``Sub`` mean, ``Div`` std): pixel values up to 255 and the
    division are cheap and exact in FP32; it is where every client's input passes through.
  * everything after the backbone's pooled features (``fp32_tail``: the heads, their temperature and
    ``Softmax``, the novelty gate and its mix): probabilities near 0/1 and the temperature division lose
    digits in FP16, and the abstain thresholds compare exactly these numbers.
  * a title model's whole title branch (``fp32_tail`` again: every node that the ``title`` input reaches —
    the embedding bag, the title-only heads, the conflict score): a mean over a few dozen embeddings and
    a score compared with its threshold; they cost nothing next to the backbone.
  * ONNX Runtime's default block list (ops without FP16 kernels or numerically fragile ones).

INT8 (``to_int8``: NNCF's post-training quantisation of the ONNX graph, Q/DQ nodes, the ``PERFORMANCE``
preset — symmetric weights and activations, per-channel weights — which TensorRT builds as well):
  * the **stem convolution**: its input is the normalised image, and that tensor also feeds the colour
    grid (``FashionNet.colour_features``). Quantising it cost most of the accuracy measured on the
    shipped model (baseColour agreement with FP32 78 % → 94 % on 600 real validation photos when kept).
  * **everything after the pooled features** (``fp32_tail``): the heads, their temperature and softmax,
    the novelty gate (``/novelty/*``) and its mix into the probabilities; and everything the ``title``
    input reaches (the title branch, the title-only heads, the conflict score). Tiny layers whose error lands
    directly on what users receive: with Q/DQ pairs on the gate's ``MatMul``/``Mul`` outputs the squared
    distance cancelled to noise (the gate almost never fired), and quantised probabilities set every
    class but the first to exactly 0.0. Excluding only ``Gemm``/``MatMul``/``Softmax`` by type left the
    elementwise nodes between them quantised; the whole tail is now excluded by name.
  * the normalisation before the stem (``Cast``, ``Sub``, ``Div``) is not a quantisable op.
  * ``keep`` (``--int8-keep``): further nodes named by the caller, e.g. the most sensitive layers an
    accuracy-control search found (``training`` recipes record them next to the model).
  Quantised: every other convolution (pointwise, depthwise, expansion), the residual adds and the pools.

Measured on the shipped model (``models/default``, 300 training photos calibrating, the gate on 600
validation photos, OpenVINO running the Q/DQ file): NNCF's defaults agree with FP32 on baseColour for 78 %
of photos; keeping the stem in FP32 gives 94 %, full bias correction 95 % with every accuracy within
0.5 points of FP32. Keeping also the depthwise convolutions, the last stages or the pools in FP32 moved
baseColour by at most one point, and NNCF's accuracy-control search (reverting the most sensitive layers
one by one) moved it from 91.8 % to 92.5 % in 25 steps: baseColour's decisions are fragile in FP32 itself
(±2 grey levels of noise on the input change 15 % of them). What passes the gate (``export.parity.gate``)
is keeping whole early stages: ``models/default/export.yaml`` keeps stages 0–4 in FP32 (the table in
``model_repository/README.md``). On the development VM (AVX2, no VNNI or AMX) OpenVINO runs that INT8
18–28 % faster than OpenVINO FP32, timed taking turns in three exports
(``export.runtimes.time_taking_turns``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from export.errors import ExportError
from fashion.metadata import INPUT_NAME, TITLE_INPUT

log = logging.getLogger(__name__)

BACKBONE = "/backbone/"  # the exported graph's node names follow FashionNet's modules


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


def fp32_tail(model: onnx.ModelProto) -> list[str]:
    """The nodes after the backbone's pooled features, in graph order: every node that depends on a
    tensor the backbone hands to the rest of the graph (the heads, softmax, the novelty gate, its mix), or
    on a title model's ``title`` input (the title branch, the title-only heads, the conflict score)."""
    produced_by_backbone = {o for n in model.graph.node if n.name.startswith(BACKBONE) for o in n.output}
    pooled = {
        i
        for n in model.graph.node
        if not n.name.startswith(BACKBONE)
        for i in n.input
        if i in produced_by_backbone
    }
    if not pooled:
        raise ExportError(f"no node outside {BACKBONE}* reads the backbone's features: unexpected graph")
    titles = {i.name for i in model.graph.input if i.name == TITLE_INPUT}
    tail, reached = [], pooled | titles
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        if any(i in reached for i in node.input) and not node.name.startswith(BACKBONE):
            tail.append(node.name)
            reached.update(node.output)
    return tail


def to_fp16(src: str | Path, dst: str | Path) -> Path:
    """FP16 weights and activations; UINT8 input and FP32 outputs kept (see the module docstring)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(src)
    blocked = [n.name for n in _normalisation_nodes(model)] + fp32_tail(model)
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


def int8_exclusions(model: onnx.ModelProto, keep: Sequence[str] = ()) -> dict[str, list[str]]:
    """Names of the nodes kept out of INT8, by reason (recorded in the metadata)."""
    return {
        "stem_conv": [_stem_conv(model).name],
        "heads_and_gate": fp32_tail(model),
        "kept_by_request": kept_nodes(model, keep),
    }


def kept_nodes(model: onnx.ModelProto, keep: Sequence[str]) -> list[str]:
    """The graph's node names that ``keep`` asks for, in graph order: each entry is a node name or a regular
    expression matched against whole names (``/backbone/blocks/blocks\\.[0-2]/.*``: the first three
    stages). An entry that matches no node is an error, not a silent no-op."""
    names = [n.name for n in model.graph.node]
    wanted: set[str] = set()
    for entry in keep:
        if entry in names:
            wanted.add(entry)
            continue
        try:
            pattern = re.compile(entry)
        except re.error as e:
            why = f"no such node, and not a regular expression ({e})"
            raise ExportError(f"--int8-keep {entry!r}: {why}") from e
        matched = {n for n in names if pattern.fullmatch(n)}
        if not matched:
            raise ExportError(f"--int8-keep {entry!r} matches no node of the graph")
        wanted |= matched
    return [n for n in names if n in wanted]


def to_int8(
    src: str | Path,
    dst: str | Path,
    calibration: np.ndarray,
    keep: Sequence[str] = (),
    titles: np.ndarray | None = None,
) -> tuple[Path, dict[str, list[str]]]:
    """Static INT8 quantisation with Q/DQ nodes by NNCF, calibrated on ``calibration`` images (and, for a
    model that reads titles, their ``titles`` ids: the graph's second input).

    Returns the file and the excluded nodes by reason.
    """
    try:
        import nncf
    except ImportError as e:
        raise ExportError(
            "INT8 needs NNCF: pip install 'fashion-tagger[export]' (or pip install nncf)"
        ) from e

    if len(calibration) < 1:
        raise ExportError("INT8 calibration needs at least one image")
    nncf.set_log_level(logging.WARNING)  # its per-node INFO lines would drown the export's own tables
    model = onnx.load(src)
    excluded = int8_exclusions(model, keep)
    reads_titles = any(i.name == TITLE_INPUT for i in model.graph.input)
    if reads_titles and (titles is None or len(titles) != len(calibration)):
        raise ExportError("the model reads titles: INT8 calibration needs one title row per image")
    rows = [{INPUT_NAME: calibration[i : i + 1]} for i in range(len(calibration))]
    if reads_titles and titles is not None:
        rows = [{**row, TITLE_INPUT: titles[i : i + 1]} for i, row in enumerate(rows)]
    dataset = nncf.Dataset(rows)
    quantized = nncf.quantize(
        model,
        dataset,
        preset=nncf.QuantizationPreset.PERFORMANCE,
        subset_size=len(calibration),
        # Full bias correction (twice the time of the fast one): on the shipped model it halved the accuracy
        # loss (see the module docstring).
        fast_bias_correction=False,
        ignored_scope=nncf.IgnoredScope(
            names=[*excluded["stem_conv"], *excluded["heads_and_gate"], *excluded["kept_by_request"]],
            types=["Gemm", "MatMul", "Softmax"],
        ),
    )
    if count_ops(quantized, "QuantizeLinear") == 0:
        raise ExportError("INT8 quantisation produced no QuantizeLinear node (nothing was quantised)")
    _check_io(quantized, model)
    onnx.save(quantized, dst)
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
