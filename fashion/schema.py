"""The label schema: which attributes a model predicts and the classes of each, in a stable order.

Built from the training split (``training.data.build_schema``), saved in the checkpoint, copied into
the model repository's metadata, and read by the gateway to decode outputs. Torch-free.

Missing and not-applicable labels are encoded as ``MISSING`` (-1): the loss and the metrics skip them.
For category-conditional datasets (Meesho "Visual Taxonomy") each head belongs to one category and
is only applicable to images of that category; ``categories`` maps category → its heads.

Each head has a ``Role`` that code reads instead of guessing from names: the ``colour`` heads turn colour
augmentation off, the ``product_type`` head defines the known types the novelty gate measures against.
A dataset layout that knows its columns sets the roles (``training.data``); where nothing says (a plain
CSV, a schema saved before roles existed), ``infer_roles`` gives the roles the code guessed before: a head
whose label names a colour ("colo") is a colour, and the non-colour head with the most classes is the
product type.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

MISSING = -1
OTHER = "other"


class Role(StrEnum):
    """What a head says about a product, for the code that treats some heads differently."""

    PRODUCT_TYPE = "product_type"  # what the product is (articleType): the novelty gate's known types
    COLOUR = "colour"  # a colour name: no colour augmentation while it is a target
    OTHER = "other"


ALWAYS_UNCERTAIN = 1.0  # an abstain threshold that flags every answer (a head that must not be trusted)


def is_uncertain(confidence: Any, threshold: float | None) -> Any:
    """Whether a top-1 confidence (a number or a NumPy array) is flagged ``uncertain`` under an abstain
    threshold: below it, or always at ``ALWAYS_UNCERTAIN``; never without a threshold."""
    if threshold is None:
        return confidence < 0  # False in the shape of ``confidence``
    return (confidence < threshold) | (threshold >= ALWAYS_UNCERTAIN)


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
    role: Role | None = None  # None: not said; ``LabelSchema`` infers it (``infer_roles``)

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
        if self.role is not None:
            try:
                object.__setattr__(self, "role", Role(self.role))
            except ValueError as e:
                roles = [r.value for r in Role]
                message = f"attribute {self.name!r}: role must be one of {roles}, got {self.role!r}"
                raise ValueError(message) from e

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


def infer_roles(attributes: Iterable[Attribute]) -> tuple[Attribute, ...]:
    """``attributes`` with a role for each head that has none, as the code guessed before roles existed:
    a label naming a colour ("colour", "color") is a colour; the non-colour head with the most classes is the
    product type unless a head already is one; the rest are other."""
    heads = [
        a if a.role is not None or "colo" not in a.label.lower() else replace(a, role=Role.COLOUR)
        for a in attributes
    ]
    if not any(a.role == Role.PRODUCT_TYPE for a in heads):
        kinds = [a for a in heads if a.role is None]
        if kinds:
            finest = max(kinds, key=lambda a: a.num_classes)
            heads = [replace(a, role=Role.PRODUCT_TYPE) if a is finest else a for a in heads]
    return tuple(a if a.role is not None else replace(a, role=Role.OTHER) for a in heads)


@dataclass(frozen=True)
class LabelSchema:
    attributes: tuple[Attribute, ...]  # every one with its role (given or inferred)
    category_column: str | None = None  # set for category-conditional schemas
    _by_name: dict[str, Attribute] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", infer_roles(self.attributes))
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

    def with_role(self, role: Role) -> list[Attribute]:
        """The heads of ``role``, in schema order."""
        return [a for a in self.attributes if a.role == role]

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
                    "role": None if a.role is None else a.role.value,
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
                    role=a.get("role"),  # absent in schemas saved before roles: inferred
                )
                for a in data["attributes"]
            ),
            category_column=data.get("category_column"),
        )
