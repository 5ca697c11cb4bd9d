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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fashion.console import emit, table
from fashion.schema import is_uncertain
from training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from training.context import checkpoint_config, drift_samples, prepare_data, resolve_device
from training.data import encode, split_held_out
from training.dataset import ImageCache
from training.inference import collect, head_widths, image_batches
from training.model import FashionNet
from training.novelty import NoveltyFit, fit_novelty, floor_thresholds, ramp_scale, reference_head

log = logging.getLogger(__name__)

CANDIDATE_QUANTILES = (0.85, 0.9, 0.95, 0.97, 0.99)


POOLED = "\0pooled"  # the pooled features' key next to the heads' names in one pass's outputs


@dataclass(frozen=True)
class Outputs:
    """One pass of the model over photos: the pooled features (what the gate measures) and the raw logits
    (what ``FashionNet.served_probabilities`` turns into what a user receives, for any gate)."""

    pooled: np.ndarray  # (n, features)
    logits: dict[str, np.ndarray]  # head → (n, classes)

    def __len__(self) -> int:
        return len(self.pooled)


def model_outputs(
    model: FashionNet, images: np.ndarray, device: torch.device | str = "cpu", batch_size: int = 64
) -> Outputs:
    """The pooled features and logits per head of uint8 NHWC images, in one pass of the model."""
    model.eval()

    def step(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled, logits = model.pooled_and_logits(batch)
        return {POOLED: pooled, **logits}

    widths = {POOLED: model.num_features, **head_widths(model.schema)}
    out = collect(step, image_batches(images, batch_size, device), widths)
    return Outputs(out.pop(POOLED), out)


def served(model: FashionNet, out: Outputs, device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """What the model, with its gate as it is now, serves for these outputs (``served_probabilities``)."""
    with torch.no_grad():
        logits = {k: torch.from_numpy(v).to(device) for k, v in out.logits.items()}
        probs = model.served_probabilities(logits, torch.from_numpy(out.pooled).to(device))
    return {k: v.cpu().numpy() for k, v in probs.items()}


def flagged(
    model: FashionNet, out: Outputs, thresholds: Mapping[str, float], device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Head → share of the photos served ``uncertain`` (top-1 confidence below the head's threshold)."""
    probs = served(model, out, device)
    return {
        name: float(np.mean(is_uncertain(p.max(axis=1), thresholds.get(name, 0.0))))
        for name, p in probs.items()
    }


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
    scale: float = 0.0  # the gate's ramp: from ``threshold - scale`` up to ``threshold`` (training.novelty)
    parts: dict[str, int] = field(default_factory=dict)  # photos per part of the candidate table

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def candidate_table(
    model: FashionNet,
    fit: NoveltyFit,
    parts: Mapping[str, Outputs],
    d_val: np.ndarray,
    thresholds: Mapping[str, float],
    scale: float,
    device: torch.device | str = "cpu",
) -> list[dict[str, float]]:
    """What each candidate quantile's gate would flag on the gated heads, per part (``seen``, ``unseen``),
    served by the model itself; quantile 0 is the confidence threshold alone (no gate)."""
    rows = []
    for q in (0.0, *CANDIDATE_QUANTILES):
        model.novelty = fit.gate(float(np.quantile(d_val, q)), scale).to(device) if q else None
        floored = dict(thresholds)
        if q:
            floor_thresholds(model.schema, floored, fit.gated)
        shares = {key: flagged(model, out, floored, device) for key, out in parts.items() if len(out)}
        row: dict[str, float] = {"quantile": q}
        for name in fit.gated:
            row.update({f"{name} {key}": share[name] for key, share in shares.items()})
        rows.append(row)
    model.novelty = None
    return rows


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
    more: Mapping[str, np.ndarray] | None = None,
) -> NoveltyReport:
    """Fit the gate into ``ckpt`` (model and thresholds) and measure it on the validation and held-out photos.

    The candidate table says what the gate would flag at each quantile — on ``more`` photos too, by name
    (the later period of a run split by period: ``drift known``, ``drift unseen``); the chosen quantile's
    gate then goes into the model, its heads' thresholds are floored, and its shares are measured as the
    model serves them.
    """
    if not 0 < quantile < 1:
        raise ValueError(f"the novelty quantile must be in (0, 1), got {quantile}")
    model = ckpt.model.to(device)
    model.novelty = None
    train, val, held = (model_outputs(model, x, device) for x in (train_images, val_images, held_images))
    fit = fit_novelty(ckpt.schema, train.pooled, train_labels, heads=heads)
    d_val = fit.distances(val.pooled)
    scale = ramp_scale(d_val)
    parts = {"seen": val, "unseen": held}
    parts.update({name: model_outputs(model, x, device) for name, x in (more or {}).items()})
    candidates = candidate_table(model, fit, parts, d_val, ckpt.thresholds, scale, device)

    gate = fit.gate(float(np.quantile(d_val, quantile)), scale)
    model.novelty = gate.to(device)
    log.info("novelty gate on %s: distance to %d %s classes, threshold %.1f, ramp %.1f",
             ", ".join(fit.gated), fit.means.shape[0], fit.reference, float(gate.threshold), scale)
    floor_thresholds(ckpt.schema, ckpt.thresholds, fit.gated)
    seen = flagged(model, val, ckpt.thresholds, device)
    unseen = flagged(model, held, ckpt.thresholds, device) if len(held) else {}
    model.cpu()
    return NoveltyReport(list(fit.gated), fit.reference, quantile, float(gate.threshold), len(val), len(held),
                         seen, unseen, candidates, scale, {name: len(out) for name, out in parts.items()})


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
        q, s = report.quantile, report.scale
        gate = f"gate full from validation quantile {q:.2f}, rising over {s:.1f} below it"
        emit(f"{line} ({gate})")


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
    more: Mapping[str, np.ndarray] | None = None,
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
        more=more,
    )
    save_checkpoint(out, ckpt)
    write_report(Path(out).parent, report)
    emit_report(report)
    return report


def novelty_command(
    checkpoint: str | Path,
    out: str | Path | None = None,
    *,
    quantile: float = 0.97,
    heads: Sequence[str] | None = None,
    device: str = "cpu",
) -> NoveltyReport:
    """``fashion novelty``: re-create the checkpoint's split (and its held-out photos, if it was trained with
    ``--hold-out``), fit the gate, save the checkpoint (default: in place) and ``novelty.json`` beside it.
    A run split by period (``--split-by``) also has its later photos in the candidate table, as ``drift
    known`` and ``drift unseen`` (of a product type the run never trained on)."""

    ckpt = load_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt)
    cat, train_samples, val_samples = prepare_data(cfg)
    held = split_held_out(cat.samples, cfg.hold_out)[1]
    parts = {"train": train_samples, "val": val_samples, "held-out": held}
    if cfg.split_by is not None and cfg.val_from is not None:
        reference = reference_head(ckpt.schema, heads)[1]
        known = set(ckpt.schema[reference].classes)
        later = [s for s in drift_samples(cfg) if s.labels.get(reference) is not None]
        parts["drift known"] = [s for s in later if s.labels[reference] in known]
        parts["drift unseen"] = [s for s in later if s.labels[reference] not in known]
    images = {
        name: ImageCache.build([s.image_path for s in part], ckpt.preprocessing, desc=f"decode {name}").images
        for name, part in parts.items()
    }
    labels = encode(ckpt.schema, train_samples)
    return fit_checkpoint(
        checkpoint,
        out or checkpoint,
        images.pop("train"),
        labels,
        images.pop("val"),
        images.pop("held-out"),
        quantile=quantile,
        heads=heads,
        device=resolve_device(device),
        more=images,
    )
