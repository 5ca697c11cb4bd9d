"""``export_ensemble``: two checkpoints → a two-backbone ensemble that Triton serves under one model name.

A short sequence of typed steps, like ``export.pipeline``:

``load_members`` (both checkpoints; ``ExportError`` unless they share the label schema, naming the first
difference; models that read titles are refused for now) → ``pick_photos`` (member A's gate photos,
``export.images.export_images``: its validation split, or ``--calibration-data``) → ``export_members``
(each member's FP32 ONNX graph taking the same uint8 NHWC image, member B resizing it inside its own graph
when its input size differs; parity with PyTorch) → ``fit_weights`` (per attribute, the weight ``w`` of
member A in a grid 0, 0.1, …, 1 that maximises the log-likelihood of the labels, accuracy breaking ties)
→ ``build_graphs`` (the combiner graph ``w·pA + (1−w)·pB`` per output, and one composed graph holding both
members and the combiner; parity: the composed graph equals the weighted mix of the members run
separately) → ``publish``.

What ``publish`` writes for ``--name fashion`` (the gateway reads ``fashion/<version>/metadata.json`` and
asks Triton for ``fashion``, as for any model; it needs no change)::

    fashion_a/ fashion_b/     the members: ordinary model folders (export.repository), dynamic batching
    fashion_combine/          the combiner: model.onnx (onnxruntime_onnx for the NGC image; a python model
                              running it with ONNX Runtime for the pip Triton), dynamic batching
    fashion/                  the served name: <version>/model.onnx is the composed graph and
                              <version>/metadata.json the contract (the ensemble's record under
                              export.ensemble); configs:
        configs/cpu_ensemble.pbtxt   platform "ensemble": ensemble_scheduling sends the image to both
                                     members and their probabilities to the combiner
        configs/cpu_composed.pbtxt   the python backend running the composed graph
        configs/ngc_composed.pbtxt   the composed graph on onnxruntime_onnx (the NGC image)
        configs/cpu.pbtxt, config.pbtxt   the form served (``--ensemble-serve``; composed by default)

Both forms answer the same (tests/test_ensemble.py serves both with the pip Triton);
``fashion bench-ensemble`` (``loadtest.ensemble``) times them against each other through Triton and
``--apply`` switches ``cpu.pbtxt`` to the faster one.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from export.errors import ExportError, ParityError
from export.images import ExportImages, export_images
from export.onnx_export import export_onnx, run_torch
from export.parity import FP32_ATOL, agreement_table, compare
from export.repository import (
    ServingConfig,
    _batching,
    _write_atomic,
    io_lines,
    next_version,
    write_model_version,
)
from export.runtimes import run_all
from export.sessions import SessionSpec, open_session
from fashion.console import emit, table
from fashion.contract import Preprocessing
from fashion.metadata import build_metadata, file_sha256
from fashion.schema import LabelSchema
from training.checkpoint import Checkpoint, load_checkpoint, weights_digest

log = logging.getLogger(__name__)

Say = Callable[[str], None]
GRID = tuple(round(0.1 * i, 1) for i in range(11))  # the weight of member A; member B gets 1 - w
FORMS = ("composed", "ensemble")  # one ONNX graph holding both members, or Triton's ensemble scheduler
MEMBERS = ("a", "b")
EPS = 1e-12


def member_prefix(member: str) -> str:
    """The prefix of a member's tensors inside the composed graph and the combiner's inputs (``a__``)."""
    return f"{member}__"


@dataclass(frozen=True)
class EnsembleOptions:
    """What ``fashion export --ensemble A.pt B.pt`` does; checked on construction."""

    members: tuple[Path, Path]
    repository: Path = Path("model_repository")
    name: str = "fashion"
    calibration_data: Path | None = None  # labelled photos for the weights (default: A's validation split)
    gate_images: int = 500
    eval_images: int = 64  # of those, for the parity checks
    max_batch_size: int = 32
    cpu_threads: int = 2
    parity_atol: float = FP32_ATOL
    serve: str = "composed"  # which form configs/cpu.pbtxt and config.pbtxt serve (FORMS)

    def __post_init__(self) -> None:
        members = tuple(Path(m) for m in self.members)
        if len(members) != 2:
            raise ExportError(f"an ensemble has two members, got {len(members)}")
        object.__setattr__(self, "members", members)
        object.__setattr__(self, "repository", Path(self.repository))
        if self.calibration_data is not None:
            object.__setattr__(self, "calibration_data", Path(self.calibration_data))
        if self.serve not in FORMS:
            raise ExportError(f"--ensemble-serve must be one of {', '.join(FORMS)}, got {self.serve!r}")
        if self.gate_images < 2 or self.eval_images < 1:
            raise ExportError("gate_images must be at least 2 and eval_images at least 1")
        if self.parity_atol <= 0 or self.cpu_threads < 1:
            raise ExportError("parity_atol and cpu_threads must be positive")
        ServingConfig(max_batch_size=self.max_batch_size)  # validates the batch size early

    def member_name(self, member: str) -> str:
        return f"{self.name}_{member}"

    @property
    def combiner_name(self) -> str:
        return f"{self.name}_combine"


# ------------------------------------------------------------------------------------ the step values
@dataclass(frozen=True)
class Member:
    key: str  # "a" or "b"
    path: Path
    checkpoint: Checkpoint
    sha256: str

    @property
    def image_size(self) -> int:
        return self.checkpoint.preprocessing.image_size


@dataclass(frozen=True)
class Members:
    a: Member
    b: Member

    def __iter__(self) -> Any:
        return iter((self.a, self.b))

    @property
    def schema(self) -> LabelSchema:
        return self.a.checkpoint.schema

    @property
    def preprocessing(self) -> Preprocessing:
        """The ensemble's contract: member A's (member B resizes A's input inside its graph)."""
        return self.a.checkpoint.preprocessing


@dataclass(frozen=True)
class MemberGraph:
    member: Member
    path: Path  # takes uint8 NHWC at the ensemble's size
    resizes_to: int | None  # the member's own size when its graph resizes the ensemble's input to it
    outputs: tuple[np.ndarray, ...]  # ONNX Runtime's probabilities on the gate photos, schema order
    parity_max_abs_diff: float  # PyTorch vs ONNX Runtime


@dataclass(frozen=True)
class AttributeWeight:
    """The fitted weight of one attribute and what it gives on the labelled gate photos."""

    attribute: str
    weight: float  # of member A; member B gets 1 - weight
    labelled: int  # gate photos with a label for this attribute (0: the weight was not fitted, 0.5)
    accuracy: tuple[float | None, float | None, float | None]  # member A, member B, the ensemble
    log_likelihood: tuple[float | None, float | None, float | None]  # mean, same order

    def to_dict(self) -> dict[str, Any]:
        def pair(v: tuple[float | None, ...]) -> dict[str, float | None]:
            return dict(zip(("a", "b", "ensemble"), v, strict=True))

        return {
            "weight_a": self.weight,
            "labelled": self.labelled,
            "accuracy": pair(self.accuracy),
            "log_likelihood": pair(self.log_likelihood),
        }

    @classmethod
    def from_dict(cls, attribute: str, d: Mapping[str, Any]) -> AttributeWeight:
        keys = ("a", "b", "ensemble")
        acc, ll = d["accuracy"], d["log_likelihood"]
        return cls(
            attribute,
            float(d["weight_a"]),
            int(d["labelled"]),
            (acc["a"], acc["b"], acc["ensemble"]) if set(acc) == set(keys) else (None, None, None),
            (ll["a"], ll["b"], ll["ensemble"]) if set(ll) == set(keys) else (None, None, None),
        )


@dataclass(frozen=True)
class Graphs:
    combiner: Path
    composed: Path
    parity_max_abs_diff: float  # composed graph vs the members and the combiner run separately


@dataclass(frozen=True)
class EnsembleRecord:
    """The ``export.ensemble`` section of the served model's ``metadata.json``."""

    members: tuple[Mapping[str, Any], ...]
    weights: tuple[AttributeWeight, ...]
    photos: str
    grid: tuple[float, ...]
    parity_max_abs_diff: float
    served: str  # FORMS

    def weight(self, attribute: str) -> float:
        return next(w.weight for w in self.weights if w.attribute == attribute)

    def to_dict(self) -> dict[str, Any]:
        return {
            "members": [dict(m) for m in self.members],
            "combination": "w * p_a + (1 - w) * p_b per attribute (calibrated probabilities)",
            "weights": {w.attribute: w.to_dict() for w in self.weights},
            "fitted_on": self.photos,
            "grid": list(self.grid),
            "parity_composed_vs_members_max_abs_diff": self.parity_max_abs_diff,
            "served": self.served,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EnsembleRecord:
        return cls(
            members=tuple(d["members"]),
            weights=tuple(AttributeWeight.from_dict(k, v) for k, v in d["weights"].items()),
            photos=str(d["fitted_on"]),
            grid=tuple(float(g) for g in d["grid"]),
            parity_max_abs_diff=float(d["parity_composed_vs_members_max_abs_diff"]),
            served=str(d["served"]),
        )


@dataclass(frozen=True)
class EnsembleResult:
    version_dir: Path  # of the served model
    version: int
    member_dirs: tuple[Path, Path]
    combiner_dir: Path
    record: EnsembleRecord


# ------------------------------------------------------------------------------------------ the steps
def load_members(opts: EnsembleOptions) -> Members:
    """Both checkpoints; ``ExportError`` unless they share the schema, or when a model reads titles."""
    a, b = (
        Member(key, path, load_checkpoint(path), file_sha256(path))
        for key, path in zip(MEMBERS, opts.members, strict=True)
    )
    difference = schema_difference(a.checkpoint.schema, b.checkpoint.schema)
    if difference:
        raise ExportError(
            f"{a.path} and {b.path} do not share the label schema ({difference}): an ensemble averages "
            "the same classes of the same attributes; train both members on the same data and attributes"
        )
    for m in (a, b):
        if m.checkpoint.model.title is not None:
            raise ExportError(
                f"{m.path} reads titles: ensembles of title models are not supported yet; export it alone"
            )
    return Members(a, b)


def schema_difference(a: LabelSchema, b: LabelSchema) -> str | None:
    """The first difference between two schemas in words, or None when they are the same contract."""
    if a.names != b.names:
        return f"attributes {a.names} vs {b.names}"
    if a.category_column != b.category_column:
        return f"category column {a.category_column!r} vs {b.category_column!r}"
    for x, y in zip(a.attributes, b.attributes, strict=True):
        if x.classes != y.classes:
            only_a = [c for c in x.classes if c not in y.classes]
            only_b = [c for c in y.classes if c not in x.classes]
            which = f"only in A: {only_a}, only in B: {only_b}" if only_a or only_b else "in another order"
            return f"{x.name!r} classes differ ({which})"
        if (x.tensor, x.category) != (y.tensor, y.category):
            return f"{x.name!r}: tensor/category {x.tensor, x.category} vs {y.tensor, y.category}"
    return None


def pick_photos(opts: EnsembleOptions, members: Members) -> ExportImages:
    """Member A's gate photos (its validation split, or ``--calibration-data``), at the ensemble's size."""
    ckpt = members.a.checkpoint
    return export_images(
        ckpt,
        gate_count=max(opts.gate_images, opts.eval_images),
        calibration_count=0,
        data=opts.calibration_data,
        seed=ckpt.config.get("seed", 0),
    )


def export_members(
    opts: EnsembleOptions, members: Members, photos: ExportImages, work: Path, say: Say
) -> tuple[MemberGraph, MemberGraph]:
    """Each member's graph taking the ensemble's uint8 input, checked against PyTorch, and its outputs."""
    size = members.preprocessing.image_size
    images = photos.gate.images
    graphs = []
    for m in members:
        native = export_onnx(m.checkpoint.model, work / f"{m.key}.native.onnx")
        resizes_to = None if m.image_size == size else m.image_size
        path = native if resizes_to is None else resize_in_graph(native, size, work / f"{m.key}.onnx")
        session = open_session(_reference(opts), path)
        outputs = run_all(session, images)
        # PyTorch sees what the native graph sees: the photos at the member's own size
        seen = images if resizes_to is None else resize_batch(work, size, m.image_size, images)
        head = opts.eval_images
        rows = compare(
            m.checkpoint.schema, run_torch(m.checkpoint.model, seen[:head]), [o[:head] for o in outputs]
        )
        diff = max(r.max_abs_diff for r in rows)
        how = "" if resizes_to is None else f", resized {size}→{m.image_size} px inside its graph"
        say(agreement_table(rows, f"member {m.key} ({m.checkpoint.backbone}{how}): PyTorch vs ONNX Runtime"))
        if diff > opts.parity_atol:
            raise ParityError(
                f"member {m.key}: ONNX Runtime differs from PyTorch by {diff:.3g}; nothing was written"
            )
        graphs.append(MemberGraph(m, path, resizes_to, tuple(outputs), diff))
    return graphs[0], graphs[1]


def _reference(opts: EnsembleOptions) -> SessionSpec:
    return SessionSpec("onnxruntime", "fp32", opts.cpu_threads)


def resize_graph(src: int, dst: int) -> onnx.ModelProto:
    """uint8 NHWC ``[N, src, src, 3]`` → uint8 NHWC ``[N, dst, dst, 3]``, bilinear (half-pixel), rounded."""
    nodes = [
        helper.make_node("Cast", ["image"], ["resize__float"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["resize__float"], ["resize__nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Shape", ["resize__nchw"], ["resize__shape"]),
        helper.make_node("Slice", ["resize__shape", "resize__zero", "resize__two"], ["resize__nc"]),
        helper.make_node("Concat", ["resize__nc", "resize__hw"], ["resize__sizes"], axis=0),
        helper.make_node(
            "Resize",
            ["resize__nchw", "", "", "resize__sizes"],
            ["resize__out"],
            mode="linear",
            coordinate_transformation_mode="half_pixel",
        ),
        helper.make_node("Round", ["resize__out"], ["resize__round"]),
        helper.make_node("Clip", ["resize__round", "resize__lo", "resize__hi"], ["resize__clip"]),
        helper.make_node("Transpose", ["resize__clip"], ["resize__nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Cast", ["resize__nhwc"], ["resized"], to=TensorProto.UINT8),
    ]
    constants = [
        helper.make_tensor("resize__zero", TensorProto.INT64, [1], [0]),
        helper.make_tensor("resize__two", TensorProto.INT64, [1], [2]),
        helper.make_tensor("resize__hw", TensorProto.INT64, [2], [dst, dst]),
        helper.make_tensor("resize__lo", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("resize__hi", TensorProto.FLOAT, [], [255.0]),
    ]
    graph = helper.make_graph(
        nodes,
        "resize",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", src, src, 3])],
        [helper.make_tensor_value_info("resized", TensorProto.UINT8, ["batch", dst, dst, 3])],
        constants,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def resize_in_graph(native: Path, size: int, path: Path) -> Path:
    """``native`` (a member's graph at its own size) behind ``resize_graph``: it takes ``size`` px."""
    model = onnx.load(native)
    own = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    member = onnx.compose.add_prefix(model, "m__")
    outputs = [o.name for o in model.graph.output]
    wiring = [helper.make_node("Identity", ["resized"], ["m__image"])]
    wiring += [helper.make_node("Identity", [f"m__{name}"], [name]) for name in outputs]
    joined = _join(
        model,
        [resize_graph(size, own), member],
        wiring,
        inputs=[helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", size, size, 3])],
        outputs=list(model.graph.output),
    )
    onnx.save(joined, path)
    return path


def resize_batch(work: Path, src: int, dst: int, images: np.ndarray) -> np.ndarray:
    """What ``resize_graph`` makes of ``images`` (ONNX Runtime), for the PyTorch side of the parity."""
    path = work / f"resize_{src}_{dst}.onnx"
    onnx.save(resize_graph(src, dst), path)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"image": images})[0])


def _join(
    like: onnx.ModelProto,
    parts: Sequence[onnx.ModelProto],
    wiring: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
) -> onnx.ModelProto:
    """One graph of ``parts`` (their names already distinct) joined by ``wiring`` (Identity nodes), with
    ``like``'s opsets and IR version; checked by ``onnx.checker``."""
    graph = helper.make_graph(
        _topological([*wiring, *(n for p in parts for n in p.graph.node)]),
        "fashion_ensemble",
        list(inputs),
        list(outputs),
        [t for p in parts for t in p.graph.initializer],
    )
    model = helper.make_model(graph, opset_imports=list(like.opset_import))
    model.ir_version = like.ir_version
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the joined ensemble graph is invalid: {e}") from e
    return model


def _topological(nodes: Sequence[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where each comes after the nodes that produce its inputs (ONNX requires it)."""
    producer = {out: i for i, n in enumerate(nodes) for out in n.output}
    order: list[onnx.NodeProto] = []
    state = [0] * len(nodes)  # 0 new, 1 being placed, 2 placed
    for start in range(len(nodes)):
        stack = [(start, False)]
        while stack:
            i, ready = stack.pop()
            if ready:
                state[i] = 2
                order.append(nodes[i])
                continue
            if state[i]:
                continue
            state[i] = 1
            stack.append((i, True))
            inputs = [producer[x] for x in nodes[i].input if x in producer]
            stack += [(j, False) for j in inputs if not state[j]]
    return order


def fit_weights(
    schema: LabelSchema,
    a: Sequence[np.ndarray],
    b: Sequence[np.ndarray],
    labels: np.ndarray | None,
    grid: Sequence[float] = GRID,
) -> tuple[AttributeWeight, ...]:
    """Per attribute, the ``w`` of ``grid`` whose ``w·pA + (1−w)·pB`` gives the labelled photos the highest
    mean log-likelihood (then accuracy, then the weight nearest 0.5); 0.5 where no photo is labelled."""
    weights = []
    for j, attr in enumerate(schema.attributes):
        truth = None if labels is None else labels[:, j]
        known = np.zeros(len(a[j]), bool) if truth is None else truth >= 0
        if not known.any() or truth is None:
            weights.append(AttributeWeight(attr.name, 0.5, 0, (None, None, None), (None, None, None)))
            continue
        y = truth[known]
        pa, pb = np.asarray(a[j], np.float64)[known], np.asarray(b[j], np.float64)[known]

        def score(p: np.ndarray, y: np.ndarray = y) -> tuple[float, float]:
            ll = float(np.mean(np.log(p[np.arange(len(y)), y] + EPS)))
            return ll, float(np.mean(p.argmax(1) == y))

        scored = [(score(w * pa + (1 - w) * pb), -abs(w - 0.5), w) for w in grid]
        (ll, acc), _, best = max(scored)
        (ll_a, acc_a), (ll_b, acc_b) = score(pa), score(pb)
        weights.append(
            AttributeWeight(attr.name, float(best), int(known.sum()), (acc_a, acc_b, acc), (ll_a, ll_b, ll))
        )
    return tuple(weights)


def combiner_graph(
    schema: LabelSchema, weights: Sequence[AttributeWeight], like: onnx.ModelProto
) -> onnx.ModelProto:
    """``<tensor> = w·a__<tensor> + (1−w)·b__<tensor>`` per attribute: the one combination both forms run."""
    pa, pb = member_prefix("a"), member_prefix("b")
    nodes, inits, inputs, outputs = [], [], [], []
    for attr, w in zip(schema.attributes, weights, strict=True):
        t, k = attr.tensor, attr.num_classes
        for prefix in (pa, pb):
            inputs.append(helper.make_tensor_value_info(f"{prefix}{t}", TensorProto.FLOAT, ["batch", k]))
        outputs.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, ["batch", k]))
        inits += [
            helper.make_tensor(f"combine__{t}__wa", TensorProto.FLOAT, [], [w.weight]),
            helper.make_tensor(f"combine__{t}__wb", TensorProto.FLOAT, [], [1.0 - w.weight]),
        ]
        nodes += [
            helper.make_node("Mul", [f"{pa}{t}", f"combine__{t}__wa"], [f"combine__{t}__a"]),
            helper.make_node("Mul", [f"{pb}{t}", f"combine__{t}__wb"], [f"combine__{t}__b"]),
            helper.make_node("Add", [f"combine__{t}__a", f"combine__{t}__b"], [t]),
        ]
    graph = helper.make_graph(nodes, "combine", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=list(like.opset_import))
    model.ir_version = like.ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def build_graphs(
    opts: EnsembleOptions,
    members: Members,
    graphs: tuple[MemberGraph, MemberGraph],
    weights: Sequence[AttributeWeight],
    images: np.ndarray,
    work: Path,
    say: Say,
) -> Graphs:
    """The combiner and the composed graph; ``ParityError`` unless the composed graph equals the combiner
    applied to the members run separately (ONNX Runtime, the gate photos, ``parity_atol``)."""
    schema, size = members.schema, members.preprocessing.image_size
    like = onnx.load(graphs[0].path)
    combiner = combiner_graph(schema, weights, like)
    combiner_path = work / "combine.onnx"
    onnx.save(combiner, combiner_path)
    parts = [onnx.compose.add_prefix(onnx.load(g.path), member_prefix(g.member.key)) for g in graphs]
    wiring = [
        helper.make_node("Identity", ["image"], [f"{member_prefix(g.member.key)}image"]) for g in graphs
    ]
    composed = _join(
        like,
        [*parts, combiner],
        wiring,
        inputs=[helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", size, size, 3])],
        outputs=list(combiner.graph.output),
    )
    composed.doc_string = (
        f"fashion-tagger ensemble: {members.a.checkpoint.backbone} + {members.b.checkpoint.backbone}, "
        f"{len(schema.attributes)} attributes, uint8 NHWC {size}x{size} input"
    )
    composed_path = work / "model.onnx"
    onnx.save(composed, composed_path)
    separately = combine_outputs(combiner_path, graphs[0].outputs, graphs[1].outputs)
    together = run_all(open_session(_reference(opts), composed_path), images)
    rows = compare(schema, separately, together)
    diff = max(r.max_abs_diff for r in rows)
    say(agreement_table(rows, "composed graph vs the members and the combiner run separately (ONNX Runtime)"))
    if diff > opts.parity_atol:
        raise ParityError(f"the composed graph differs from its members by {diff:.3g}; nothing was written")
    return Graphs(combiner_path, composed_path, diff)


def combine_outputs(combiner: Path, a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The combiner graph run (ONNX Runtime) on the members' outputs, as the Triton ensemble runs it."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(combiner), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    given = {
        f"{member_prefix(key)}{name}": out
        for key, outs in zip(MEMBERS, (a, b), strict=True)
        for name, out in zip([o.name for o in session.get_outputs()], outs, strict=True)
    }
    return list(session.run(None, {n: np.ascontiguousarray(given[n], np.float32) for n in names}))


# ---------------------------------------------------------------------------------------- publishing
def ensemble_config(
    opts: EnsembleOptions, schema: LabelSchema, size: int, versions: Mapping[str, int]
) -> str:
    """The served name's ``platform: "ensemble"`` config: the image to both members, their probabilities
    to the combiner, the combiner's outputs served under the schema's tensor names. ``versions``: the
    member and combiner versions this ensemble version was fitted with."""
    steps = []
    for key in MEMBERS:
        name = opts.member_name(key)
        maps = ['      input_map { key: "image" value: "image" }']
        maps += [
            f'      output_map {{ key: "{a.tensor}" value: "{member_prefix(key)}{a.tensor}" }}'
            for a in schema.attributes
        ]
        steps.append(_step(name, versions[name], maps))
    maps = [
        f'      input_map {{ key: "{member_prefix(key)}{a.tensor}" value: "{member_prefix(key)}{a.tensor}" }}'
        for key in MEMBERS
        for a in schema.attributes
    ]
    maps += [f'      output_map {{ key: "{a.tensor}" value: "{a.tensor}" }}' for a in schema.attributes]
    steps.append(_step(opts.combiner_name, versions[opts.combiner_name], maps))
    lines = [
        f'name: "{opts.name}"',
        'platform: "ensemble"',
        f"max_batch_size: {opts.max_batch_size}",
        "version_policy: { latest: { num_versions: 1 } }",
        *io_lines(schema, size),
        "ensemble_scheduling {",
        "  step [",
        ",\n".join(steps),
        "  ]",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _step(model: str, version: int, maps: Sequence[str]) -> str:
    return "\n".join(
        ["    {", f'      model_name: "{model}"', f"      model_version: {version}", *maps, "    }"]
    )


def combiner_config(name: str, schema: LabelSchema, serving: ServingConfig, backend: str) -> str:
    """The combiner's config: ``python`` (pip Triton, ``export/triton_python_model.py``) or
    ``onnxruntime_onnx`` (NGC image), both running its ``model.onnx``, with dynamic batching."""
    head = (
        ['backend: "python"']
        if backend == "python"
        else [f'platform: "{backend}"', 'default_model_filename: "model.onnx"']
    )
    tensors = []
    for key in MEMBERS:
        for a in schema.attributes:
            tensor = f"{member_prefix(key)}{a.tensor}"
            tensors.append(f'  {{ name: "{tensor}" data_type: TYPE_FP32 dims: [ {a.num_classes} ] }}')
    outputs = [
        f'  {{ name: "{a.tensor}" data_type: TYPE_FP32 dims: [ {a.num_classes} ] }}'
        for a in schema.attributes
    ]
    kind = "KIND_CPU" if backend == "python" else "KIND_GPU"
    lines = [
        f'name: "{name}"',
        *head,
        f"max_batch_size: {serving.max_batch_size}",
        "version_policy: { latest: { num_versions: 1 } }",
        "input [",
        ",\n".join(tensors),
        "]",
        "output [",
        ",\n".join(outputs),
        "]",
        f"instance_group [ {{ count: 1, kind: {kind} }} ]",
        *_batching(serving),
    ]
    return "\n".join(lines) + "\n"


COMBINER_MODEL = Path(__file__).with_name("triton_python_model.py")  # one model.py for members and combiner


def write_combiner(
    opts: EnsembleOptions, schema: LabelSchema, combiner: Path, serving: ServingConfig
) -> Path:
    """``<name>_combine/<next version>/model.onnx`` + ``model.py`` and its configs."""
    model_dir = opts.repository / opts.combiner_name
    model_dir.mkdir(parents=True, exist_ok=True)
    version = next_version(model_dir)
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".staging-{version}-"))
    try:
        staging.joinpath("model.onnx").write_bytes(combiner.read_bytes())
        staging.joinpath("model.py").write_bytes(COMBINER_MODEL.read_bytes())
        staging.chmod(0o755)
        staging.rename(model_dir / str(version))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _write_atomic(
        model_dir / "config.pbtxt", combiner_config(opts.combiner_name, schema, serving, "onnxruntime_onnx")
    )
    _write_atomic(
        model_dir / "configs" / "cpu.pbtxt", combiner_config(opts.combiner_name, schema, serving, "python")
    )
    return model_dir / str(version)


def member_metadata(member: Member, size: int, resizes_to: int | None) -> dict[str, Any]:
    """A member's ``metadata.json``: its own contract at the ensemble's input size."""
    ckpt = member.checkpoint
    return build_metadata(
        schema=ckpt.schema,
        preprocessing=replace(ckpt.preprocessing, image_size=size),
        backbone=ckpt.backbone,
        temperatures=ckpt.temperatures(),
        thresholds=ckpt.thresholds,
        training=_training(member),
        export={"ensemble_member": member.key, "resizes_inside_graph_to": resizes_to},
    )


def _training(member: Member) -> dict[str, Any]:
    ckpt = member.checkpoint
    return {
        "checkpoint": str(member.path),
        "checkpoint_sha256": member.sha256,
        "weights_sha256": weights_digest(ckpt.model),
        "backbone": ckpt.backbone,
        "image_size": ckpt.preprocessing.image_size,
        "epoch": ckpt.epoch,
        "val_score": ckpt.val_score,
    }


def publish(
    opts: EnsembleOptions,
    members: Members,
    photos: ExportImages,
    graphs: tuple[MemberGraph, MemberGraph],
    built: Graphs,
    weights: Sequence[AttributeWeight],
) -> EnsembleResult:
    """The members, the combiner, then the served name (its configs last: they name the others' versions)."""
    schema, pre = members.schema, members.preprocessing
    size, serving = pre.image_size, ServingConfig(max_batch_size=opts.max_batch_size)
    warmup = photos.gate.images[0]
    member_dirs = []
    for g in graphs:
        member_dirs.append(
            write_model_version(
                opts.repository,
                opts.member_name(g.member.key),
                schema=schema,
                image_size=size,
                model_files={"fp32": g.path},
                metadata=member_metadata(g.member, size, g.resizes_to),
                warmup_image=warmup,
                serving=serving,
            )
        )
    combiner_dir = write_combiner(opts, schema, built.combiner, serving)
    record = EnsembleRecord(
        members=tuple(
            {
                **_training(g.member),
                "model": opts.member_name(g.member.key),
                "version": int(d.name),
                "resized_inside_graph_from": size if g.resizes_to else None,
                "parity_vs_pytorch_max_abs_diff": g.parity_max_abs_diff,
            }
            for g, d in zip(graphs, member_dirs, strict=True)
        ),
        weights=tuple(weights),
        photos=photos.gate.source,
        grid=GRID,
        parity_max_abs_diff=built.parity_max_abs_diff,
        served=opts.serve,
    )
    a, b = members.a.checkpoint, members.b.checkpoint
    metadata = build_metadata(
        schema=schema,
        preprocessing=pre,
        backbone=f"{a.backbone}+{b.backbone}",
        temperatures={},  # members' probabilities are calibrated inside their graphs; the mix is not rescaled
        thresholds=a.thresholds,
        training={"members": [dict(m) for m in record.members]},
        export={"ensemble": record.to_dict()},
    )
    version_dir = write_model_version(
        opts.repository,
        opts.name,
        schema=schema,
        image_size=size,
        model_files={"fp32": built.composed},
        metadata=metadata,
        warmup_image=warmup,
        serving=serving,
    )
    versions = {opts.member_name(g.member.key): int(d.name) for g, d in zip(graphs, member_dirs, strict=True)}
    versions[opts.combiner_name] = int(combiner_dir.name)
    write_forms(opts, schema, size, versions)
    return EnsembleResult(
        version_dir, int(version_dir.name), (member_dirs[0], member_dirs[1]), combiner_dir, record
    )


def write_forms(opts: EnsembleOptions, schema: LabelSchema, size: int, versions: Mapping[str, int]) -> None:
    """``configs/cpu_ensemble.pbtxt`` and ``configs/cpu_composed.pbtxt`` of the served name, and the form
    ``opts.serve`` names as ``configs/cpu.pbtxt`` (pip Triton) and ``config.pbtxt`` (NGC image)."""
    folder = opts.repository / opts.name
    ensemble = ensemble_config(opts, schema, size, versions)
    composed = (folder / "configs" / "cpu.pbtxt").read_text()  # written by write_model_version
    _write_atomic(folder / "configs" / "cpu_ensemble.pbtxt", ensemble)
    _write_atomic(folder / "configs" / "cpu_composed.pbtxt", composed)
    _write_atomic(folder / "configs" / "ngc_composed.pbtxt", (folder / "config.pbtxt").read_text())
    serve_form(folder, opts.serve)


def serve_form(model_dir: Path, form: str) -> None:
    """Make ``configs/cpu.pbtxt`` the ``form`` (``composed`` or ``ensemble``) of an ensemble's served model;
    the NGC image's ``config.pbtxt`` follows: the ensemble (its members have GPU configs), or the composed
    graph on ``onnxruntime_onnx`` (kept as ``configs/ngc_composed.pbtxt``)."""
    if form not in FORMS:
        raise ExportError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    source = model_dir / "configs" / f"cpu_{form}.pbtxt"
    if not source.is_file():
        raise ExportError(f"{source} is missing: {model_dir} is not an ensemble's served model")
    _write_atomic(model_dir / "configs" / "cpu.pbtxt", source.read_text())
    ngc = source if form == "ensemble" else model_dir / "configs" / "ngc_composed.pbtxt"
    _write_atomic(model_dir / "config.pbtxt", ngc.read_text())


# ---------------------------------------------------------------------------------------- the sequence
def export_ensemble(opts: EnsembleOptions, report: Say | None = None) -> EnsembleResult:
    """Run the whole ensemble export; ``report`` receives the tables (default: standard output)."""
    say = report or emit
    members = load_members(opts)
    photos = pick_photos(opts, members)
    with tempfile.TemporaryDirectory(prefix="fashion-ensemble-") as tmp:
        work = Path(tmp)
        graphs = export_members(opts, members, photos, work, say)
        weights = fit_weights(members.schema, graphs[0].outputs, graphs[1].outputs, photos.labels)
        say(weights_table(weights, members, photos.gate.source))
        built = build_graphs(opts, members, graphs, weights, photos.gate.images, work, say)
        result = publish(opts, members, photos, graphs, built, weights)
    say(
        f"wrote {result.version_dir} (served as the {opts.serve} form), {result.member_dirs[0]}, "
        f"{result.member_dirs[1]}, {result.combiner_dir}"
    )
    return result


def weights_table(weights: Sequence[AttributeWeight], members: Members, source: str) -> str:
    """Per attribute: the weight of member A and the accuracy of each member and of the ensemble."""

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    rows = [
        (
            w.attribute,
            f"{w.weight:.1f}",
            str(w.labelled),
            *(pct(v) for v in w.accuracy),
            *("-" if v is None else f"{v:.3f}" for v in w.log_likelihood),
        )
        for w in weights
    ]
    a, b = members.a.checkpoint.backbone, members.b.checkpoint.backbone
    header = [
        "attribute",
        "w(A)",
        "labelled",
        f"acc A ({a})",
        f"acc B ({b})",
        "acc ens",
        "ll A",
        "ll B",
        "ll ens",
    ]
    return f"ensemble weights fitted on {source}\n{table(header, rows)}"
