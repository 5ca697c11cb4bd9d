"""Fit a checkpoint's novelty gate and measure how it flags unseen product types (``fashion novelty``).

The gate itself (what it computes, and why) is in ``training.novelty``. Here: the features of the
training, validation and held-out photos through the model, the fit, the thresholds, and the measurement
that says whether it works — the share of validation photos (seen product types) and of held-out photos
(types left out of training with ``--hold-out``) that come back ``uncertain`` on the gated heads, for a
few candidate quantiles and for the confidence threshold alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fashion.console import emit, table
from training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from training.data import Sample, encode, read_catalogue, split_held_out
from training.dataset import ImageCache
from training.model import FashionNet
from training.novelty import GATE, distances, fit_distance, fit_novelty, gated_threshold, reference_head

log = logging.getLogger(__name__)

CANDIDATE_QUANTILES = (0.85, 0.9, 0.95, 0.97, 0.99)


@torch.no_grad()
def pooled_features(
    model: FashionNet, images: np.ndarray, device: torch.device | str = "cpu", batch_size: int = 64
) -> np.ndarray:
    """The backbone's pooled features (what the gate measures) of uint8 NHWC images."""
    model.eval()
    out = [
        model.backbone(model.normalize(torch.from_numpy(images[i : i + batch_size]).to(device)))
        .float()
        .cpu()
        .numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, int(model.backbone.num_features)), np.float32)


@torch.no_grad()
def model_probabilities(
    model: FashionNet, images: np.ndarray, device: torch.device | str = "cpu", batch_size: int = 64
) -> dict[str, np.ndarray]:
    model.eval()
    chunks: dict[str, list[np.ndarray]] = {a.name: [] for a in model.schema.attributes}
    for i in range(0, len(images), batch_size):
        for name, p in model.probabilities(torch.from_numpy(images[i : i + batch_size]).to(device)).items():
            chunks[name].append(p.float().cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros((0, 1)) for k, v in chunks.items()}


@dataclass
class NoveltyReport:
    heads: list[str]
    reference: str
    quantile: float
    threshold: float
    seen: int
    unseen: int
    flagged_seen: dict[str, float]  # head → share of validation photos flagged uncertain
    flagged_unseen: dict[str, float]  # head → share of held-out photos flagged uncertain
    candidates: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def held_out_samples(
    data: str, format: str, attributes: Sequence[str] | None, hold_out: Sequence[str]
) -> list[Sample]:
    """The photos of ``data`` whose labels include one of the held-out ``attribute=class`` pairs."""
    if not hold_out:
        return []
    cat = read_catalogue(data, format, list(attributes) if attributes else None)
    return split_held_out(cat.samples, tuple(hold_out))[1]


def _flags(probs: np.ndarray, threshold: float) -> np.ndarray:
    return probs.max(axis=1) < threshold


