"""The model metadata format, ``<repository>/<model>/<version>/metadata.json``, in one place.

It is the only thing the gateway reads besides Triton: the preprocessing contract, the input tensor,
each output's attribute and classes, category → attributes, calibration/abstain settings, and where the
model came from. Format ``fashion-tagger/metadata@1`` (documented in ``model_repository/README.md``).

This module writes it (``build_metadata``, ``write_metadata``; the export), reads and checks it
(``load_metadata``, ``parse_metadata``; the gateway, deploy, the bench, ``fashion serve``), lists the
version folders that hold it, checksums the files it records and says where the model Triton serves
differs from it (``skew``). Torch-free and dependency-free, like all of ``fashion``.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fashion.contract import Preprocessing
from fashion.errors import UserError
from fashion.schema import LabelSchema
from fashion.text import INPUT_NAME as TITLE_INPUT
from fashion.text import TitleError, TitleTokenizer

FORMAT = "fashion-tagger/metadata@1"
FILENAME = "metadata.json"
INPUT_NAME = "image"  # the model's image input (uint8 NHWC), in the graph, the configs and here
CONFLICT_OUTPUT = "conflict"  # a title model's (N, attributes) output: photo and title disagree
TITLE_DATATYPE = "INT64"

# --- reading ------------------------------------------------------------------------------------------


class MetadataError(UserError, ValueError):
    """The metadata file is missing or does not describe a model the gateway can serve."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]
    layout: str


@dataclass(frozen=True)
class OutputSpec:
    """One attribute head: the Triton output tensor that holds its calibrated class probabilities."""

    attribute: str
    label: str
    category: str | None
    tensor: str
    datatype: str
    classes: tuple[str, ...]
    temperature: float = 1.0
    threshold: float | None = None  # top-1 confidence below it is flagged "uncertain"


@dataclass(frozen=True)
class TitleSpec:
    """A model's second input, the listing's title (``fashion.text``), and what it answers with it.

    In ``metadata.json`` the ``title`` section (absent, or null, for a model that reads photos only)::

        "title": {"input": "title", "datatype": "INT64", "shape": [-1, <max_tokens>],
                  "max_chars": 300, "tokenizer": {<TitleTokenizer.to_dict()>},
                  "conflict": {"output": "conflict", "thresholds": {"<attribute>": 0.62, ...}}}

    ``shape`` and ``max_chars`` are the tokenizer's ``max_tokens`` and ``max_chars``, written for readers
    in other languages and checked on reading. The input holds ``(N, max_tokens)`` int64 ids, all zeros for
    a request without a title (the model then answers exactly as from the photo alone). The ``conflict``
    output is ``(N, attributes)`` in the order of ``outputs``; an attribute is flagged when its score is
    above its threshold (an attribute without one is never flagged)."""

    tokenizer: TitleTokenizer
    input: str = TITLE_INPUT
    conflict_output: str = CONFLICT_OUTPUT
    conflict_thresholds: Mapping[str, float | None] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "conflict_thresholds", MappingProxyType(dict(self.conflict_thresholds)))

    @property
    def max_chars(self) -> int:
        """The longest title accepted (the gateway answers ``title_too_long`` beyond it)."""
        return self.tokenizer.max_chars

    @property
    def max_tokens(self) -> int:
        return self.tokenizer.max_tokens

    def conflicts(self, attribute: str, score: float) -> bool:
        """Whether ``score`` (the conflict output for ``attribute``) flags photo and title as disagreeing."""
        threshold = self.conflict_thresholds.get(attribute)
        return threshold is not None and score > threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "datatype": TITLE_DATATYPE,
            "shape": [-1, self.max_tokens],
            "max_chars": self.max_chars,
            "tokenizer": self.tokenizer.to_dict(),
            "conflict": {"output": self.conflict_output, "thresholds": dict(self.conflict_thresholds)},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], attributes: Sequence[str] | None = None) -> TitleSpec:
        """The section as ``to_dict`` writes it (``conflict`` may be missing: no attribute is flagged);
        ``MetadataError`` when it contradicts itself or names attributes not in ``attributes``."""
        try:
            tokenizer = TitleTokenizer.from_dict(dict(d["tokenizer"]))
        except (TitleError, TypeError, ValueError) as e:
            raise MetadataError(f"title.tokenizer: {e}") from e
        if d.get("datatype", TITLE_DATATYPE) != TITLE_DATATYPE:
            raise MetadataError(f"title.datatype must be {TITLE_DATATYPE}, got {d.get('datatype')!r}")
        shape = [int(v) for v in d.get("shape", [-1, tokenizer.max_tokens])]
        if shape != [-1, tokenizer.max_tokens] or int(d.get("max_chars", tokenizer.max_chars)) != (
            tokenizer.max_chars
        ):
            raise MetadataError(
                f"title.shape {shape} / max_chars {d.get('max_chars')} contradict the tokenizer's "
                f"max_tokens {tokenizer.max_tokens} / max_chars {tokenizer.max_chars}"
            )
        conflict = d.get("conflict") or {}
        thresholds = {str(k): _opt_float(v) for k, v in (conflict.get("thresholds") or {}).items()}
        unknown = sorted(set(thresholds) - set(attributes)) if attributes is not None else []
        if unknown:
            raise MetadataError(f"title.conflict.thresholds names attributes with no output: {unknown}")
        for name, value in thresholds.items():
            if value is not None and not (math.isfinite(value) and 0 <= value <= 1):
                raise MetadataError(f"title.conflict.thresholds[{name!r}] must be in [0, 1] or null")
        return cls(
            tokenizer=tokenizer,
            input=str(d.get("input") or TITLE_INPUT),
            conflict_output=str(conflict.get("output") or CONFLICT_OUTPUT),
            conflict_thresholds=thresholds,
        )


