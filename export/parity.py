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


# The accuracy gate of a reduced-precision candidate (``gate``): per attribute, on real validation photos.
GATE_MIN_AGREEMENT = 0.99  # top-1 agreement with FP32, near-ties excluded
GATE_MAX_ACCURACY_DROP = 0.005  # accuracy against the labels may fall at most 0.5 points below FP32
# A photo whose two best FP32 classes are closer than this is a near-tie for the agreement: FP32 itself
# changes its mind on such photos under ±2 grey levels of noise (see model_repository/README.md).
NEAR_TIE = 0.02


def gate(
    schema: LabelSchema,
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    labels: np.ndarray | None,
    *,
    min_agreement: float = GATE_MIN_AGREEMENT,
    max_accuracy_drop: float = GATE_MAX_ACCURACY_DROP,
    near_tie: float = NEAR_TIE,
) -> dict[str, Any]:
    """Does ``candidate`` decide like the FP32 ``reference``, and is it as accurate against ``labels``?

    ``labels`` is ``(images, attributes)`` class indices with -1 for missing, or None (no labelled photos:
    the gate is agreement only and says so). Returns a JSON-able document with ``passed`` and, per
    attribute, the agreement, the photos it counted, both accuracies and the verdict.
    """
    rows = []
    for j, (a, ref, cand) in enumerate(zip(schema.attributes, reference, candidate, strict=True)):
        ref, cand = np.asarray(ref, np.float64), np.asarray(cand, np.float64)
        top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.zeros((len(ref), 2))
        decisive = (top2[:, 1] - top2[:, 0]) >= near_tie
        same = ref.argmax(1) == cand.argmax(1)
        agreement = float(same[decisive].mean()) if decisive.any() else 1.0
        row: dict[str, Any] = {
            "attribute": a.name,
            "agreement": round(agreement, 4),
            "agreement_images": int(decisive.sum()),
            "near_ties": int((~decisive).sum()),
            "max_abs_diff": float(np.abs(ref - cand).max()) if ref.size else 0.0,
        }
        ok = agreement >= min_agreement
        if labels is not None:
            known = labels[:, j] >= 0
            truth = labels[known, j]
            acc_ref = float((ref[known].argmax(1) == truth).mean()) if known.any() else None
            acc_cand = float((cand[known].argmax(1) == truth).mean()) if known.any() else None
            row.update(labelled_images=int(known.sum()), accuracy_fp32=acc_ref, accuracy=acc_cand)
            if acc_ref is not None and acc_cand is not None:
                row["accuracy_delta"] = round(acc_cand - acc_ref, 4)
                ok = ok and acc_cand >= acc_ref - max_accuracy_drop - 1e-12
        row["passed"] = bool(ok)
        rows.append(row)
    return {
        "passed": all(r["passed"] for r in rows),
        "images": len(reference[0]) if len(reference) else 0,
        "labelled": labels is not None,
        "rule": (
            f"per attribute: top-1 agreement with FP32 >= {min_agreement:.0%} on photos whose two best FP32 "
            f"classes differ by >= {near_tie}"
            + (
                f", and accuracy >= FP32's - {max_accuracy_drop * 100:.1f} points"
                if labels is not None
                else ""
            )
        ),
        "attributes": rows,
    }


def gate_table(doc: dict[str, Any], title: str = "") -> str:
    body = table(
        ["attribute", "agreement", "photos", "acc FP32", "acc", "Δ points", "passed"],
        [
            (
                r["attribute"],
                f"{r['agreement']:.2%}",
                r["agreement_images"],
                "" if r.get("accuracy_fp32") is None else f"{r['accuracy_fp32']:.2%}",
                "" if r.get("accuracy") is None else f"{r['accuracy']:.2%}",
                "" if r.get("accuracy_delta") is None else f"{r['accuracy_delta'] * 100:+.2f}",
                "yes" if r["passed"] else "NO",
            )
            for r in doc["attributes"]
        ],
    )
    return f"{title}\n{body}" if title else body