def fit_and_measure(
    ckpt: Checkpoint,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: np.ndarray,
    held_images: np.ndarray,
    *,
    quantile: float,
    heads: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
) -> NoveltyReport:
    """Fit the gate into ``ckpt`` (model and thresholds) and measure it on the validation and held-out photos.

    The candidate table is computed from the ungated probabilities and the distances (what the gate would do
    at each quantile); the chosen quantile's shares are then measured again through the gated model itself.
    """
    model = ckpt.model.to(device)
    model.novelty = None
    schema = ckpt.schema
    gated, reference = reference_head(schema, heads)
    j = [a.name for a in schema.attributes].index(reference)
    f_train = pooled_features(model, train_images, device)
    f_val = pooled_features(model, val_images, device)
    f_held = pooled_features(model, held_images, device)

    # What each quantile would give, before committing to one (also: the confidence threshold alone).
    fit = fit_distance(f_train, train_labels[:, j])
    d_val, d_held = distances(fit, f_val), distances(fit, f_held)
    p_val, p_held = (
        model_probabilities(model, val_images, device),
        model_probabilities(model, held_images, device),
    )
    raw = {a.name: ckpt.thresholds.get(a.name, 0.0) for a in schema.attributes}
    candidates = []
    for q in (0.0, *CANDIDATE_QUANTILES):
        row: dict[str, float] = {"quantile": q}
        t = float(np.quantile(d_val, q)) if q else float("inf")
        for a in schema.attributes:
            if a.name not in gated:
                continue
            floor = gated_threshold(raw[a.name], a.num_classes) if q else raw[a.name]
            for key, p, d in (("seen", p_val[a.name], d_val), ("unseen", p_held[a.name], d_held)):
                if len(p) == 0:
                    continue
                g = np.where(d > t, GATE, 0.0)
                conf = (1 - g) * p.max(axis=1) + g / a.num_classes
                row[f"{a.name} {key}"] = float(np.mean(conf < floor))
        candidates.append(row)

    gate, _ = fit_novelty(schema, f_train, train_labels, f_val, heads=gated, quantile=quantile)
    model.novelty = gate.to(device)
    for a in schema.attributes:
        if a.name in gated:
            ckpt.thresholds[a.name] = gated_threshold(raw[a.name], a.num_classes)
    p_val, p_held = (
        model_probabilities(model, val_images, device),
        model_probabilities(model, held_images, device),
    )
    seen = {
        a.name: float(np.mean(_flags(p_val[a.name], ckpt.thresholds.get(a.name, 0.0))))
        for a in schema.attributes
    }
    unseen = (
        {
            a.name: float(np.mean(_flags(p_held[a.name], ckpt.thresholds.get(a.name, 0.0))))
            for a in schema.attributes
        }
        if len(held_images)
        else {}
    )
    model.cpu()
    return NoveltyReport(
        gated,
        reference,
        quantile,
        float(gate.threshold),
        len(val_images),
        len(held_images),
        seen,
        unseen,
        candidates,
    )


def report_table(report: NoveltyReport) -> str:
    keys = [k for k in report.candidates[0] if k != "quantile"] if report.candidates else []
    rows = [
        ["confidence threshold only" if not c["quantile"] else f"gate at quantile {c['quantile']:.2f}"]
        + [f"{c.get(k, float('nan')):.1%}" for k in keys]
        for c in report.candidates
    ]
    return table(["flagged uncertain", *keys], rows)


def write_report(out_dir: Path, report: NoveltyReport) -> Path:
    path = Path(out_dir) / "novelty.json"
    path.write_text(json.dumps(report.to_dict(), indent=1))
    return path


def emit_report(report: NoveltyReport) -> None:
    emit(report_table(report))
    for name in report.heads:
        line = f"{name}: {report.flagged_seen[name]:.1%} of {report.seen} validation photos flagged uncertain"
        if report.unseen:
            line += f", {report.flagged_unseen[name]:.1%} of {report.unseen} photos of held-out types"
        emit(line + f" (gate at validation quantile {report.quantile:.2f})")


def novelty_command(
    checkpoint: str | Path,
    out: str | Path | None = None,
    *,
    quantile: float = 0.85,
    heads: Sequence[str] | None = None,
    device: str = "cpu",
) -> NoveltyReport:
    """``fashion novelty``: re-create the checkpoint's split (and its held-out photos, if it was trained with
    ``--hold-out``), fit the gate, save the checkpoint (default: in place) and ``novelty.json`` beside it."""
    from training.evaluate import checkpoint_config
    from training.train import prepare_data, resolve_device

    ckpt = load_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt)
    dev = resolve_device(device)
    _, train_samples, val_samples = prepare_data(cfg)
    held = held_out_samples(cfg.data, cfg.format, cfg.attributes, cfg.hold_out)
    pre = ckpt.preprocessing
    images = [
        ImageCache.build([s.image_path for s in part], pre, desc=name).images
        for name, part in (
            ("decode train", train_samples),
            ("decode val", val_samples),
            ("decode held-out", held),
        )
    ]
    labels = encode(ckpt.schema, train_samples)
    report = fit_and_measure(
        ckpt, images[0], labels, images[1], images[2], quantile=quantile, heads=heads, device=dev
    )
    target = Path(out or checkpoint)
    save_checkpoint(target, ckpt)
    write_report(target.parent, report)
    emit_report(report)
    return report
