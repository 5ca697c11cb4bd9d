"""Agreement between two models' probabilities, per attribute: max |Δp| and argmax agreement.

Used twice: PyTorch vs the exported FP32 ONNX (parity, must hold to a tight tolerance) and FP32 ONNX
vs each reduced-precision variant (the accuracy delta, stored in the metadata).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fashion.console import table
from fashion.schema import LabelSchema

# PyTorch vs ONNX Runtime, both FP32: the same arithmetic in a different order.
FP32_ATOL = 1e-4
# Two classes whose reference probabilities are this close are a tie: no decision can rest on which
# one is on top, so a variant that swaps them is not counted as disagreeing (``decisive_agreement``).
TIE = 1e-3


@dataclass(frozen=True)
class Agreement:
    """How one attribute's probabilities of a candidate compare with a reference."""

    attribute: str
    max_abs_diff: float
    argmax_agreement: float  # share of images whose top class is the same (1.0 = all)
    decisive_agreement: float  # the same, a swap of two classes tied within TIE in the reference excused
    images: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(
    schema: LabelSchema, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]
) -> list[Agreement]:
    """Per attribute (schema order), compare ``candidate`` probabilities with ``reference``."""
    out = []
    for a, ref, cand in zip(schema.attributes, reference, candidate, strict=True):
        ref, cand = np.asarray(ref, np.float64), np.asarray(cand, np.float64)
        if ref.shape != cand.shape:
            raise ValueError(f"{a.name}: shapes differ ({ref.shape} vs {cand.shape})")
        diff = float(np.max(np.abs(ref - cand))) if ref.size else 0.0
        top = cand.argmax(1)
        agree = float(np.mean(ref.argmax(1) == top)) if len(ref) else 1.0
        picked = np.take_along_axis(ref, top[:, None], axis=1)[:, 0]
        decisive = float(np.mean(picked >= ref.max(1) - TIE)) if len(ref) else 1.0
        out.append(Agreement(a.name, diff, agree, decisive, len(ref)))
    return out


def worst(rows: Sequence[Agreement]) -> tuple[float, float]:
    """(largest max |Δp|, lowest decisive agreement) over attributes."""
    return max(r.max_abs_diff for r in rows), min(r.decisive_agreement for r in rows)


def agreement_table(rows: Sequence[Agreement], title: str = "") -> str:
    body = table(
        ["attribute", "max |Δp|", "argmax agreement", "excluding ties", "images"],
        [
            (
                r.attribute,
                f"{r.max_abs_diff:.2e}",
                f"{r.argmax_agreement:.2%}",
                f"{r.decisive_agreement:.2%}",
                r.images,
            )
            for r in rows
        ],
    )
    return f"{title}\n{body}" if title else body