def title_spec(document: Any) -> TitleSpec | None:
    """The ``title`` section of a metadata document or of ``ModelMetadata.describe()`` (the gateway's
    ``GET /v1/models``), unchecked against the outputs; None when the model reads photos only."""
    declared = document.get("title") if isinstance(document, Mapping) else None
    if not isinstance(declared, Mapping):
        return None
    try:
        return TitleSpec.from_dict(declared)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MetadataError(f"malformed title section ({type(e).__name__}: {e})") from e


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    version: int
    precision: str
    backbone: str
    input: InputSpec
    preprocessing: Preprocessing
    outputs: tuple[OutputSpec, ...]
    category_column: str | None = None
    categories: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    path: str = ""
    title: TitleSpec | None = None  # the title input, for a model that reads titles

    @property
    def output_names(self) -> list[str]:
        """The outputs to ask Triton for: every head's tensor, then a title model's conflict scores."""
        heads = [o.tensor for o in self.outputs]
        return heads if self.title is None else [*heads, self.title.conflict_output]

    @property
    def input_names(self) -> list[str]:
        """The model's inputs: the image, then a title model's title ids."""
        return [self.input.name] if self.title is None else [self.input.name, self.title.input]

    def outputs_for(self, category: str | None) -> tuple[OutputSpec, ...]:
        """The heads to answer with: all of them, or a category's heads plus the unconditional ones."""
        if category is None:
            return self.outputs
        wanted = set(self.categories.get(category, ()))
        return tuple(o for o in self.outputs if o.attribute in wanted or o.category is None)

    def describe(self) -> dict[str, Any]:
        """The public view served by ``GET /v1/models``."""
        return {
            "name": self.name,
            "version": self.version,
            "precision": self.precision,
            "backbone": self.backbone,
            "input": {
                "name": self.input.name,
                "datatype": self.input.datatype,
                "shape": list(self.input.shape),
                "layout": self.input.layout,
            },
            "preprocessing": self.preprocessing.to_dict(),
            "title": None if self.title is None else self.title.to_dict(),
            "category_column": self.category_column,
            "categories": {k: list(v) for k, v in self.categories.items()},
            "attributes": [
                {
                    "name": o.attribute,
                    "label": o.label,
                    "category": o.category,
                    "classes": list(o.classes),
                    "threshold": o.threshold,
                }
                for o in self.outputs
            ],
        }


def available_versions(repository: str | Path, model_name: str) -> list[int]:
    """Integer version folders of ``model_name`` that hold a metadata file, ascending."""
    return version_folders(Path(repository) / model_name, with_metadata=True)


def resolve_version(repository: str | Path, model_name: str, version: str | int = "") -> int:
    """``version`` if given, else the highest version folder with a metadata file."""
    if str(version):
        return int(version)
    versions = available_versions(repository, model_name)
    if not versions:
        raise MetadataError(
            f"no {model_name}/<version>/{FILENAME} under {Path(repository).resolve()}; "
            "export a model there or set FASHION_MODEL_REPOSITORY"
        )
    return versions[-1]


def load_metadata(repository: str | Path, model_name: str, version: str | int = "") -> ModelMetadata:
    """Read and check ``<repository>/<model_name>/<version>/metadata.json``."""
    number = resolve_version(repository, model_name, version)
    path = Path(repository) / model_name / str(number) / FILENAME
    meta = parse_metadata(read_document(path), source=str(path))
    if meta.name != model_name or meta.version != number:
        raise MetadataError(
            f"{path} describes model {meta.name!r} version {meta.version}, but lies in the folder of "
            f"{model_name!r} version {number}; re-export the model"
        )
    return meta


def parse_metadata(data: Any, source: str = "metadata") -> ModelMetadata:
    """Check a decoded metadata document; raise ``MetadataError`` saying what is wrong."""
    try:
        return _parse(data, source)
    except MetadataError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MetadataError(f"{source}: malformed metadata ({type(e).__name__}: {e})") from e


