"""Calibrated confidences: per-head temperature scaling and abstain thresholds (``fashion calibrate``).

Temperature scaling (Guo et al., 2017) divides each head's logits by one scalar ``T`` fitted on held-out
data to minimise the negative log-likelihood; it changes no prediction (the argmax stays), only how
confident the probabilities are. The temperatures go into the model's ``temperature`` buffer, so
``FashionNet.probabilities``, ``fashion evaluate``/``predict`` and the exported ONNX graph all return the
calibrated probabilities.

The abstain threshold of a head is the lowest top-1 confidence ``t`` such that, on the calibration
data, the predictions with confidence ≥ ``t`` reach the target precision; below it a prediction is
reported as uncertain. A head that never reaches the target gets ``1.0`` (everything uncertain) and a
warning. Both are stored in the checkpoint (``Checkpoint.thresholds``) and a ``calibration.json``
report (ECE before/after, temperature, threshold, coverage) is written next to it.

``fashion train`` runs this on its validation split for ``best.pt`` at the end of training.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fashion.console import emit, table
from fashion.schema import MISSING, LabelSchema
from fashion.text import tokenize_all
from training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from training.context import resolve_device
from training.dataset import ImageCache
from training.evaluate import encode_known, evaluation_samples
from training.inference import collect, head_widths, image_batches
from training.metrics import expected_calibration_error
from training.model import FashionNet, calibrated_softmax
from training.novelty import floor_thresholds
from training.predict import iter_batches
from training.priors import correct_priors

log = logging.getLogger(__name__)

# A head that separates its calibration data perfectly would drive T to 0 (every probability 1.0);
# the lower bound keeps its confidences finite. Models trained with label smoothing are
# under-confident, so T < 1 is normal.
T_RANGE = (0.25, 20.0)
MIN_LABELS_FOR_THRESHOLD = 20  # below this the threshold is kept but flagged as unreliable


# --- temperatures ---------------------------------------------------------------------------------


def _nll(logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits / t, y)


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The ``T`` in ``T_RANGE`` minimising the NLL of ``softmax(logits / T)`` for labels ``y`` (no MISSING).

    A coarse log-spaced grid finds the basin, L-BFGS on ``log T`` refines it; the result is never worse
    than the grid's best (L-BFGS is only accepted when it lowers the NLL).
    """
    logits, y = logits.detach().double(), y.detach().long()
    if len(y) == 0:
        return 1.0
    grid = torch.logspace(np.log10(T_RANGE[0]), np.log10(T_RANGE[1]), 121, dtype=torch.float64)
    with torch.no_grad():
        losses = torch.stack([_nll(logits, y, t) for t in grid])
    best_t = float(grid[int(losses.argmin())])
    best_loss = float(losses.min())
    log_t = torch.tensor(np.log(best_t), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _nll(logits, y, log_t.exp())
        loss.backward()
        return loss

    opt.step(closure)
    refined = float(np.clip(float(log_t.detach().exp()), *T_RANGE))
    with torch.no_grad():
        refined_loss = float(_nll(logits, y, torch.tensor(refined, dtype=torch.float64)))
    return refined if refined_loss < best_loss else best_t


def fit_temperatures_from_logits(
    schema: LabelSchema, logits: Mapping[str, torch.Tensor | np.ndarray], labels: np.ndarray
) -> dict[str, float]:
    """Per-head temperature for raw logits (``(n, classes)`` per head) and ``(n, heads)`` labels."""
    out: dict[str, float] = {}
    for j, a in enumerate(schema.attributes):
        present = labels[:, j] != MISSING
        z = torch.as_tensor(np.asarray(logits[a.name]))[torch.from_numpy(present)]
        y = torch.from_numpy(labels[present, j])
        out[a.name] = fit_temperature(z, y)
    return out


def model_logits(
    model: FashionNet,
    images: np.ndarray,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    titles: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Raw logits (before any temperature) per head for a uint8 NHWC array (and its title ids, if any)."""
    model.eval().to(device)
    batches = image_batches(images, batch_size, device)
    if titles is None:
        return collect(model, batches, head_widths(model.schema))
    with_ids = zip(batches, image_batches(titles, batch_size, device), strict=True)
    return collect(lambda b: model(*b), with_ids, head_widths(model.schema))


CONFLICT_FALSE_ALARMS = 0.05  # the share of photos with their own titles that may be flagged


def conflict_scores(
    model: FashionNet,
    images: np.ndarray,
    titles: np.ndarray,
    device: torch.device | str,
    batch_size: int = 64,
) -> np.ndarray:
    """``FashionNet.conflict`` of each photo with the given titles: ``(n, attributes)``."""
    model.eval().to(device)
    batches = zip(image_batches(images, batch_size, device), image_batches(titles, batch_size, device),
                  strict=True)

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"conflict": model.conflict(model.embed(*batch)[1])}

    return collect(step, batches, {"conflict": len(model.schema.attributes)})["conflict"]


def fit_conflict_thresholds(
    ckpt: Checkpoint, images: np.ndarray, titles: np.ndarray, device: torch.device | str, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Per attribute, the conflict score above which a photo and its title are flagged: the score that
    ``CONFLICT_FALSE_ALARMS`` of the validation photos reach with their own titles. Stored in
    ``ckpt.conflict_thresholds``; returns, per attribute, the threshold and the share flagged with the true
    titles and with titles shuffled among the photos (the listing-QA signal's two error rates)."""
    has = (titles != 0).any(axis=1)
    images, titles = images[has], titles[has]
    true = conflict_scores(ckpt.model, images, titles, device)
    order = np.random.default_rng(seed).permutation(len(titles))
    shuffled = conflict_scores(ckpt.model, images, titles[order], device)
    report = {}
    for j, a in enumerate(ckpt.schema.attributes):
        threshold = float(np.quantile(true[:, j], 1 - CONFLICT_FALSE_ALARMS)) if len(true) else 1.0
        ckpt.conflict_thresholds[a.name] = threshold
        report[a.name] = {
            "threshold": threshold,
            "flagged_true_titles": float(np.mean(true[:, j] > threshold)) if len(true) else 0.0,
            "flagged_shuffled_titles": float(np.mean(shuffled[:, j] > threshold)) if len(true) else 0.0,
        }
    emit(table(["attribute", "conflict threshold", "flagged: own titles", "flagged: shuffled titles"],
               [[k, f"{v['threshold']:.3f}", f"{v['flagged_true_titles']:.1%}",
                 f"{v['flagged_shuffled_titles']:.1%}"] for k, v in report.items()]))
    return report


def fit_title_temperatures(
    ckpt: Checkpoint, images: np.ndarray, titles: np.ndarray, labels: np.ndarray, device: torch.device | str,
    blend: float = 0.0,
) -> dict[str, float]:
    """A title model's image + title answer, fitted on the rows that have a title and applied to the
    model: per head, the fused heads' temperature T, then with ``blend`` > 0 the title-only heads' weight
    (``FashionNet.title_weight`` = blend × T, so that the answer's argmax is that of the fused heads'
    calibrated logits plus blend × the title-only logits) and the temperature of that sum
    (``FashionNet.title_temperature``). Returns the temperatures set."""
    model = ckpt.model.eval().to(device)
    has = (titles != 0).any(axis=1)
    names = [a.name for a in model.schema.attributes]

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        features = model.embed(*batch)[1]  # one pass: the fused heads' logits and the title-only heads'
        text = model.title_logits(features)
        return {**model.head_logits(features), **{f"title:{k}": v for k, v in text.items()}}

    widths = head_widths(model.schema)
    batches = zip(image_batches(images[has], 64, device), image_batches(titles[has], 64, device), strict=True)
    out = collect(step, batches, {**widths, **{f"title:{k}": w for k, w in widths.items()}})
    fused = {k: out[k] for k in names}
    temps = fit_temperatures_from_logits(ckpt.schema, fused, labels[has])
    weights = [blend * float(temps[k]) for k in names]
    if blend > 0:  # the served sum (FashionNet.served_logits) and its own temperature
        summed = {k: fused[k] + w * out[f"title:{k}"] for k, w in zip(names, weights, strict=True)}
        temps = fit_temperatures_from_logits(ckpt.schema, summed, labels[has])
    dtype = model.temperature.dtype
    cast(torch.Tensor, model.title_weight).copy_(torch.tensor(weights, dtype=dtype))
    values = [float(temps[k]) for k in names]
    cast(torch.Tensor, model.title_temperature).copy_(torch.tensor(values, dtype=dtype))
    return temps


def fit_temperatures(
    model: FashionNet, images: np.ndarray, labels: np.ndarray, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Per-head temperatures for ``model`` on validation images (uint8 NHWC) and ``(n, heads)`` labels.

    Does not change the model; ``apply_temperatures`` does.
    """
    return fit_temperatures_from_logits(model.schema, model_logits(model, images, device), labels)


def apply_temperatures(model: FashionNet, temperatures: Mapping[str, float]) -> None:
    values = [float(temperatures.get(a.name, 1.0)) for a in model.schema.attributes]
    model.temperature.copy_(torch.tensor(values, dtype=model.temperature.dtype))


def softmax(logits: np.ndarray, t: float = 1.0) -> np.ndarray:
    """The model's ``calibrated_softmax`` of NumPy logits at temperature ``t``, in the logits' precision."""
    return calibrated_softmax(torch.from_numpy(np.asarray(logits)), t).numpy()


# --- abstain thresholds ---------------------------------------------------------------------------


def threshold_for_precision(probs: np.ndarray, labels: np.ndarray, target: float) -> tuple[float, float]:
    """(threshold, coverage): a top-1 confidence ``t`` whose kept set ``{confidence ≥ t}`` is the largest that
    reaches precision ``target`` on these labels (MISSING excluded), and the share of labelled images kept.

    ``(1.0, 0.0)`` when no confidence level reaches the target.
    """
    present = labels != MISSING
    if not present.any():
        return 1.0, 0.0
    p, y = probs[present], labels[present]
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    order = np.argsort(-conf, kind="stable")
    conf, correct = conf[order], correct[order]
    precision = np.cumsum(correct) / np.arange(1, len(conf) + 1)
    # A threshold keeps every image at that confidence: only ends of runs of equal confidence are cuts.
    cut = np.r_[conf[1:] < conf[:-1], True]
    ok = np.flatnonzero(cut & (precision >= target))
    if len(ok) == 0:
        return 1.0, 0.0
    k = int(ok[-1])
    # Cut halfway to the next lower confidence seen in validation (nothing there says where precision
    # drops in between); when every image is kept there is no evidence for abstaining at all: 0.
    threshold = 0.0 if k == len(conf) - 1 else float(conf[k] + conf[k + 1]) / 2
    return threshold, float((k + 1) / len(conf))


# --- the whole step -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadCalibration:
    attribute: str
    support: int
    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    threshold: float
    coverage: float  # share of labelled calibration images above the threshold
    precision_target: float


def _nll_np(probs: np.ndarray, y: np.ndarray) -> float:
    if len(y) == 0:
        return float("nan")
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))))


ALWAYS_UNCERTAIN = 1.0  # the abstain threshold of a head served as always uncertain


def calibrate_logits(
    ckpt: Checkpoint, logits: Mapping[str, np.ndarray], labels: np.ndarray, target_precision: float = 0.9
) -> list[HeadCalibration]:
    """Fit temperatures and thresholds from raw logits; writes both into ``ckpt`` (model buffer and
    ``ckpt.thresholds``) and returns the per-head report."""
    if not 0.0 < target_precision <= 1.0:
        raise ValueError(f"target precision must be in (0, 1], got {target_precision}")
    schema = ckpt.schema
    before_t = ckpt.temperatures()
    temps = fit_temperatures_from_logits(schema, logits, labels)
    report = []
    for j, a in enumerate(schema.attributes):
        y = labels[:, j]
        present = y != MISSING
        z = np.asarray(logits[a.name], dtype=np.float64)
        before, after = softmax(z, before_t[a.name]), softmax(z, temps[a.name])
        correct = before.argmax(axis=1) == y
        threshold, coverage = threshold_for_precision(after, y, target_precision)
        if present.sum() and threshold >= 1.0:
            log.warning("%s: no confidence level reaches precision %.2f on the calibration data; every "
                        "prediction will be reported as uncertain", a.name, target_precision)
        elif 0 < present.sum() < MIN_LABELS_FOR_THRESHOLD:
            log.warning("%s: only %d labelled calibration images; its threshold is a rough estimate",
                        a.name, int(present.sum()))
        report.append(HeadCalibration(
            attribute=a.name,
            support=int(present.sum()),
            temperature=temps[a.name],
            ece_before=expected_calibration_error(before[present].max(axis=1), correct[present]),
            ece_after=expected_calibration_error(after[present].max(axis=1), correct[present]),
            nll_before=_nll_np(before[present], y[present]),
            nll_after=_nll_np(after[present], y[present]),
            threshold=threshold,
            coverage=coverage,
            precision_target=target_precision,
        ))
    apply_temperatures(ckpt.model, temps)
    ckpt.thresholds = {h.attribute: h.threshold for h in report if h.support > 0}
    if ckpt.model.novelty is not None:  # a photo the novelty gate flags must stay below its heads' thresholds
        floor_thresholds(schema, ckpt.thresholds, ckpt.model.novelty.gated)
    for name in ckpt.config.get("always_uncertain") or ():  # fashion train --always-uncertain, kept by
        ckpt.thresholds[name] = ALWAYS_UNCERTAIN  # every re-calibration: no confidence reaches it
    return report


def calibration_table(report: Sequence[HeadCalibration]) -> str:
    rows = [[h.attribute, h.support, f"{h.temperature:.3f}", f"{h.ece_before:.4f}", f"{h.ece_after:.4f}",
             f"{h.threshold:.3f}", f"{h.coverage:.2f}"] for h in report]
    return table(["attribute", "n", "temperature", "ECE before", "ECE after", "threshold", "coverage"], rows)


def save_calibrated(
    ckpt: Checkpoint, out: str | Path, report: Sequence[HeadCalibration], source: str
) -> Path:
    """Write the calibrated checkpoint and ``calibration.json`` (``<out stem>.calibration.json``)."""
    out = Path(out)
    save_checkpoint(out, ckpt)
    doc = {"source": source, "heads": [asdict(h) for h in report]}
    path = out.with_name(f"{out.stem}.calibration.json")
    path.write_text(json.dumps(doc, indent=1))
    return path


def calibrate_in_memory(
    checkpoint: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    out: str | Path | None = None,
    target_precision: float = 0.9,
    device: torch.device | str = "cpu",
    source: str = "validation split",
    titles: np.ndarray | None = None,
) -> list[HeadCalibration]:
    """Calibrate a checkpoint file on images already decoded (what ``train`` has for its validation
    split) and save it to ``out`` (default: in place). Prints the ECE table. A title model's image + title
    temperatures are fitted on the same photos with ``titles``; the thresholds come from the image-only
    answers, the less confident of the two."""
    ckpt = load_checkpoint(checkpoint, device)
    logits = model_logits(ckpt.model, images, device)
    report = calibrate_logits(ckpt, logits, labels, target_precision)
    if titles is not None and ckpt.model.title is not None:
        temps = fit_title_temperatures(ckpt, images, titles, labels, device,
                                       float(ckpt.config.get("title_blend", 0.0)))
        emit("temperatures with titles: " + ", ".join(f"{k} {v:.3f}" for k, v in temps.items()))
        fit_conflict_thresholds(ckpt, images, titles, device)
    ckpt.model.cpu()
    save_calibrated(ckpt, out or checkpoint, report, source)
    emit(calibration_table(report))
    return report


def calibrate(
    checkpoint: str | Path,
    out: str | Path,
    data: str | None = None,
    *,
    format: str = "auto",
    split: str = "train",
    target_precision: float = 0.9,
    batch_size: int = 64,
    device: str = "auto",
    prior_correction: float = 0.0,
    always_uncertain: Sequence[str] = (),
    title_blend: float | None = None,
) -> list[HeadCalibration]:
    """``fashion calibrate``: on all of ``data``, or (default) on the checkpoint's validation split
    re-created as ``fashion train`` made it. ``prior_correction`` first folds that much of the training
    class mix out of the heads (``training.priors``); ``always_uncertain`` heads join those the checkpoint
    already serves as always uncertain; ``title_blend`` replaces a title model's weight of its title-only
    heads (``fit_title_temperatures``). All three are recorded in the checkpoint's config."""

    ckpt = load_checkpoint(checkpoint)
    unknown = set(always_uncertain) - {a.name for a in ckpt.schema.attributes}
    if unknown:
        raise ValueError(f"--always-uncertain names heads the model does not have: {sorted(unknown)}")
    if always_uncertain:
        kept = set(ckpt.config.get("always_uncertain") or ())
        ckpt.config = {**ckpt.config, "always_uncertain": sorted(kept | set(always_uncertain))}
    if title_blend is not None:
        if title_blend < 0 or ckpt.model.title is None:
            raise ValueError(f"--title-blend {title_blend}: needs a model trained with --title, and not "
                             "a negative weight")
        ckpt.config = {**ckpt.config, "title_blend": title_blend}
    correct_priors(ckpt, prior_correction)
    samples = evaluation_samples(ckpt, data, format, split, "all" if data else "val")
    if not samples:
        raise ValueError("no labelled images to calibrate on")
    labels = encode_known(ckpt.schema, samples)
    dev = resolve_device(device)

    chunks: dict[str, list[np.ndarray]] = {a.name: [] for a in ckpt.schema.attributes}
    ok: list[bool] = []
    bar = tqdm(total=len(samples), desc="calibrate", unit="img")
    for images, flags in iter_batches([s.image_path for s in samples], ckpt.preprocessing, batch_size):
        for name, z in model_logits(ckpt.model, images, dev, batch_size).items():
            chunks[name].append(z)
        ok.extend(flags)
        bar.update(len(flags))
    bar.close()
    logits = {k: np.concatenate(v) for k, v in chunks.items()}
    labels[~np.asarray(ok, dtype=bool)] = MISSING
    report = calibrate_logits(ckpt, logits, labels, target_precision)
    if ckpt.model.title is not None:  # the image + title temperatures and the conflict thresholds
        photos = ImageCache.build([s.image_path for s in samples], ckpt.preprocessing, desc="decode").images
        titles = tokenize_all(ckpt.model.title.tokenizer, [s.title for s in samples])
        fit_title_temperatures(ckpt, photos, titles, labels, dev, float(ckpt.config.get("title_blend", 0.0)))
        fit_conflict_thresholds(ckpt, photos, titles, dev)
    ckpt.model.cpu()
    source = f"{data} (all)" if data else f"validation split of {ckpt.config.get('data')}"
    path = save_calibrated(ckpt, out, report, source)
    emit(calibration_table(report))
    emit(f"calibrated checkpoint {out}; report {path}")
    return report
