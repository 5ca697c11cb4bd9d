"""Unseen product types: a distance gate that makes the product-type heads say ``uncertain``.

A classifier has to put every photo in one of the classes it knows; a product type it never saw
(jewellery for a model trained on clothes and shoes) often gets a confident wrong label, and a
confidence threshold alone does not catch it. The gate measures how far a photo's backbone features lie
from every known class, with the Mahalanobis distance of Lee et al. (NeurIPS 2018, "A simple unified
framework for detecting out-of-distribution samples"): class means and one shared, slightly shrunk
covariance, fitted on the training photos' features (``rank`` can restrict it to their first principal
components; measured on held-out article types, the full space separates them best: AUROC 0.89 against
0.79 for 128 components and 0.77 for the top-1 confidence; see ``models/default/MODEL_CARD.md``).

The features are scaled to unit length first (``unit_rows``; gates fitted before that keep the raw features:
``normalise`` false in their description). Measured on the split by period (trained on the photos up to 2011,
tested on 2,803 from 2012 on): the raw distance grew for every later photo, and at its validation quantile
0.85 it flagged 48 % of the later photos of *known* types (89 % of the types the run never saw); on unit
features the ranking separates them better (AUROC 0.917 against 0.843) and a higher quantile keeps the
unseen types: at 0.97, 15 % of known and 88 % of unseen (``docs/evaluation.md``). Unit length removes the
overall scale of the activations, which moves with the photos' exposure and background; what is left is the
direction, which is what tells a product type from another.

Above a threshold ``t`` — the ``quantile`` of the distances of the validation photos, which the model did
not train on — the gated heads' probabilities are mixed with the uniform distribution
(``p' = (1 - g) p + g / C``, ``mix_uniform``). The weight ``g`` rises as a ramp that ends at the
threshold, not as a step: ``g = GATE * clip((d - t) / s + 1, 0, 1)`` (``gate_weight``), 0 up to ``t - s`` and
the full ``GATE`` from the threshold on, where ``s`` is a share of the spread of the validation distances
(``ramp_scale``). A step put some validation photo exactly at the threshold (the threshold *is* its
distance), and the last bit of a float — PyTorch against ONNX Runtime, FP32 against a reduced precision —
flipped its probabilities by ``GATE (p - 1/C)``, up to 0.9; the ramp moves them by at most ``GATE / s`` per
unit of distance (measured on the synthetic demo: distances differ by about 2e-5 between PyTorch and ONNX
Runtime near the threshold, ``s`` is 1.3, so probabilities by about 1e-5, under the export's 1e-4). A gate
read from a checkpoint saved before the ramp (no ``scale`` in its description) stays a step (``scale = 0``),
so that such a checkpoint serves the numbers it always did; ``fashion novelty`` re-fits it with a ramp.

The gated heads' order is kept (top-k still lists the nearest known types), but past the threshold the top-1
confidence is at most ``(1 - GATE) + GATE / C``, below the head's abstain threshold, which is raised above
that (``floor_thresholds``): a photo past the threshold is always flagged, as with the step. On the ramp
below it the confidence is lowered by less, and the head's threshold decides, as for any photo. Everything is
part of the model (and so of the ONNX graph): the gateway needs no change, and ``uncertain: true`` comes back
through the usual threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fashion.schema import MISSING, LabelSchema, Role

log = logging.getLogger(__name__)

GATE = 0.9  # share of probability mass moved to the uniform distribution from the threshold on
RANK = 4096  # principal components kept: more than the features have, i.e. the full space
SHRINKAGE = 0.1  # of the mean eigenvalue added to the shared covariance's diagonal (few photos per class)
# The ramp's width ``s``, as a share of the validation distances' spread between these quantiles.
RAMP_SHARE = 0.25
RAMP_SPREAD = (0.25, 0.75)


# --- the formulas: one torch function each, for the model, its ONNX graph and the NumPy analysis ------


def nearest_distance(
    features: torch.Tensor, center: torch.Tensor, projection: torch.Tensor, means: torch.Tensor
) -> torch.Tensor:
    """Squared Mahalanobis distance of each row of ``features`` to the nearest class mean, shape (N,)."""
    z = (features - center) @ projection
    d2 = (z * z).sum(1, keepdim=True) - 2 * z @ means.T + (means * means).sum(1)
    return d2.min(dim=1).values.clamp(min=0)


def unit_rows(features: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit Euclidean length (a zero row stays zero)."""
    return features / features.norm(dim=1, keepdim=True).clamp(min=1e-12)


