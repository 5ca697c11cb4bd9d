"""Reader of the model's ``metadata.json`` (written by the export next to the model, torch-free here).

Layout: ``<repository>/<model name>/<version>/metadata.json``, version an integer folder. The file
carries the preprocessing contract, the input tensor, and per output head its tensor name and classes;
the gateway needs nothing else to turn bytes into tags, so nobody re-types the label vocabulary.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fashion.contract import Preprocessing
from fashion.errors import UserError
from fashion.repository import version_folders

FORMAT = "fashion-tagger/metadata@1"
FILENAME = "metadata.json"


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
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise MetadataError(f"{path} does not exist (model {model_name!r} version {number})") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MetadataError(f"{path} is not readable JSON: {e}") from e
    meta = parse_metadata(data, source=str(path))
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
