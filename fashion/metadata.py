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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fashion.contract import Preprocessing
from fashion.errors import UserError
from fashion.schema import LabelSchema

FORMAT = "fashion-tagger/metadata@1"
FILENAME = "metadata.json"

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

    @property
    def output_names(self) -> list[str]:
        return [o.tensor for o in self.outputs]

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
    training: Mapping[str, Any],
    export: Mapping[str, Any],
    precision: str = "fp32",
    runtime: str = "onnxruntime",
) -> dict[str, Any]:
    """The metadata document; ``model.name`` and ``model.version`` are set by the repository writer."""
    size = preprocessing.image_size
    return {
        "format": FORMAT,
        "model": {
            "name": None,
            "version": None,
            "precision": precision,
            "runtime": runtime,  # what configs/cpu.pbtxt runs (export.runtimes)
            "backbone": backbone,
        },
        "input": {"name": "image", "datatype": "UINT8", "shape": [-1, size, size, 3], "layout": "NHWC"},
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
        "training": dict(training),
        "export": {
            "created_unix_s": round(time.time(), 3),
            "host_python": platform.python_version(),
            **export,
        },
    }


def write_metadata(version_dir: str | Path, doc: Mapping[str, Any]) -> Path:
    """Write ``doc`` as ``<version_dir>/metadata.json`` (checked first: nothing unreadable is written)."""
    parse_metadata(doc, source=f"{version_dir}/{FILENAME} (being written)")
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
    outputs = {t["name"]: t for t in served.get("outputs", [])}
    expected = {o.tensor: o for o in meta.outputs}
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