def _parse(data: Any, source: str) -> ModelMetadata:
    def fail(message: str) -> MetadataError:
        return MetadataError(f"{source}: {message}")

    if not isinstance(data, dict):
        raise fail("the top level must be a JSON object")
    if data.get("format") != FORMAT:
        raise fail(f"format is {data.get('format')!r}, this gateway reads {FORMAT!r}")
    model = data["model"]
    version = model["version"]
    if isinstance(version, bool) or not str(version).isdigit():
        raise fail(f"model.version must be a positive integer, got {version!r}")
    pre = Preprocessing.from_dict(data["preprocessing"])

    raw_in = data["input"]
    shape = tuple(int(v) for v in raw_in["shape"])
    inp = InputSpec(str(raw_in["name"]), str(raw_in["datatype"]), shape, str(raw_in.get("layout", "NHWC")))
    expected = (-1, pre.image_size, pre.image_size, 3)
    if inp.datatype != "UINT8" or inp.layout != "NHWC" or shape != expected:
        raise fail(
            f"input must be UINT8 NHWC {list(expected)} (from the preprocessing contract), "
            f"got {inp.datatype} {inp.layout} {list(shape)}"
        )

    outputs = []
    for raw in data["outputs"]:
        classes = tuple(str(c) for c in raw["classes"])
        threshold = raw.get("threshold")
        temperature = float(raw.get("temperature", 1.0))
        if threshold is not None and not (isinstance(threshold, int | float) and 0 <= threshold <= 1):
            raise fail(f"output {raw.get('attribute')!r}: threshold must be in [0, 1] or null")
        if not math.isfinite(temperature) or temperature <= 0:
            raise fail(f"output {raw.get('attribute')!r}: temperature must be positive")
        outputs.append(
            OutputSpec(
                attribute=str(raw["attribute"]),
                label=str(raw.get("label") or raw["attribute"]),
                category=None if raw.get("category") is None else str(raw["category"]),
                tensor=str(raw["tensor"]),
                datatype=str(raw.get("datatype", "FP32")),
                classes=classes,
                temperature=temperature,
                threshold=None if threshold is None else float(threshold),
            )
        )
    if not outputs:
        raise fail("outputs is empty")
    for o in outputs:
        if not o.classes or len(set(o.classes)) != len(o.classes):
            raise fail(f"output {o.attribute!r} has no classes or duplicate classes")
        if o.datatype != "FP32":
            raise fail(f"output {o.attribute!r} has datatype {o.datatype}; FP32 probabilities expected")
    for key in ("attribute", "tensor"):
        values = [getattr(o, key) for o in outputs]
        if len(set(values)) != len(values):
            raise fail(f"output {key}s are not unique: {values}")

    names = {o.attribute for o in outputs}
    categories: dict[str, tuple[str, ...]] = {}
    for category, attributes in (data.get("categories") or {}).items():
        unknown = [a for a in attributes if a not in names]
        if unknown:
            raise fail(f"category {category!r} lists attributes with no output: {unknown}")
        categories[str(category)] = tuple(attributes)
    title = None
    if data.get("title") is not None:
        try:
            title = TitleSpec.from_dict(data["title"], [o.attribute for o in outputs])
        except MetadataError as e:
            raise fail(str(e)) from e
        if title.input == inp.name or title.conflict_output in {o.tensor for o in outputs}:
            raise fail(
                f"the title's tensors {title.input!r}, {title.conflict_output!r} reuse other tensors' names"
            )

    return ModelMetadata(
        name=str(model["name"]),
        version=int(version),
        precision=str(model.get("precision", "")),
        backbone=str(model.get("backbone", "")),
        input=inp,
        preprocessing=pre,
        outputs=tuple(outputs),
        category_column=data.get("category_column"),
        categories=MappingProxyType(categories),
        path=source,
        title=title,
    )


# --- the files around it ------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def version_folders(model_dir: str | Path, *, with_metadata: bool = False) -> list[int]:
    """The numeric version folders of a model (ascending); only those holding ``metadata.json`` if asked."""
    root = Path(model_dir)
    if not root.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in root.iterdir()
        if p.is_dir() and p.name.isdigit() and (not with_metadata or (p / FILENAME).is_file())
    )


# --- writing ------------------------------------------------------------------------------------------


