"""`fashion synth` and `fashion train`: argument parsing only; the work is in library functions."""

from __future__ import annotations

import argparse
from typing import Any

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
    a("--backbone", help="timm model: efficientnet_b0 (default), tf_efficientnetv2_s, "
      "swin_tiny_patch4_window7_224, test_efficientnet (tiny, for CI)")
    a("--pretrained", action="store_true", default=None, help="start from timm's published weights")
    a("--weights", help="start from a local weights file (timm format) — for clusters without internet")
    a("--image-size", type=int, help="square input size (default 224)")
    a("--resize-mode", choices=["letterbox", "squash", "center_crop"], help="default letterbox")
    a("--epochs", type=int, help="default 20")
    a("--batch-size", type=int, help="default 32")
    a("--lr", type=float, help="peak learning rate of AdamW (default 2e-3)")
    a("--weight-decay", type=float)
    a("--label-smoothing", type=float)
    a("--class-weights", choices=["none", "balanced", "effective"], help="re-weight rare classes")
    a("--mixup-alpha", type=float, help="MixUp Beta(α, α); 0 = off (default)")
    a("--cutmix-alpha", type=float, help="CutMix Beta(α, α); 0 = off (default)")
    a("--min-class-count", type=int, help="fold rarer classes into 'other' (default 5; 0 = off)")
    a("--val-fraction", type=float, help="validation share of the stratified split (default 0.2)")
    a("--patience", type=int, help="early stopping patience in epochs (default 5; 0 = off)")
    a("--seed", type=int)
    a("--workers", type=int, help="DataLoader workers (default: cores - 1)")
    a("--device", help="auto (default), cpu, cuda, cuda:1")
    a("--resume", help="continue from a last.pt")
    a("--time-budget-min", type=float, help="stop after this many minutes")
    a("--max-samples", type=int, help="use only the first N usable rows")
    t.set_defaults(func=_train)


def _synth(args: argparse.Namespace) -> int:
    from fashion.console import emit
    from training.synth import generate

    if args.count < 1:
        from fashion.cli import CommandError

        raise CommandError("--count must be at least 1")
    summary = generate(args.out, args.count, args.seed)
    emit(
        f"wrote {summary.count} products to {summary.out_dir} in {summary.seconds:.1f} s "
        f"({summary.images_per_s:.0f} images/s)"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from training.config import TrainConfig
    from training.train import train

    names = [
        "data", "out", "format", "attributes", "backbone", "pretrained", "weights", "image_size",
        "resize_mode", "epochs", "batch_size", "lr", "weight_decay", "label_smoothing", "class_weights",
        "mixup_alpha", "cutmix_alpha", "min_class_count", "val_fraction", "patience", "seed", "workers",
        "device", "resume", "time_budget_min", "max_samples",
    ]
    overrides: dict[str, Any] = {n: getattr(args, n) for n in names}
    cfg = TrainConfig.from_sources(args.config, overrides)
    train(cfg)
    return 0