def gate_weight(distance: torch.Tensor, threshold: torch.Tensor | float, scale: float) -> torch.Tensor:
    """``GATE * clip((d - t) / s + 1, 0, 1)``: 0 up to ``t - s``, ``GATE`` from the threshold on, continuous
    in between; ``scale == 0`` is the step of gates fitted before the ramp (``GATE`` where ``d > t``)."""
    if scale > 0:
        return ((distance - threshold) / scale + 1.0).clamp(0.0, 1.0) * GATE
    return (distance > threshold).to(distance.dtype) * GATE


def mix_uniform(probs: torch.Tensor, weight: torch.Tensor, classes: int) -> torch.Tensor:
    """``(1 - g) p + g / C``: the share ``g`` (per row, shape (N, 1)) of ``probs`` moved to the uniform
    distribution over its ``C = classes`` classes (a constant of the graph); the order of the classes is
    kept."""
    return (1 - weight) * probs + weight / classes


def ramp_scale(distances: np.ndarray) -> float:
    """The ramp's width ``s`` from the validation photos' distances: ``RAMP_SHARE`` of their spread between
    the ``RAMP_SPREAD`` quantiles (robust to the far tail that unseen types make)."""
    low, high = np.quantile(np.asarray(distances, np.float64), RAMP_SPREAD)
    spread = float(high - low)
    if not np.isfinite(spread) or spread <= 0:
        spread = float(np.abs(np.median(distances))) or 1.0  # every photo at one distance: any width works
    return RAMP_SHARE * spread