def build_metadata(
    *,
    schema: LabelSchema,
    preprocessing: Preprocessing,
    backbone: str,
    temperatures: Mapping[str, float],
    thresholds: Mapping[str, float],
    record: ExportRecord | None = None,
    training: Mapping[str, Any] | None = None,
    export: Mapping[str, Any] | None = None,
    precision: str = "fp32",
    runtime: str = "onnxruntime",
    title: TitleSpec | None = None,
) -> dict[str, Any]:
    """The metadata document; ``model.name`` and ``model.version`` are set by the repository writer.

    ``record`` (what the export measured and chose) fills the ``training`` and ``export`` sections and the
    served runtime and precision; without one (hand-made test models) ``training``, ``export``,
    ``precision`` and ``runtime`` are written as given. ``title``: the title input of a model that reads
    titles (``TitleSpec``), written as the ``title`` section (null for a model that reads photos only)."""
    size = preprocessing.image_size
    if record is not None:
        precision, runtime = record.chosen.precision, record.chosen.runtime
        sections = record.to_dict()
    else:
        sections = {
            "training": dict(training or {}),
            "export": {
                "created_unix_s": round(time.time(), 3),
                "host_python": platform.python_version(),
                **(export or {}),
            },
        }
    return {
        "format": FORMAT,
        "model": {
            "name": None,
            "version": None,
            "precision": precision,
            "runtime": runtime,  # what configs/cpu.pbtxt runs (export.runtimes)
            "backbone": backbone,
        },
        "input": {"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, size, size, 3], "layout": "NHWC"},
        "title": None if title is None else title.to_dict(),
        "preprocessing": preprocessing.to_dict(),
        "category_column": schema.category_column,
        "categories": schema.categories,
        "outputs": [
            {
                "attribute": a.name,
                "label": a.label,
                "category": a.category,
                "tensor": a.tensor,
                "datatype": "FP32",
                "classes": list(a.classes),
                "temperature": float(temperatures.get(a.name, 1.0)),
                "threshold": thresholds.get(a.name),
            }
            for a in schema.attributes
        ],
        **sections,
    }


def write_metadata(version_dir: str | Path, doc: Mapping[str, Any]) -> Path:
    """Write ``doc`` as ``<version_dir>/metadata.json`` (checked first: nothing unreadable is written)."""
    parse_metadata(doc, source=f"{version_dir}/{FILENAME} (being written)")
    if "cpu" in doc.get("export", {}):  # an export's document: its record must read back too
        parse_export_record(doc, source=f"{version_dir}/{FILENAME} (being written)")
    path = Path(version_dir) / FILENAME
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def read_document(path: str | Path) -> Any:
    """The decoded JSON of a metadata file, unchecked (``parse_metadata`` checks; ``load_metadata`` does
    both). For readers that need fields the gateway does not model, e.g. ``export.cpu`` for the bench."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise MetadataError(f"{path} does not exist") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MetadataError(f"{path} is not readable JSON: {e}") from e


# --- the export record: what the export measured and chose (the ``training`` and ``export`` sections) ----
#
# Typed values with their own ``to_dict``/``from_dict``; nobody else indexes these keys. The export builds
# an ``ExportRecord`` and writes it with ``build_metadata``; ``fashion serve`` (which checkpoint a version
# came from), ``fashion bench`` (the ranking of the CPU candidates) and the gateway read it back with
# ``load_export_record``.


class PhotoOrigin(StrEnum):
    """Where the photos an export gates and calibrates on come from."""

    REAL = "real"  # a catalogue of real product photos
    SYNTHETIC_CATALOGUE = "synthetic_catalogue"  # a folder written by `fashion synth`: renders, not photos
    SYNTHETIC_RENDERS = "synthetic_renders"  # rendered by the export itself (no catalogue on disk)


@dataclass(frozen=True)
class PhotoSet:
    """A set of photos the export used: where from, how many, and whether they are real photos."""

    source: str
    images: int
    origin: PhotoOrigin = PhotoOrigin.REAL
    titles: int | None = None  # of a title model's photos, how many carry their listing's title

    @property
    def real_photos(self) -> bool:
        return self.origin is PhotoOrigin.REAL

    def to_dict(self) -> dict[str, Any]:
        out = {
            "source": self.source,
            "images": self.images,
            "origin": self.origin.value,
            "real_photos": self.real_photos,
        }
        return out if self.titles is None else {**out, "titles": self.titles}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PhotoSet:
        origin = d.get("origin") or (PhotoOrigin.REAL if d.get("real_photos", True) else "synthetic_renders")
        titles = d.get("titles")
        return cls(
            str(d["source"]), int(d["images"]), PhotoOrigin(origin), None if titles is None else int(titles)
        )


@dataclass(frozen=True)
class ExportPhotos:
    """The gate photos (parity and the accuracy gate) and the INT8 calibration photos."""

    gate: PhotoSet
    labelled: bool
    calibration: PhotoSet | None = None

    @property
    def real_photos(self) -> bool:
        return self.gate.real_photos and (self.calibration is None or self.calibration.real_photos)

    def to_dict(self) -> dict[str, Any]:
        return {
            "gate": {**self.gate.to_dict(), "labelled": self.labelled},
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "real_photos": self.real_photos,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExportPhotos:
        real = bool(d.get("real_photos", True))
        gate = {"real_photos": real, **d["gate"]}
        calibration = d.get("calibration")
        return cls(
            PhotoSet.from_dict(gate),
            bool(d["gate"].get("labelled", False)),
            None if calibration is None else PhotoSet.from_dict({"real_photos": real, **calibration}),
        )


@dataclass(frozen=True)
class FlagAgreement:
    """How often a candidate raises a flag (e.g. ``uncertain``) on the same photos as FP32.

    Photos whose FP32 confidence lies within ``margin`` of the flag's threshold are not counted
    (``at_threshold``): there, a float's last bit decides, and no user could tell the two answers apart."""

    flag: str
    threshold: float | None
    margin: float
    agreement: float
    images: int
    at_threshold: int
    raised_fp32: int  # photos FP32 flags
    raised: int  # photos the candidate flags

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FlagAgreement:
        threshold = d.get("threshold")
        return cls(
            flag=str(d["flag"]),
            threshold=None if threshold is None else float(threshold),
            margin=float(d["margin"]),
            agreement=float(d["agreement"]),
            images=int(d["images"]),
            at_threshold=int(d["at_threshold"]),
            raised_fp32=int(d["raised_fp32"]),
            raised=int(d["raised"]),
        )


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class AttributeVerdict:
    """One attribute of a candidate against FP32 on the gate photos: what a user receives, compared.

    ``failures`` says in words which rule it broke (empty: it passed)."""

    attribute: str
    agreement: float  # top-1 agreement with FP32 on photos whose two best FP32 classes are not a near-tie
    agreement_images: int
    near_ties: int
    max_abs_diff: float  # largest |Δp| over every class of every photo
    confidence_max_delta: float = 0.0  # largest |Δ top-1 confidence|
    confidence_mean_delta: float = 0.0  # mean |Δ top-1 confidence|
    top_k: int = 3
    top_k_agreement: float = 1.0  # the top-k list is FP32's, up to near-ties
    flags: tuple[FlagAgreement, ...] = ()
    labelled_images: int | None = None
    accuracy_fp32: float | None = None
    accuracy: float | None = None
    ece_fp32: float | None = None  # expected calibration error of the top-1 confidence vs the labels
    ece: float | None = None
    failures: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def accuracy_delta(self) -> float | None:
        if self.accuracy is None or self.accuracy_fp32 is None:
            return None
        return self.accuracy - self.accuracy_fp32

    def flag(self, name: str) -> FlagAgreement | None:
        return next((f for f in self.flags if f.flag == name), None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "attribute": self.attribute,
            "agreement": self.agreement,
            "agreement_images": self.agreement_images,
            "near_ties": self.near_ties,
            "max_abs_diff": self.max_abs_diff,
            "confidence": {
                "max_abs_delta": self.confidence_max_delta,
                "mean_abs_delta": self.confidence_mean_delta,
                "ece_fp32": self.ece_fp32,
                "ece": self.ece,
            },
            "top_k": {"k": self.top_k, "agreement": self.top_k_agreement},
            "flags": [f.to_dict() for f in self.flags],
        }
        if self.labelled_images is not None:
            out.update(
                labelled_images=self.labelled_images,
                accuracy_fp32=self.accuracy_fp32,
                accuracy=self.accuracy,
            )
            if self.accuracy_delta is not None:
                out["accuracy_delta"] = round(self.accuracy_delta, 4)
        out["failures"] = list(self.failures)
        out["passed"] = self.passed
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AttributeVerdict:
        confidence = d.get("confidence") or {}
        top_k = d.get("top_k") or {}
        labelled = d.get("labelled_images")
        failures = tuple(str(f) for f in d.get("failures", ()))
        if not failures and d.get("passed") is False:  # written before failures were recorded
            failures = ("failed the gate",)
        return cls(
            attribute=str(d["attribute"]),
            agreement=float(d["agreement"]),
            agreement_images=int(d["agreement_images"]),
            near_ties=int(d["near_ties"]),
            max_abs_diff=float(d["max_abs_diff"]),
            confidence_max_delta=float(confidence.get("max_abs_delta", 0.0)),
            confidence_mean_delta=float(confidence.get("mean_abs_delta", 0.0)),
            top_k=int(top_k.get("k", 3)),
            top_k_agreement=float(top_k.get("agreement", 1.0)),
            flags=tuple(FlagAgreement.from_dict(f) for f in d.get("flags", ())),
            labelled_images=None if labelled is None else int(labelled),
            accuracy_fp32=_opt_float(d.get("accuracy_fp32")),
            accuracy=_opt_float(d.get("accuracy")),
            ece_fp32=_opt_float(confidence.get("ece_fp32")),
            ece=_opt_float(confidence.get("ece")),
            failures=failures,
        )


@dataclass(frozen=True)
class GateVerdict:
    """A candidate's accuracy gate against FP32: per attribute, and the rule it was held to."""

    attributes: tuple[AttributeVerdict, ...]
    images: int
    labelled: bool
    rule: str

    @property
    def passed(self) -> bool:
        return all(a.passed for a in self.attributes)

    @property
    def failed(self) -> tuple[str, ...]:
        """The attributes that failed, in schema order."""
        return tuple(a.attribute for a in self.attributes if not a.passed)

    def attribute(self, name: str) -> AttributeVerdict:
        return next(a for a in self.attributes if a.attribute == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "images": self.images,
            "labelled": self.labelled,
            "rule": self.rule,
            "attributes": [a.to_dict() for a in self.attributes],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GateVerdict:
        return cls(
            attributes=tuple(AttributeVerdict.from_dict(a) for a in d["attributes"]),
            images=int(d["images"]),
            labelled=bool(d["labelled"]),
            rule=str(d.get("rule", "")),
        )


@dataclass(frozen=True)
class CandidateRecord:
    """One CPU candidate (a runtime running one file at one precision): its gate, its timing, its verdict."""

    runtime: str
    precision: str
    file: str
    config_name: str  # configs/<config_name>.pbtxt runs it (written when it passed or was forced)
    unavailable: str | None = None  # why it could not run here
    # batch size -> images/s, timed taking turns with the other candidates
    throughput_ips: Mapping[int, float] = field(default_factory=lambda: MappingProxyType({}))
    gate: GateVerdict | None = None
    forced: bool = False  # failed the gate, written anyway (--force); never served

    def __post_init__(self) -> None:
        object.__setattr__(self, "throughput_ips", MappingProxyType(dict(self.throughput_ips)))

    @property
    def name(self) -> str:
        return f"{self.runtime}-{self.precision}"

    @property
    def passed(self) -> bool:
        return self.unavailable is None and self.gate is not None and self.gate.passed

    @property
    def configured(self) -> bool:
        """Whether the export wrote ``configs/<config_name>.pbtxt`` for it."""
        return self.passed or self.forced

    @property
    def best_batch(self) -> int | None:
        rates = self.throughput_ips
        return max(rates, key=rates.__getitem__) if rates else None

    @property
    def best_ips(self) -> float:
        return max(self.throughput_ips.values(), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "precision": self.precision,
            "file": self.file,
            "config": f"configs/{self.config_name}.pbtxt" if self.configured else None,
            "config_name": self.config_name,
            "unavailable": self.unavailable,
            "throughput_ips": {str(b): round(v, 1) for b, v in sorted(self.throughput_ips.items())},
            "best_batch": self.best_batch,
            "passed_gate": self.passed,
            "forced": self.forced,
            "gate": None if self.gate is None else self.gate.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CandidateRecord:
        config = d.get("config")
        name = d.get("config_name") or (
            Path(config).stem if config else f"cpu_{d['runtime']}_{d['precision']}"
        )
        return cls(
            runtime=str(d["runtime"]),
            precision=str(d["precision"]),
            file=str(d["file"]),
            config_name=str(name),
            unavailable=d.get("unavailable"),
            throughput_ips={int(b): float(v) for b, v in (d.get("throughput_ips") or {}).items()},
            gate=None if d.get("gate") is None else GateVerdict.from_dict(d["gate"]),
            forced=bool(d.get("forced", False)),
        )


@dataclass(frozen=True)
class HostRecord:
    """The exporting CPU: its name, the ISA flags that matter, OpenVINO's version and view of it."""

    model: str
    flags: tuple[str, ...]
    openvino: str | None
    openvino_capabilities: tuple[str, ...]

    @property
    def bf16(self) -> bool:
        return "BF16" in self.openvino_capabilities

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "flags": list(self.flags),
            "openvino": self.openvino,
            "openvino_capabilities": list(self.openvino_capabilities),
            "bf16": self.bf16,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HostRecord:
        return cls(
            str(d["model"]),
            tuple(d.get("flags", ())),
            d.get("openvino"),
            tuple(d.get("openvino_capabilities", ())),
        )


@dataclass(frozen=True)
class TimingRecord:
    """How the candidates were timed: batch sizes, rounds taking turns, seconds per turn."""

    batches: tuple[int, ...]
    rounds: int
    seconds_per_turn: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "batches": list(self.batches),
            "rounds": self.rounds,
            "seconds_per_turn": self.seconds_per_turn,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TimingRecord:
        return cls(tuple(int(b) for b in d["batches"]), int(d["rounds"]), float(d["seconds_per_turn"]))


@dataclass(frozen=True)
class CpuRecord:
    """Every CPU candidate, gated and timed, and the one ``configs/cpu.pbtxt`` serves (and why)."""

    host: HostRecord
    threads: int
    timing: TimingRecord
    candidates: tuple[CandidateRecord, ...]
    chosen: CandidateRecord
    why: str

    def __post_init__(self) -> None:
        if self.chosen not in self.candidates:
            raise MetadataError(f"the chosen candidate {self.chosen.name} is not one of the candidates")

    @property
    def ranking(self) -> tuple[CandidateRecord, ...]:
        """The candidates that passed the gate, fastest first (the chosen one first)."""
        passed = [c for c in self.candidates if c.passed]
        return tuple(sorted(passed, key=lambda c: (c is not self.chosen, -c.best_ips)))

    def candidate(self, name: str) -> CandidateRecord | None:
        return next((c for c in self.candidates if c.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host.to_dict(),
            "threads": self.threads,
            "timing": self.timing.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
            "chosen": {**self.chosen.to_dict(), "why": self.why},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CpuRecord:
        candidates = tuple(CandidateRecord.from_dict(c) for c in d["candidates"])
        chosen = d["chosen"]
        match = next(
            c for c in candidates if (c.runtime, c.precision) == (chosen["runtime"], chosen["precision"])
        )
        return cls(
            host=HostRecord.from_dict(d["host"]),
            threads=int(d["threads"]),
            timing=TimingRecord.from_dict(d["timing"]),
            candidates=candidates,
            chosen=match,
            why=str(chosen.get("why", "")),
        )


@dataclass(frozen=True)
class ParityRow:
    """PyTorch vs ONNX Runtime FP32 for one attribute (``export.parity.compare``)."""

    attribute: str
    max_abs_diff: float
    argmax_agreement: float
    decisive_agreement: float
    images: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ParityRow:
        return cls(
            str(d["attribute"]),
            float(d["max_abs_diff"]),
            float(d["argmax_agreement"]),
            float(d["decisive_agreement"]),
            int(d["images"]),
        )


@dataclass(frozen=True)
class ParityRecord:
    """The parity check of the exported FP32 graph against PyTorch."""

    tolerance_abs: float
    images: int
    source: str
    attributes: tuple[ParityRow, ...]
    reference: str = "pytorch"
    candidate: str = "onnxruntime-fp32"
    # Photos left out of max |Δp| because the novelty gate's distance sits at its threshold there (a step
    # that a float's last bit flips); counted, not hidden.
    at_gate_threshold: int = 0
    # A title model: ``attributes`` are the photos sent with their titles; these the same photos without
    # (all-zero title ids), and the largest |Δ| of the conflict scores (photos with titles).
    without_title: tuple[ParityRow, ...] = ()
    conflict_max_abs_diff: float | None = None

    @property
    def max_abs_diff(self) -> float:
        """The largest |Δ| of any probability, with or without titles, or conflict score."""
        rows = [*self.attributes, *self.without_title]
        return max([r.max_abs_diff for r in rows] + [self.conflict_max_abs_diff or 0.0])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "reference": self.reference,
            "candidate": self.candidate,
            "tolerance_abs": self.tolerance_abs,
            "images": self.images,
            "source": self.source,
            "at_gate_threshold": self.at_gate_threshold,
            "attributes": [r.to_dict() for r in self.attributes],
        }
        if self.conflict_max_abs_diff is not None:
            out["title"] = {
                "without_title": [r.to_dict() for r in self.without_title],
                "conflict_max_abs_diff": self.conflict_max_abs_diff,
            }
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ParityRecord:
        title = d.get("title") or {}
        conflict = title.get("conflict_max_abs_diff")
        return cls(
            tolerance_abs=float(d["tolerance_abs"]),
            images=int(d["images"]),
            source=str(d["source"]),
            attributes=tuple(ParityRow.from_dict(r) for r in d["attributes"]),
            reference=str(d.get("reference", "pytorch")),
            candidate=str(d.get("candidate", "onnxruntime-fp32")),
            at_gate_threshold=int(d.get("at_gate_threshold", 0)),
            without_title=tuple(ParityRow.from_dict(r) for r in title.get("without_title", ())),
            conflict_max_abs_diff=None if conflict is None else float(conflict),
        )


@dataclass(frozen=True)
class Quantisation:
    """How the INT8 file was made: the quantiser, its calibration photos, the nodes kept in FP32."""

    quantiser: str
    calibration: PhotoSet
    excluded_nodes: Mapping[str, tuple[str, ...]]  # reason -> node names
    keep_patterns: tuple[str, ...]
    keep_from: str | None
    quantize_linear_nodes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantiser": self.quantiser,
            "calibration": self.calibration.to_dict(),
            "excluded_nodes": {k: list(v) for k, v in self.excluded_nodes.items()},
            "keep": {"patterns": list(self.keep_patterns), "from": self.keep_from},
            "quantize_linear_nodes": self.quantize_linear_nodes,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Quantisation:
        keep = d.get("keep") or {}
        return cls(
            quantiser=str(d["quantiser"]),
            calibration=PhotoSet.from_dict(d["calibration"]),
            excluded_nodes=MappingProxyType({k: tuple(v) for k, v in d["excluded_nodes"].items()}),
            keep_patterns=tuple(keep.get("patterns", ())),
            keep_from=keep.get("from"),
            quantize_linear_nodes=int(d["quantize_linear_nodes"]),
        )


@dataclass(frozen=True)
class VariantRecord:
    """A reduced-precision file (FP16, INT8): its gates by candidate, and whether it was written."""

    precision: str
    file: str
    gates: Mapping[str, GateVerdict]  # candidate (or variant) name -> verdict
    written: bool
    forced: bool = False  # failed the gate and written anyway (--force)
    quantisation: Quantisation | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "gates", MappingProxyType(dict(self.gates)))

    @property
    def passed(self) -> bool:
        """Whether any of its candidates passed the gate."""
        return any(g.passed for g in self.gates.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            **(self.quantisation.to_dict() if self.quantisation is not None else {}),
            "written": self.written,
            "forced": self.forced,
            "gate": {name: g.to_dict() for name, g in self.gates.items()},
        }

    @classmethod
    def from_dict(cls, precision: str, d: Mapping[str, Any]) -> VariantRecord:
        return cls(
            precision=precision,
            file=str(d["file"]),
            gates=_variant_gates(precision, d.get("gate") or {}),
            written=bool(d.get("written", True)),
            forced=bool(d.get("forced", False)),
            quantisation=Quantisation.from_dict(d) if "quantiser" in d else None,
        )


def _variant_gates(precision: str, doc: Mapping[str, Any]) -> dict[str, GateVerdict]:
    if "attributes" in doc:  # one verdict, as FP16's was written before the record
        return {precision: GateVerdict.from_dict(doc)}
    return {name: GateVerdict.from_dict(g) for name, g in doc.items()}


@dataclass(frozen=True)
class FileRecord:
    precision: str
    file: str
    bytes: int


@dataclass(frozen=True)
class TrainingRecord:
    """Which checkpoint a version was exported from, and how that checkpoint was trained."""

    checkpoint_sha256: str
    weights_sha256: str
    run_config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    epoch: int | None = None
    val_score: float | None = None
    val_metrics: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    novelty: Mapping[str, Any] | None = None  # the gate inside the graph (training.novelty), or None
    checkpoint_path: str | None = None  # the file exported, resolved (None in records written before)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint_path": self.checkpoint_path,
            "run_config": dict(self.run_config),
            "epoch": self.epoch,
            "val_score": self.val_score,
            "val_metrics": dict(self.val_metrics),
            "weights_sha256": self.weights_sha256,
            "checkpoint_sha256": self.checkpoint_sha256,
            "novelty": None if self.novelty is None else dict(self.novelty),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainingRecord:
        return cls(
            checkpoint_sha256=str(d["checkpoint_sha256"]),
            weights_sha256=str(d.get("weights_sha256", "")),
            run_config=MappingProxyType(dict(d.get("run_config") or {})),
            epoch=d.get("epoch"),
            val_score=_opt_float(d.get("val_score")),
            val_metrics=MappingProxyType(dict(d.get("val_metrics") or {})),
            novelty=d.get("novelty"),
            checkpoint_path=d.get("checkpoint_path"),
        )


@dataclass(frozen=True)
class ExportRecord:
    """What one export measured and chose: the ``training`` and ``export`` sections of ``metadata.json``.

    Written by ``export.pipeline`` (through ``build_metadata``); read with ``load_export_record`` by
    ``fashion serve`` (is this version the checkpoint's?), ``fashion bench`` (the candidates' ranking)
    and the gateway."""

    training: TrainingRecord
    versions: Mapping[str, str | None]  # package -> version (torch, onnxruntime, openvino)
    opset: int
    files: tuple[FileRecord, ...]
    photos: ExportPhotos
    parity: ParityRecord
    variants: tuple[VariantRecord, ...]
    cpu: CpuRecord
    created_unix_s: float = field(default_factory=lambda: round(time.time(), 3))
    host_python: str = field(default_factory=platform.python_version)

    @property
    def checkpoint_sha256(self) -> str:
        return self.training.checkpoint_sha256

    @property
    def chosen(self) -> CandidateRecord:
        """The CPU candidate ``configs/cpu.pbtxt`` serves."""
        return self.cpu.chosen

    @property
    def ranking(self) -> tuple[CandidateRecord, ...]:
        return self.cpu.ranking

    def variant(self, precision: str) -> VariantRecord | None:
        return next((v for v in self.variants if v.precision == precision), None)

    def file(self, precision: str) -> FileRecord | None:
        return next((f for f in self.files if f.precision == precision), None)

    def export_dict(self) -> dict[str, Any]:
        """The ``export`` section."""
        return {
            "created_unix_s": self.created_unix_s,
            "host_python": self.host_python,
            "versions": dict(self.versions),
            "opset": self.opset,
            "files": {f.precision: {"file": f.file, "bytes": f.bytes} for f in self.files},
            "photos": self.photos.to_dict(),
            "parity": self.parity.to_dict(),
            "precisions": {v.precision: v.to_dict() for v in self.variants},
            "cpu": self.cpu.to_dict(),
        }

    def to_dict(self) -> dict[str, Any]:
        """``{"training": …, "export": …}``: the two sections of the metadata document it fills."""
        return {"training": self.training.to_dict(), "export": self.export_dict()}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ExportRecord:
        """From a metadata document (or ``to_dict``'s output)."""
        export = doc["export"]
        return cls(
            training=TrainingRecord.from_dict(doc["training"]),
            versions=MappingProxyType(dict(export.get("versions") or {})),
            opset=int(export["opset"]),
            files=tuple(FileRecord(p, str(f["file"]), int(f["bytes"])) for p, f in export["files"].items()),
            photos=ExportPhotos.from_dict(export["photos"]),
            parity=ParityRecord.from_dict(export["parity"]),
            variants=tuple(
                VariantRecord.from_dict(p, v) for p, v in (export.get("precisions") or {}).items()
            ),
            cpu=CpuRecord.from_dict(export["cpu"]),
            created_unix_s=float(export.get("created_unix_s", 0.0)),
            host_python=str(export.get("host_python", "")),
        )


def parse_export_record(doc: Any, source: str = "metadata") -> ExportRecord:
    """The export record of a decoded metadata document; ``MetadataError`` when it has none or it is
    malformed (a version written by hand, or by an export older than the record)."""
    try:
        return ExportRecord.from_dict(doc)
    except (KeyError, TypeError, ValueError, AttributeError, StopIteration) as e:
        raise MetadataError(
            f"{source}: no readable export record ({type(e).__name__}: {e}); re-export the model"
        ) from e


def load_export_record(repository: str | Path, model_name: str, version: str | int = "") -> ExportRecord:
    """The export record of ``<repository>/<model_name>/<version>/metadata.json`` (newest version if none)."""
    number = resolve_version(repository, model_name, version)
    path = Path(repository) / model_name / str(number) / FILENAME
    return parse_export_record(read_document(path), source=str(path))


# --- skew: the metadata against the model Triton serves ------------------------------------------------


def skew(meta: ModelMetadata, served: dict[str, Any]) -> list[str]:
    """What differs between the metadata file and the model Triton serves (empty when they agree)."""
    problems = []
    inputs = {t["name"]: t for t in served.get("inputs", [])}
    given = inputs.get(meta.input.name)
    if given is None:
        problems.append(f"Triton's model has no input {meta.input.name!r} (it has {sorted(inputs)})")
    elif given["datatype"] != meta.input.datatype:
        problems.append(
            f"input {meta.input.name!r} is {given['datatype']} in Triton, "
            f"{meta.input.datatype} in metadata.json"
        )
    elif list(given["shape"][-3:]) != list(meta.input.shape[-3:]):
        problems.append(
            f"input {meta.input.name!r} has shape {given['shape']} in Triton, "
            f"{list(meta.input.shape)} in metadata.json"
        )
    problems += _title_skew(meta, inputs)
    outputs = {t["name"]: t for t in served.get("outputs", [])}
    expected = {o.tensor: o for o in meta.outputs}
    if meta.title is not None:
        conflict = outputs.pop(meta.title.conflict_output, None)
        if conflict is None:
            problems.append(
                f"Triton's model has no output {meta.title.conflict_output!r} (the title's conflicts)"
            )
        elif list(conflict["shape"][-1:]) != [len(meta.outputs)]:
            problems.append(
                f"output {meta.title.conflict_output!r} has shape {conflict['shape']} in Triton, "
                f"[-1, {len(meta.outputs)}] (one score per attribute) in metadata.json"
            )
    missing = sorted(set(expected) - set(outputs))
    extra = sorted(set(outputs) - set(expected))
    if missing:
        problems.append(f"outputs missing in Triton's model: {missing}")
    if extra:
        problems.append(f"outputs in Triton's model that metadata.json lacks: {extra}")
    for name in sorted(set(expected) & set(outputs)):
        shape = outputs[name]["shape"]
        if not shape or shape[-1] != len(expected[name].classes):
            problems.append(
                f"output {name!r} has shape {shape} in Triton but "
                f"{len(expected[name].classes)} classes in metadata.json"
            )
    return problems


def _title_skew(meta: ModelMetadata, inputs: Mapping[str, Any]) -> list[str]:
    """The title input: declared by the metadata and served by Triton alike, or by neither."""
    extra = sorted(set(inputs) - {meta.input.name} - ({meta.title.input} if meta.title else set()))
    problems = [f"Triton's model has inputs that metadata.json lacks: {extra}"] if extra else []
    if meta.title is None:
        return problems
    given = inputs.get(meta.title.input)
    if given is None:
        problems.append(f"Triton's model has no input {meta.title.input!r} (metadata.json declares a title)")
    elif given["datatype"] != TITLE_DATATYPE or list(given["shape"][-1:]) != [meta.title.max_tokens]:
        problems.append(
            f"input {meta.title.input!r} is {given['datatype']} {given['shape']} in Triton, "
            f"{TITLE_DATATYPE} [-1, {meta.title.max_tokens}] in metadata.json"
        )
    return problems
