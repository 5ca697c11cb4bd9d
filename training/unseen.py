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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fashion.console import emit, table
from training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from training.context import checkpoint_config, prepare_data, resolve_device
from training.data import encode, split_held_out
from training.dataset import ImageCache
from training.inference import collect, head_widths, image_batches
from training.model import FashionNet
from training.novelty import GATE, fit_novelty, floor_thresholds, gated_threshold

log = logging.getLogger(__name__)

CANDIDATE_QUANTILES = (0.85, 0.9, 0.95, 0.97, 0.99)


POOLED = "\0pooled"  # the pooled features' key next to the heads' names in one pass's outputs


def forward_numpy(
    model: FashionNet, images: np.ndarray, device: torch.device | str = "cpu", batch_size: int = 64
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(pooled features, probabilities per head) of uint8 NHWC images, in one pass of the model."""
    model.eval()

    def step(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled, probs = model.pooled_and_probabilities(batch)
        return {POOLED: pooled, **probs}

    widths = {POOLED: int(model.backbone.num_features), **head_widths(model.schema)}
    out = collect(step, image_batches(images, batch_size, device), widths)
    return out.pop(POOLED), out


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
        return asdict(self)


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
    if not 0 < quantile < 1:
        raise ValueError(f"the novelty quantile must be in (0, 1), got {quantile}")
    model = ckpt.model.to(device)
    model.novelty = None
    schema = ckpt.schema
    f_train, _ = forward_numpy(model, train_images, device)
    f_val, p_val = forward_numpy(model, val_images, device)
    f_held, p_held = forward_numpy(model, held_images, device)
    fit = fit_novelty(schema, f_train, train_labels, heads=heads)
    d_val, d_held = fit.distances(f_val), fit.distances(f_held)

    # What each quantile would give, before committing to one (also: the confidence threshold alone).
    raw = {a.name: ckpt.thresholds.get(a.name, 0.0) for a in schema.attributes}
    candidates = []
    for q in (0.0, *CANDIDATE_QUANTILES):
        row: dict[str, float] = {"quantile": q}
        t = float(np.quantile(d_val, q)) if q else float("inf")
        for a in schema.attributes:
            if a.name not in fit.gated:
                continue
            floor = gated_threshold(raw[a.name], a.num_classes) if q else raw[a.name]
            for key, p, d in (("seen", p_val[a.name], d_val), ("unseen", p_held[a.name], d_held)):
                if len(p) == 0:
                    continue
                g = np.where(d > t, GATE, 0.0)
                conf = (1 - g) * p.max(axis=1) + g / a.num_classes
                row[f"{a.name} {key}"] = float(np.mean(conf < floor))
        candidates.append(row)

    # The chosen quantile, into the model and its thresholds; then measured through the gated model itself.
    gate = fit.gate(float(np.quantile(d_val, quantile)))
    model.novelty = gate.to(device)
    floor_thresholds(schema, ckpt.thresholds, fit.gated)
    _, p_val = forward_numpy(model, val_images, device)
    _, p_held = forward_numpy(model, held_images, device)
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
        list(fit.gated),
        fit.reference,
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


def fit_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: np.ndarray,
    held_images: np.ndarray,
    *,
    quantile: float,
    heads: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
) -> NoveltyReport:
    """Fit the gate into the checkpoint file, save it to ``out`` with ``novelty.json`` beside it, print the
    report. What ``fashion novelty`` and the end of ``fashion train`` do, on photos already decoded."""
    ckpt = load_checkpoint(checkpoint)
    report = fit_and_measure(
        ckpt,
        train_images,
        train_labels,
        val_images,
        held_images,
        quantile=quantile,
        heads=heads,
        device=device,
    )
    save_checkpoint(out, ckpt)
    write_report(Path(out).parent, report)
    emit_report(report)
    return report


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

    ckpt = load_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt)
    cat, train_samples, val_samples = prepare_data(cfg)
    held = split_held_out(cat.samples, cfg.hold_out)[1]
    images = [
        ImageCache.build([s.image_path for s in part], ckpt.preprocessing, desc=name).images
        for name, part in (
            ("decode train", train_samples),
            ("decode val", val_samples),
            ("decode held-out", held),
        )
    ]
    labels = encode(ckpt.schema, train_samples)
    return fit_checkpoint(
        checkpoint,
        out or checkpoint,
        images[0],
        labels,
        images[1],
        images[2],
        quantile=quantile,
        heads=heads,
        device=resolve_device(device),
    )