class NoveltyGate(nn.Module):
    """Distance from pooled backbone features to the nearest known class; gate weights past a threshold."""

    center: torch.Tensor
    projection: torch.Tensor
    means: torch.Tensor
    threshold: torch.Tensor

    def __init__(
        self,
        features: int,
        rank: int,
        classes: int,
        heads: Sequence[str],
        scale: float = 0.0,
        normalise: bool = False,
    ) -> None:
        super().__init__()
        self.gated = tuple(heads)  # the attributes whose probabilities the gate mixes
        # Measure unit-length features (``unit_rows``); False: the raw ones, as gates fitted before it did.
        self.normalise = bool(normalise)
        # The ramp's width below the threshold, in units of squared distance; 0: a step. Part of the gate's
        # shape (like ``gated``): saved in ``describe()``, a constant of the ONNX graph.
        self.scale = float(scale)
        self.register_buffer("center", torch.zeros(features))
        self.register_buffer("projection", torch.zeros(features, rank))
        self.register_buffer("means", torch.zeros(classes, rank))
        self.register_buffer("threshold", torch.tensor(float("inf")))

    def describe(self) -> dict[str, Any]:
        """What a checkpoint stores to rebuild the gate before loading its buffers."""
        features, rank = self.projection.shape
        return {
            "features": int(features),
            "rank": int(rank),
            "classes": int(self.means.shape[0]),
            "heads": list(self.gated),
            "threshold": float(self.threshold),
            "scale": self.scale,  # 0: a step at the threshold; else the width of the ramp that ends there
            "normalise": self.normalise,  # the distance of unit-length features
            "gate": GATE,
        }

    @classmethod
    def from_description(cls, d: Mapping[str, Any]) -> NoveltyGate:
        """The gate a description rebuilds; one written before the ramp has no ``scale`` (a step), one
        written before unit-length features no ``normalise`` (raw features)."""
        scale = float(d.get("scale", 0.0))
        normalise = bool(d.get("normalise", False))
        return cls(int(d["features"]), int(d["rank"]), int(d["classes"]), list(d["heads"]), scale, normalise)

    def distance(self, pooled: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance to the nearest class mean, one value per image."""
        features = unit_rows(pooled) if self.normalise else pooled
        return nearest_distance(features, self.center, self.projection, self.means)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """``g`` per image, shape (N, 1) (``gate_weight`` of the distance)."""
        return gate_weight(self.distance(pooled), self.threshold, self.scale).unsqueeze(1)


def gated_threshold(threshold: float, classes: int) -> float:
    """An abstain threshold that a fully gated prediction (a photo past the gate's threshold) can never
    reach: above ``(1 - GATE) + GATE / C``."""
    return max(float(threshold), (1 - GATE) + GATE / classes + 1e-4)


def floor_thresholds(schema: LabelSchema, thresholds: dict[str, float], gated: Sequence[str]) -> None:
    """Raise the gated heads' abstain thresholds in place so that a photo past the gate's threshold is always
    ``uncertain``."""
    for a in schema.attributes:
        if a.name in gated:
            thresholds[a.name] = gated_threshold(thresholds.get(a.name, 0.0), a.num_classes)


@dataclass(frozen=True)
class NoveltyFit:
    """The fitted distance: ``distances`` measures photos, ``gate`` puts it into a model."""

    gated: tuple[str, ...]  # the heads the gate mixes
    reference: str  # the head whose classes define "known"
    center: np.ndarray
    projection: np.ndarray
    means: np.ndarray
    normalise: bool = True  # fitted on unit-length features (``unit_rows``)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """``nearest_distance`` of NumPy features, in float64 (the fit's own precision)."""
        as_64 = [torch.from_numpy(np.asarray(a, np.float64)) for a in (features, self.center, self.projection,
                                                                        self.means)]
        if self.normalise:
            as_64[0] = unit_rows(as_64[0])
        return nearest_distance(*as_64).numpy()

    def gate(self, threshold: float, scale: float = 0.0) -> NoveltyGate:
        """The gate module for the model: full from ``threshold`` on, a ramp of width ``scale`` below it (0:
        a step)."""
        gate = NoveltyGate(
            self.center.shape[0], self.projection.shape[1], self.means.shape[0], self.gated, scale,
            self.normalise,
        )
        gate.center.copy_(torch.from_numpy(self.center))
        gate.projection.copy_(torch.from_numpy(self.projection))
        gate.means.copy_(torch.from_numpy(self.means))
        gate.threshold.fill_(float(threshold))
        return gate


def fit_distance(
    train_features: np.ndarray, train_labels: np.ndarray, rank: int = RANK
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(center, projection, class means): ``||((f - center) @ projection) - means[c]||²`` is the distance of
    ``f`` to class ``c`` under the shared, shrunk covariance of the training features (classes with no
    labelled photo are left out: they cannot be near anything)."""
    x = np.asarray(train_features, np.float64)
    y = np.asarray(train_labels)
    keep = y != MISSING
    x, y = x[keep], y[keep]
    if len(x) < 2:
        raise ValueError("the novelty gate needs at least 2 labelled training photos")
    center = x.mean(axis=0)
    xc = x - center
    rank = int(min(rank, xc.shape[1], len(xc) - 1))
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    basis = vt[:rank].T  # (F, r)
    z = xc @ basis
    classes = np.unique(y)
    means = np.stack([z[y == c].mean(axis=0) for c in classes])
    residual = z - means[np.searchsorted(classes, y)]
    cov = residual.T @ residual / max(len(z) - len(classes), 1)
    cov += SHRINKAGE * np.trace(cov) / rank * np.eye(rank)
    whiten = np.linalg.cholesky(np.linalg.inv(cov))  # inv(cov) = W Wᵀ, so d² = ||(z - μ) W||²
    return center.astype(np.float32), (basis @ whiten).astype(np.float32), (means @ whiten).astype(np.float32)


def reference_head(schema: LabelSchema, heads: Sequence[str] | None) -> tuple[list[str], str]:
    """(gated heads, the head whose classes define "known"): by default the schema's product-type head
    (``Role.PRODUCT_TYPE``); a schema without one (every head a colour) uses its head with the most
    classes."""
    names = [a.name for a in schema.attributes]
    types = schema.with_role(Role.PRODUCT_TYPE)
    finest = types[0].name if types else max(schema.attributes, key=lambda a: a.num_classes).name
    chosen = list(heads) if heads else [finest]
    unknown = [h for h in chosen if h not in names]
    if unknown:
        raise ValueError(f"novelty heads {unknown} are not attributes of the model ({names})")
    return chosen, finest if finest in chosen else chosen[0]


def fit_novelty(
    schema: LabelSchema,
    train_features: np.ndarray,
    train_labels: np.ndarray,
    *,
    heads: Sequence[str] | None = None,
    normalise: bool = True,
) -> NoveltyFit:
    """Fit the distance on the training photos' features (scaled to unit length unless ``normalise`` is
    false) and the reference head's labels (``(n, heads)``)."""
    gated, reference = reference_head(schema, heads)
    j = [a.name for a in schema.attributes].index(reference)
    features = np.asarray(train_features, np.float64)
    if normalise:
        features = unit_rows(torch.from_numpy(features)).numpy()
    center, projection, means = fit_distance(features, train_labels[:, j])
    return NoveltyFit(tuple(gated), reference, center, projection, means, normalise)
