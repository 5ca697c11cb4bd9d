"""Metric definitions shared by training's validation and ``fashion evaluate``.

Labels equal to ``MISSING`` (missing or not applicable) are excluded from every metric.
``harmonic_f1`` is the harmonic mean of micro- and macro-F1 (the Meesho "Visual Taxonomy" rule);
macro-F1 averages over the classes present in the labels or the predictions (scikit-learn's rule),
so a class the model never predicts counts with F1 = 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import f1_score

from fashion.schema import MISSING, LabelSchema


def harmonic(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| × bin weight."""
    if len(confidence) == 0:
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def attribute_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Metrics of one head: ``labels`` (n,) with MISSING entries, ``probs`` (n, classes)."""
    present = labels != MISSING
    y = labels[present]
    p = probs[present]
    if len(y) == 0:
        return {"accuracy": float("nan"), "top3_accuracy": float("nan"), "macro_f1": float("nan"),
                "micro_f1": float("nan"), "harmonic_f1": float("nan"), "ece": float("nan"), "support": 0}
    pred = p.argmax(axis=1)
    k = min(3, p.shape[1])
    top = np.argsort(-p, axis=1)[:, :k]
    macro = float(f1_score(y, pred, average="macro", zero_division=0))
    micro = float(f1_score(y, pred, average="micro", zero_division=0))
    correct = pred == y
    return {
        "accuracy": float(correct.mean()),
        "top3_accuracy": float((top == y[:, None]).any(axis=1).mean()),
        "macro_f1": macro,
        "micro_f1": micro,
        "harmonic_f1": harmonic(micro, macro),
        "ece": expected_calibration_error(p.max(axis=1), correct),
        "support": len(y),
    }


def overall_score(schema: LabelSchema, per_attribute: Mapping[str, Mapping[str, float]]) -> float:
    """Meesho rule for category-conditional schemas (mean over a category's heads, then over categories);
    the mean harmonic F1 over attributes otherwise. Heads without support are left out."""

    def mean_h(names: list[str]) -> float | None:
        values = [per_attribute[n]["harmonic_f1"] for n in names
                  if n in per_attribute and per_attribute[n]["support"] > 0]
        return float(np.mean(values)) if values else None

    if schema.categories:
        per_category = [m for names in schema.categories.values() if (m := mean_h(names)) is not None]
        return float(np.mean(per_category)) if per_category else 0.0
    return mean_h(schema.names) or 0.0


def evaluate_arrays(
    schema: LabelSchema, labels: np.ndarray, probs: Mapping[str, np.ndarray]
) -> tuple[float, dict[str, dict[str, float]]]:
    """(score, per-attribute metrics) for an ``(n, heads)`` label array and probabilities per head."""
    per = {a.name: attribute_metrics(labels[:, j], probs[a.name]) for j, a in enumerate(schema.attributes)}
    return overall_score(schema, per), per


# --- per-class detail for ``fashion evaluate`` -------------------------------------------------------


def per_class_report(labels: np.ndarray, pred: np.ndarray, classes: Sequence[str]) -> list[dict[str, object]]:
    """Precision, recall, F1 and support of every class of one head (MISSING labels excluded).

    ``labels`` and ``pred`` are class indices; a class that is never predicted gets precision 0, one that
    never occurs gets recall 0 and support 0 (scikit-learn's ``zero_division=0``).
    """
    present = labels != MISSING
    y, p = labels[present], pred[present]
    rows: list[dict[str, object]] = []
    for k, name in enumerate(classes):
        tp = int(np.sum((y == k) & (p == k)))
        predicted = int(np.sum(p == k))
        support = int(np.sum(y == k))
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        rows.append({"class": name, "precision": precision, "recall": recall,
                     "f1": harmonic(precision, recall), "support": support, "predicted": predicted})
    return rows


def confusion_top_classes(
    labels: np.ndarray, pred: np.ndarray, classes: Sequence[str], top_n: int = 20
) -> tuple[np.ndarray, list[str]]:
    """A confusion matrix (rows: true, columns: predicted) over the ``top_n`` most frequent true classes;
    every other class is pooled into a last row/column named ``rest`` (only when there are others)."""
    present = labels != MISSING
    y, p = labels[present], pred[present]
    counts = np.bincount(y, minlength=len(classes)) if len(y) else np.zeros(len(classes), dtype=np.int64)
    order = sorted(range(len(classes)), key=lambda k: (-counts[k], k))
    kept = order[: max(top_n, 1)]
    pooled = len(kept) < len(classes)
    position = np.full(len(classes), len(kept), dtype=np.int64)  # pooled classes → the "rest" slot
    position[kept] = np.arange(len(kept))
    size = len(kept) + int(pooled)
    matrix = np.zeros((size, size), dtype=np.int64)
    np.add.at(matrix, (position[y], position[p]), 1)
    names = [classes[k] for k in kept] + (["rest"] if pooled else [])
    return matrix, names
