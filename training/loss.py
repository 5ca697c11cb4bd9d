"""The training objective: masked multi-head cross-entropy, with per-head class weights and MixUp/CutMix."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fashion.schema import MISSING, LabelSchema

Mix = tuple[torch.Tensor, float]  # (the permutation a batch was mixed with, the share of the batch itself)
Logits = dict[str, torch.Tensor]  # attribute name → (n, classes)


@dataclass(frozen=True)
class Outputs:
    """A training step's logits: as served (with the batch's titles, if any), and for a model with a title
    branch also the same photos without their titles and the titles alone."""

    fused: Logits
    image: Logits | None = None
    title: Logits | None = None
    has_title: torch.Tensor | None = None  # (n,) bool: which rows had a title


def log_priors(labels: np.ndarray, schema: LabelSchema) -> list[torch.Tensor]:
    """Per head, the log of the training split's class frequencies (smoothed by one photo per class)."""
    out = []
    for j, a in enumerate(schema.attributes):
        y = labels[:, j]
        counts = np.bincount(y[y != MISSING], minlength=a.num_classes).astype(np.float64) + 1.0
        out.append(torch.tensor(np.log(counts / counts.sum()), dtype=torch.float32))
    return out


def adjusted(logits: Logits, schema: LabelSchema, priors: list[torch.Tensor] | None, tau: float) -> Logits:
    """Logit adjustment (Menon et al., ICLR 2021): ``logits + tau * log prior`` for the loss only, so that
    the served logits learn the class from the photo with the training mix of classes divided out."""
    if priors is None or tau <= 0:
        return logits
    return {
        a.name: logits[a.name] + tau * priors[j].to(logits[a.name].device)
        for j, a in enumerate(schema.attributes)
    }


def objective(
    outputs: Outputs,
    targets: torch.Tensor,
    schema: LabelSchema,
    weights: list[torch.Tensor | None],
    smoothing: float,
    mix: Mix | None = None,
    *,
    priors: list[torch.Tensor] | None = None,
    tau: float = 0.0,
    title_weight: float = 0.5,
) -> torch.Tensor:
    """The training loss of one step: ``masked_loss`` of the served logits (logit-adjusted by ``tau``),
    plus, for a model with a title branch, the same photos without their titles (so that image-only requests
    are served as well as image + title ones) and ``title_weight`` times the title-only heads' loss on the
    rows that have a title."""
    loss = masked_loss(adjusted(outputs.fused, schema, priors, tau), targets, schema, weights, smoothing, mix)
    if outputs.image is not None:
        image = adjusted(outputs.image, schema, priors, tau)
        loss = loss + masked_loss(image, targets, schema, weights, smoothing, mix)
    if outputs.title is not None and outputs.has_title is not None and title_weight > 0:
        has = outputs.has_title
        if bool(has.any()):
            titled = {k: v[has] for k, v in outputs.title.items()}
            loss = loss + title_weight * masked_loss(titled, targets[has], schema, weights, smoothing)
    return loss


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


def weighted_ce(
    logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, smoothing: float
) -> torch.Tensor:
    """Per-sample cross-entropy (label-smoothed), times the weight of the sample's own class.

    Not ``cross_entropy(weight=...)``: with label smoothing that also weighs each class's share of the
    smoothing mass, so a rare (or absent) class with a large weight pulls every photo's probability towards
    itself — with "effective" weights a tuning trial collapsed to 0.458. Cui et al.'s class-balanced loss
    scales the sample's loss, which is what this does. Missing labels (``MISSING``) are masked by the
    caller."""
    target = y.clamp(min=0)
    ce = nn.functional.cross_entropy(logits, target, label_smoothing=smoothing, reduction="none")
    return ce if weight is None else ce * weight[target]


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
        ce = weighted_ce(logits[a.name], y, w, smoothing)
        present = (y != MISSING).float()
        if mix is None:
            num, den = (ce * present).sum(), present.sum()
        else:
            perm, lam = mix
            y2 = y[perm]
            ce2 = weighted_ce(logits[a.name], y2, w, smoothing)
            present2 = (y2 != MISSING).float()
            num = (lam * ce * present + (1 - lam) * ce2 * present2).sum()
            den = (lam * present + (1 - lam) * present2).sum()
        if den > 0:
            total = total + num / den
            heads += 1
    return total / max(heads, 1)
