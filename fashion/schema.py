"""The label schema: which attributes a model predicts and the classes of each, in a stable order.

Built from the training split (``training.data.build_schema``), saved in the checkpoint, copied into
the model repository's metadata, and read by the gateway to decode outputs. Torch-free.

Missing and not-applicable labels are encoded as ``MISSING`` (-1): the loss and the metrics skip them.
For category-conditional datasets (Meesho "Visual Taxonomy") each head belongs to one category and
is only applicable to images of that category; ``categories`` maps category → its heads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

MISSING = -1
OTHER = "other"


def tensor_name(name: str) -> str:
    """A Triton/ONNX-safe tensor name for an attribute (letters, digits, underscores)."""
    safe = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")
    return safe if safe and not safe[0].isdigit() else f"a_{safe}"


@dataclass(frozen=True)
class Attribute:
    """One classification head."""

    name: str  # unique head name, e.g. "baseColour" or "Men Tshirts/color"
    classes: tuple[str, ...]
    label: str = ""  # the attribute as a person names it ("color"); defaults to ``name``
    category: str | None = None  # the only category this head applies to, if any
    tensor: str = ""  # output tensor name in the exported model; derived from ``name``

    def __post_init__(self) -> None:
        if len(self.classes) < 1:
            raise ValueError(f"attribute {self.name!r} has no classes")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"attribute {self.name!r} has duplicate classes")
        object.__setattr__(self, "classes", tuple(self.classes))
        if not self.label:
            object.__setattr__(self, "label", self.name)
        if not self.tensor:
            object.__setattr__(self, "tensor", tensor_name(self.name))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def index(self, value: str | None) -> int:
        """Class index of ``value``; unknown values fall into ``other`` when the schema has it."""
        if value is None:
            return MISSING
        try:
            return self.classes.index(value)
        except ValueError:
            if OTHER in self.classes:
                return self.classes.index(OTHER)
            return MISSING


@dataclass(frozen=True)
class LabelSchema:
    attributes: tuple[Attribute, ...]
    category_column: str | None = None  # set for category-conditional schemas
    _by_name: dict[str, Attribute] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", tuple(self.attributes))
        names = [a.name for a in self.attributes]
        tensors = [a.tensor for a in self.attributes]
        if len(set(names)) != len(names):
            raise ValueError("attribute names must be unique")
        if len(set(tensors)) != len(tensors):
            raise ValueError(f"attribute names collide as tensor names: {tensors}")
        object.__setattr__(self, "_by_name", {a.name: a for a in self.attributes})

    def __getitem__(self, name: str) -> Attribute:
        return self._by_name[name]

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.attributes]

    @property
    def categories(self) -> dict[str, list[str]]:
        """Category → names of the heads that apply to it (empty for unconditional schemas)."""
        out: dict[str, list[str]] = {}
        for a in self.attributes:
            if a.category is not None:
                out.setdefault(a.category, []).append(a.name)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "category_column": self.category_column,
            "attributes": [
                {
                    "name": a.name,
                    "label": a.label,
                    "category": a.category,
                    "tensor": a.tensor,
                    "classes": list(a.classes),
                }
                for a in self.attributes
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelSchema:
        return cls(
            attributes=tuple(
                Attribute(
                    name=a["name"],
                    classes=tuple(a["classes"]),
                    label=a.get("label", ""),
                    category=a.get("category"),
                    tensor=a.get("tensor", ""),
                )
                for a in data["attributes"]
            ),
            category_column=data.get("category_column"),
        )
