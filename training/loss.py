"""The training objective: masked multi-head cross-entropy, with per-head class weights and MixUp/CutMix."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fashion.schema import MISSING, LabelSchema

Mix = tuple[torch.Tensor, float]  # (the permutation a batch was mixed with, the share of the batch itself)


def class_weights(labels: np.ndarray, schema: LabelSchema, mode: str) -> list[torch.Tensor | None]:
    """Per-head class weights: inverse frequency ("balanced") or Cui et al.'s effective number."""
    out: list[torch.Tensor | None] = []
    for j, a in enumerate(schema.attributes):
        if mode == "none":
            out.append(None)
            continue
        y = labels[:, j]
        counts = np.bincount(y[y != MISSING], minlength=a.num_classes).astype(np.float64)
        counts = np.maximum(counts, 1.0)
        if mode == "balanced":
            w = counts.sum() / (len(counts) * counts)
        else:
            beta = 0.999
            w = (1.0 - beta) / (1.0 - np.power(beta, counts))
        w = w / w.mean()
        out.append(torch.tensor(w, dtype=torch.float32))
    return out


def masked_loss(
    logits: dict[str, torch.Tensor],
    targets: torch.Tensor,
    schema: LabelSchema,
    weights: list[torch.Tensor | None],
    smoothing: float,
    mix: Mix | None = None,
) -> torch.Tensor:
    """Mean over heads of the cross-entropy over the samples that have a label for that head.

    With MixUp/CutMix (``mix = (permutation, lam)``) every head mixes its two labels with the same
    ``lam``; a missing label on one side leaves only the other side's term, weighted accordingly.
    """
    total = logits[schema.attributes[0].name].new_zeros(())
    heads = 0
    for j, a in enumerate(schema.attributes):
        y = targets[:, j]
        weight = weights[j]
        w = weight.to(y.device) if weight is not None else None
        ce = nn.functional.cross_entropy(
            logits[a.name], y.clamp(min=0), weight=w, label_smoothing=smoothing, reduction="none"
        )
        present = (y != MISSING).float()
        if mix is None:
            num, den = (ce * present).sum(), present.sum()
        else:
            perm, lam = mix
            y2 = y[perm]
            ce2 = nn.functional.cross_entropy(
                logits[a.name], y2.clamp(min=0), weight=w, label_smoothing=smoothing, reduction="none"
            )
            present2 = (y2 != MISSING).float()
            num = (lam * ce * present + (1 - lam) * ce2 * present2).sum()
            den = (lam * present + (1 - lam) * present2).sum()
        if den > 0:
            total = total + num / den
            heads += 1
    return total / max(heads, 1)
