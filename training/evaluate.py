"""``fashion evaluate``: per-attribute metrics of a checkpoint on a labelled dataset, and the report.

Writes into the output folder:

- ``metrics.json``: ``{"score": ..., "attributes": {name: {accuracy, top3_accuracy, macro_f1, micro_f1,
  harmonic_f1, ece, support}}}`` (definitions in ``training.metrics``; ``null`` where an attribute has
  no labelled image);
- ``reports/<attr>.csv``: precision, recall, F1, support (and how often predicted) per class;
- ``confusion/<attr>.png``: the confusion matrix over the most frequent classes plus ``rest``, so that
  it stays readable with 75+ classes;
- ``report.md``: the summary table linking the files above.

Missing and not-applicable labels are excluded; a label the checkpoint's schema does not know (and cannot
fold into ``other``) is excluded too, and counted in a warning.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fashion.console import emit, table
from fashion.schema import MISSING, OTHER, LabelSchema, is_uncertain
from fashion.text import tokenize_all
from training.checkpoint import Checkpoint, load_checkpoint
from training.context import checkpoint_config, drift_samples, resolve_device, validation_samples
from training.data import DatasetError, Sample, encode, read_catalogue
from training.metrics import confusion_top_classes, evaluate_arrays, per_class_report
from training.novelty import reference_head
from training.predict import Predictions, predict_paths
from training.priors import correct_priors

log = logging.getLogger(__name__)

METRIC_KEYS = (
    "accuracy", "top3_accuracy", "macro_f1", "micro_f1", "harmonic_f1", "ece", "uncertain_rate",
    "conflict_rate", "silent_error_rate", "support", "unseen_uncertain_rate", "unseen_support",
    "known_type_accuracy", "known_type_support", "new_type_accuracy", "new_type_support",
)
SUBSETS = ("all", "val", "drift")


@dataclass(frozen=True)
class EvalResult:
    out_dir: Path
    score: float
    attributes: dict[str, dict[str, float]]
    images: int


# --- which images ---------------------------------------------------------------------------------


def evaluation_samples(
    ckpt: Checkpoint, data: str | None, format: str = "auto", split: str = "train", subset: str = "all"
) -> list[Sample]:
    """All labelled images of ``data`` (``subset="all"``), the checkpoint's validation split (``"val"``) or
    the later period a ``--split-by`` run held out (``"drift"``)."""
    if subset not in SUBSETS:
        raise DatasetError(f"subset must be one of {SUBSETS}, got {subset!r}")
    if subset == "val":
        return validation_samples(ckpt, data, None if format == "auto" else format)
    if subset == "drift":
        return drift_samples(checkpoint_config(ckpt, data=data, format=None if format == "auto" else format))
    if data is None:
        raise DatasetError("--data is required unless --subset val re-creates the validation split")
    return read_catalogue(data, format, None, split=split).samples


def encode_known(schema: LabelSchema, samples: Sequence[Sample], known_only: bool = False) -> np.ndarray:
    """``encode`` plus a warning for labels the schema cannot represent (they count as missing).

    ``known_only``: a label that is not one of the schema's own classes counts as missing instead of as
    ``other`` (a later period's new product types are not scored as if the model could know them)."""
    labels = encode(schema, samples)
    if known_only:
        for j, a in enumerate(schema.attributes):
            named = set(a.classes) - {OTHER}
            for i, s in enumerate(samples):
                if s.labels.get(a.name) not in named:
                    labels[i, j] = MISSING
    for j, a in enumerate(schema.attributes):
        unknown = sum(
            1 for i, s in enumerate(samples) if s.labels.get(a.name) is not None and labels[i, j] == MISSING
        )
        if unknown:
            log.warning("%s: %d labels are classes the model does not know; left out", a.name, unknown)
    return labels


# --- artefacts ------------------------------------------------------------------------------------


def _json_safe(value: float | int) -> float | int | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def metrics_document(score: float, per: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """The ``metrics.json`` content: NaN (no labelled image) becomes ``null``."""
    return {
        "score": _json_safe(float(score)),
        "attributes": {
            name: {k: _json_safe(m.get(k, math.nan)) for k in METRIC_KEYS} for name, m in per.items()
        },
    }


def write_class_report(path: Path, rows: Sequence[Mapping[str, object]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["class", "precision", "recall", "f1", "support", "predicted"])
        for r in rows:
            w.writerow([r["class"], f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}",
                        r["support"], r["predicted"]])


def plot_confusion(
    path: Path, labels: np.ndarray, pred: np.ndarray, classes: Sequence[str], title: str, top_n: int = 20
) -> None:
    """A PNG confusion matrix: the ``top_n`` most frequent true classes plus ``rest``, colours normalised
    per true class (recall on the diagonal), counts written in the cells while they fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix, names = confusion_top_classes(labels, pred, classes, top_n)
    n = len(names)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    side = max(4.0, 0.42 * n + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.0, side), dpi=100)
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    short = [c if len(c) <= 18 else c[:17] + "…" for c in names]
    ax.set_xticks(range(n), short, rotation=90, fontsize=8)
    ax.set_yticks(range(n), short, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    pooled = f" (top {n - 1} of {len(classes)} classes, others pooled as 'rest')" if n < len(classes) else ""
    ax.set_title(f"{title}{pooled}", fontsize=9)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def summary_rows(per: Mapping[str, Mapping[str, float]]) -> list[list[str]]:
    keys = ("support", "accuracy", "top3_accuracy", "macro_f1", "micro_f1", "harmonic_f1", "ece",
            "silent_error_rate")
    return [[name, *(_fmt(m.get(k, math.nan)) for k in keys)] for name, m in per.items()]


# "silent errors": wrong answers flagged neither uncertain nor conflict (``flag_rates``)
SUMMARY_HEADERS = ["attribute", "n", "accuracy", "top-3", "macro F1", "micro F1", "harmonic F1", "ECE",
                   "silent errors"]


def write_report_md(
    path: Path, schema: LabelSchema, score: float, per: Mapping[str, Mapping[str, float]], *,
    checkpoint: str, data: str, images: int, files: Mapping[str, tuple[str, str]],
) -> None:
    rule = ("Meesho rule: mean harmonic F1 of each category's attributes, then mean over categories"
            if schema.categories else "mean harmonic F1 over attributes")
    rows = [[*r, f"[csv]({files[name][0]})", f"[png]({files[name][1]})"]
            for r, name in zip(summary_rows(per), per, strict=True)]
    lines = [
        "# Evaluation report",
        "",
        f"- checkpoint: `{checkpoint}`",
        f"- data: `{data}` ({images} images)",
        f"- score: **{_fmt(score)}** ({rule})",
        "- harmonic F1 = harmonic mean of micro- and macro-F1; ECE = expected calibration error (15 bins);"
        " missing and not-applicable labels are excluded",
        "",
        table([*SUMMARY_HEADERS, "per class", "confusion"], rows),
        "",
    ]
    if has_new_types(per):
        lines += [
            "## By product type",
            "",
            "Photos of product types the model was trained on, and of types it never saw (scored on the"
            " attributes whose classes it knows):",
            "",
            table(BY_TYPE_HEADERS, by_type_rows(per)),
            "",
        ]
    lines += [
        "## Confusion matrices",
        "",
    ]
    for name in per:
        lines += [f"### {name}", "", f"![{name}]({files[name][1]})", ""]
    path.write_text("\n".join(lines))


# --- the command ----------------------------------------------------------------------------------


# A title model's requests: with titles, without, with titles mixed up; or its title-only heads (a reference)
TITLE_MODES = ("auto", "none", "shuffled", "only")


def request_titles(
    ckpt: Checkpoint, samples: Sequence[Sample], mode: str, seed: int = 0
) -> np.ndarray | None:
    """The title ids to evaluate a title model with: the photos' own titles (``auto``), none (image-only
    requests), or each photo with another photo's title (``shuffled``: how often the conflict flag fires
    on a wrong title). ``None`` for a model without a title branch."""
    if mode not in TITLE_MODES:
        raise DatasetError(f"title must be one of {TITLE_MODES}, got {mode!r}")
    title = ckpt.model.title
    if title is None or mode == "none":
        if mode == "only":
            raise DatasetError("--title only needs a model trained with --title")
        return None
    ids = tokenize_all(title.tokenizer, [s.title for s in samples])
    return ids[np.random.default_rng(seed).permutation(len(ids))] if mode == "shuffled" else ids


def flag_rates(
    ckpt: Checkpoint, labels: np.ndarray, preds: Predictions, per: dict[str, dict[str, float]]
) -> None:
    """Add, per attribute, the share of scored photos a client sees flagged ``uncertain``; with titles, the
    share flagged ``conflict`` (photos with a title only); and the share answered wrong with neither flag
    (``silent_error_rate``: the mistakes nothing warns a shop about)."""
    titled = None
    for j, a in enumerate(ckpt.schema.attributes):
        scored = labels[:, j] != MISSING
        probs = preds.probs[a.name]
        uncertain = is_uncertain(probs.max(axis=1), ckpt.thresholds.get(a.name, 0.0))
        flagged = np.zeros(len(labels), dtype=bool)
        if preds.conflict is not None:
            titled = preds.conflict.any(axis=1) if titled is None else titled
            flagged = preds.conflict[:, j] > ckpt.conflict_thresholds.get(a.name, 1.0)
            rows = scored & titled
            per[a.name]["conflict_rate"] = float(np.mean(flagged[rows])) if rows.any() else float("nan")
        if not scored.any():
            per[a.name]["uncertain_rate"] = per[a.name]["silent_error_rate"] = float("nan")
            continue
        per[a.name]["uncertain_rate"] = float(np.mean(uncertain[scored]))
        wrong = probs.argmax(axis=1) != labels[:, j]
        per[a.name]["silent_error_rate"] = float(np.mean((wrong & ~uncertain & ~flagged)[scored]))


def unseen_flag_rates(
    ckpt: Checkpoint, samples: Sequence[Sample], preds: Predictions, per: dict[str, dict[str, float]]
) -> None:
    """Per attribute, how many photos carry a class the model does not know (``unseen_support``) and the
    share of them flagged ``uncertain`` (``unseen_uncertain_rate``): what the novelty gate is for."""
    for a in ckpt.schema.attributes:
        known = set(a.classes)
        unseen = np.array([s.labels.get(a.name) is not None and s.labels[a.name] not in known
                           for s in samples], dtype=bool) & preds.ok
        confidence = preds.probs[a.name].max(axis=1)[unseen]
        per[a.name]["unseen_support"] = float(unseen.sum())
        per[a.name]["unseen_uncertain_rate"] = (
            float(np.mean(is_uncertain(confidence, ckpt.thresholds.get(a.name, 0.0))))
            if unseen.any() else float("nan")
        )


def accuracy_by_type(
    ckpt: Checkpoint, samples: Sequence[Sample], labels: np.ndarray, preds: Predictions,
    per: dict[str, dict[str, float]],
) -> None:
    """Per attribute, accuracy apart on the photos of product types the model was trained on
    (``known_type_*``) and of types it never saw (``new_type_*``; the product type is the novelty gate's
    reference head, articleType in the Kaggle layout; a photo without a product-type label is in neither
    part). A later period's photos of new types carry known genders and colours, so they count in those
    attributes' accuracy; this tells the drift that more photos of the same types could fix from the types
    a model has never seen."""
    head = reference_head(ckpt.schema, None)[1]
    known = set(next(a for a in ckpt.schema.attributes if a.name == head).classes)
    types = [s.labels.get(head) for s in samples]
    new = np.array([t is not None and t not in known for t in types], dtype=bool)
    old = np.array([t is not None and t in known for t in types], dtype=bool)
    for j, a in enumerate(ckpt.schema.attributes):
        scored = labels[:, j] != MISSING
        right = preds.probs[a.name].argmax(axis=1) == labels[:, j]
        for part, rows in (("known_type", scored & old), ("new_type", scored & new)):
            per[a.name][f"{part}_support"] = float(rows.sum())
            per[a.name][f"{part}_accuracy"] = float(np.mean(right[rows])) if rows.any() else float("nan")


def has_new_types(per: Mapping[str, Mapping[str, float]]) -> bool:
    return any(m.get("new_type_support", 0) for m in per.values())


def by_type_rows(per: Mapping[str, Mapping[str, float]]) -> list[list[str]]:
    def cells(m: Mapping[str, float], part: str) -> list[str]:
        return [str(int(m.get(f"{part}_support", 0))), _fmt(m.get(f"{part}_accuracy", math.nan))]

    return [[name, *cells(m, "known_type"), *cells(m, "new_type")] for name, m in per.items()]


BY_TYPE_HEADERS = ["attribute", "n, known types", "accuracy", "n, new types", "accuracy"]


def evaluate(
    checkpoint: str | Path,
    out_dir: str | Path,
    data: str | None = None,
    *,
    format: str = "auto",
    split: str = "train",
    subset: str = "all",
    top_n: int = 20,
    batch_size: int = 64,
    device: str = "auto",
    aspect: float = 1.0,
    title: str = "auto",
    prior_correction: float = 0.0,
) -> EvalResult:
    """Evaluate ``checkpoint`` on ``data`` and write the report folder (module docstring). ``title``: how a
    title model is asked (``TITLE_MODES``); ``prior_correction``: evaluate the model with that much more
    prior correction folded in (``training.priors``), to choose it."""

    ckpt = load_checkpoint(checkpoint)
    schema = ckpt.schema
    samples = evaluation_samples(ckpt, data, format, split, subset)
    if not samples:
        raise DatasetError(f"{data}: no usable labelled images")
    correct_priors(ckpt, prior_correction)
    labels = encode_known(schema, samples, known_only=subset == "drift")
    preds = predict_paths(ckpt.model, [s.image_path for s in samples], resolve_device(device), batch_size,
                          desc="evaluate", aspect=aspect, titles=request_titles(ckpt, samples, title),
                          title_only=title == "only")
    labels[~preds.ok] = MISSING  # an undecodable image has no prediction to score
    score, per = evaluate_arrays(schema, labels, preds.probs)
    flag_rates(ckpt, labels, preds, per)
    if subset == "drift":  # the later period's photos of classes the model never saw: are they flagged?
        unseen_flag_rates(ckpt, samples, preds, per)
        accuracy_by_type(ckpt, samples, labels, preds, per)
    out = Path(out_dir)
    write_reports(out, ckpt, labels, preds, score, per, top_n,
                  checkpoint=str(checkpoint), data=str(data or ckpt.config.get("data")), images=len(samples))
    emit(table(SUMMARY_HEADERS, summary_rows(per)))
    if has_new_types(per):
        emit(table(BY_TYPE_HEADERS, by_type_rows(per)))
    emit(f"score {_fmt(score)} on {len(samples)} images; report {out / 'report.md'}")
    return EvalResult(out, score, per, len(samples))


def write_reports(
    out: Path, ckpt: Checkpoint, labels: np.ndarray, preds: Predictions, score: float,
    per: dict[str, dict[str, float]], top_n: int, *, checkpoint: str, data: str, images: int,
) -> None:
    """``metrics.json``, a class report and a confusion matrix per attribute, and ``report.md``."""
    schema = ckpt.schema
    (out / "reports").mkdir(parents=True, exist_ok=True)
    (out / "confusion").mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics_document(score, per), indent=1))
    files: dict[str, tuple[str, str]] = {}
    for j, a in enumerate(schema.attributes):
        pred = preds.probs[a.name].argmax(axis=1)
        csv_name, png_name = f"reports/{a.tensor}.csv", f"confusion/{a.tensor}.png"
        write_class_report(out / csv_name, per_class_report(labels[:, j], pred, a.classes))
        plot_confusion(out / png_name, labels[:, j], pred, a.classes, a.name, top_n)
        files[a.name] = (csv_name, png_name)
    write_report_md(out / "report.md", schema, score, per, checkpoint=checkpoint, data=data, images=images,
                    files=files)
