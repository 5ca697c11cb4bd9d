"""The output's columns, derived from the model's ``metadata.json``; rows; and the title hook.

One row per input::

    id, <attr>, <attr>_probability, <attr>_<flag> ... (per attribute, in the metadata's order),
    model, model_version, error

``<attr>`` is the most probable class, ``<attr>_probability`` its calibrated probability, and one boolean per
flag the model answers with: ``uncertain`` (below the attribute's threshold in ``metadata.json``; false
where it has none) and, for a model that reads titles, ``conflict`` (the photo and the input's title
disagree on the attribute; null for an input without a title, which the model answered from the photo
alone). ``error`` is null when the input was tagged; otherwise ``"<code>: <message>"`` and every attribute
column is null. No attribute name is written here: they all come from the metadata (or the gateway's
``GET /v1/models``, which serves the same).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fashion.metadata import ModelMetadata, title_spec
from fashion.text import TitleTokenizer, tokenize_all

UNCERTAIN = "uncertain"
CONFLICT = "conflict"  # photo and title disagree (issue 24): answered only by models that read titles
FIXED = ("id", "model", "model_version", "error")


@dataclass(frozen=True)
class ModelRef:
    """Which model answered: what the ``model`` and ``model_version`` columns hold."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"


@dataclass(frozen=True)
class TitleInput:
    """The model's title input: its tensor name and the tokenizer that makes its ids (``fashion.text``)."""

    name: str
    tokenizer: TitleTokenizer

    def tensor(self, titles: Sequence[str | None]) -> np.ndarray:
        """``(N, max_tokens)`` int64 ids; no title: an image-only row (zeros); long titles are cut."""
        return tokenize_all(self.tokenizer, titles)


def title_input(document: Mapping[str, Any]) -> TitleInput | None:
    """The title input a metadata document (or the gateway's ``GET /v1/models``) declares, ``None`` for a
    model that reads photos only; the format is ``fashion.metadata.TitleSpec``'s."""
    spec = title_spec(document)
    return None if spec is None else TitleInput(spec.input, spec.tokenizer)


def flags_for(title: TitleInput | None) -> tuple[str, ...]:
    """The flags a model answers per attribute: ``uncertain`` always; ``conflict`` when it reads titles."""
    return (UNCERTAIN, CONFLICT) if title is not None else (UNCERTAIN,)


@dataclass(frozen=True)
class TagColumns:
    """The attributes and flags of one model, and the rows and Arrow schema they make."""

    attributes: tuple[str, ...]
    flags: tuple[str, ...] = (UNCERTAIN,)

    @classmethod
    def of(cls, meta: ModelMetadata, title: TitleInput | None = None) -> TagColumns:
        return cls(tuple(o.attribute for o in meta.outputs), flags_for(title))

    @classmethod
    def from_description(cls, model: Mapping[str, Any]) -> TagColumns:
        """From one model of the gateway's ``GET /v1/models`` (``ModelMetadata.describe()``)."""
        return cls(tuple(str(a["name"]) for a in model["attributes"]), flags_for(title_input(model)))

    def names(self) -> list[str]:
        out = ["id"]
        for a in self.attributes:
            out += [a, f"{a}_probability", *(f"{a}_{flag}" for flag in self.flags)]
        return [*out, "model", "model_version", "error"]

    def arrow_schema(self) -> Any:
        import pyarrow as pa

        fields = [pa.field("id", pa.string(), nullable=False)]
        for a in self.attributes:
            fields += [pa.field(a, pa.string()), pa.field(f"{a}_probability", pa.float64())]
            fields += [pa.field(f"{a}_{flag}", pa.bool_()) for flag in self.flags]
        fields += [
            pa.field("model", pa.string()),
            pa.field("model_version", pa.int64()),
            pa.field("error", pa.string()),
        ]
        return pa.schema(fields)

    def row(self, id: str, predictions: Mapping[str, Mapping[str, Any]], model: ModelRef) -> dict[str, Any]:
        """A tagged input's row from the gateway's answer for it (``{attr: {label, confidence, <flag>}}``);
        a flag the answer lacks is null (``conflict`` without a title)."""
        row: dict[str, Any] = {"id": id}
        for a in self.attributes:
            p = predictions[a]
            row[a] = str(p["label"])
            row[f"{a}_probability"] = float(p["confidence"])
            for flag in self.flags:
                row[f"{a}_{flag}"] = None if flag not in p else bool(p[flag])
        return {**row, "model": model.name, "model_version": model.version, "error": None}

    def error_row(self, id: str, error: str, model: ModelRef) -> dict[str, Any]:
        """An input that could not be tagged: every attribute column null, ``error`` says why."""
        row: dict[str, Any] = dict.fromkeys(self.names())
        return {**row, "id": id, "model": model.name, "model_version": model.version, "error": error}

    def to_dict(self) -> dict[str, Any]:
        return {"attributes": list(self.attributes), "flags": list(self.flags)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TagColumns:
        return cls(tuple(d["attributes"]), tuple(d["flags"]))


def error_text(code: str, message: str) -> str:
    """The ``error`` column: ``"<code>: <message>"`` (the gateway's error code and message)."""
    return f"{code}: {message}"
