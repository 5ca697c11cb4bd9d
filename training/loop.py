"""The epoch loop of ``fashion train``: the optimiser and its schedule, one epoch of steps, validation,
checkpoints (``last.pt`` every epoch, ``best.pt`` when the validation score improves) and the decision to
stop (patience, time budget). Each part takes typed values and returns one, so it can be tested alone."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training.checkpoint import Checkpoint, save_checkpoint
from training.config import TrainConfig
from training.loss import class_weights, log_priors, objective
from training.metrics import evaluate_arrays
from training.model import FashionNet
from training.runtime import Run, agree_to_stop
from training.sources import Batch, BatchSource

log = logging.getLogger(__name__)

Metrics = dict[str, dict[str, float]]  # attribute → metric name → value (``training.metrics``)


# --- the optimiser --------------------------------------------------------------------------------


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak, then a cosine down to 1 % of it."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Optimisation:
    """What one training step updates the model with."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    class_weights: list[torch.Tensor | None]
    amp: bool  # float16 autocast (CUDA only)
    priors: list[torch.Tensor] | None = None  # log class priors per head, for logit adjustment


def make_optimisation(
    cfg: TrainConfig, model: FashionNet, labels: np.ndarray, steps_per_epoch: int, device: torch.device
) -> Optimisation:
    """AdamW over the trainable backbone parameters and the heads, warm-up + cosine per step."""
    # The heads are small linear layers on top of a shared backbone: they converge faster with a larger
    # step (the usual fine-tuning recipe, and it matters most when the backbone starts from scratch).
    heads = [*model.heads.parameters()]
    for part in (model.title, model.title_heads):  # the title branch learns at the heads' pace
        heads += [*part.parameters()] if part is not None else []
    groups: list[dict[str, Any]] = [
        {"params": [p for p in model.backbone.parameters() if p.requires_grad]},
        {"params": heads, "lr": cfg.lr * cfg.head_lr_scale},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup, total = int(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch
    amp = cfg.amp and device.type == "cuda"
    return Optimisation(
        optimizer,
        warmup_cosine(optimizer, warmup, total),
        torch.amp.GradScaler("cuda", enabled=amp),
        class_weights(labels, model.schema, cfg.class_weights),
        amp,
        log_priors(labels, model.schema) if cfg.logit_adjust > 0 else None,
    )


# --- where a run stands: saved in last.pt, restored by --resume -------------------------------------------


@dataclass
class Progress:
    """The epochs done and the best validation result so far."""

    start_epoch: int = 1  # the next epoch to run
    best_score: float = -1.0
    best_epoch: int = 0
    best_metrics: Metrics = field(default_factory=dict)
    epochs_run: int = 0  # by this process, this time

    def extra(self, opt: Optimisation) -> dict[str, Any]:
        """What ``last.pt`` keeps for ``--resume``."""
        return {
            "optimizer": opt.optimizer.state_dict(),
            "scheduler": opt.scheduler.state_dict(),
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
        }

    @classmethod
    def resume(cls, ckpt: Checkpoint | None, opt: Optimisation) -> Progress:
        """Where ``ckpt`` (a ``last.pt``) left off, its optimiser and schedule loaded into ``opt``; a fresh
        start without one (or from a checkpoint without training state, such as ``best.pt``)."""
        if ckpt is None or not ckpt.extra:
            return cls()
        opt.optimizer.load_state_dict(ckpt.extra["optimizer"])
        opt.scheduler.load_state_dict(ckpt.extra["scheduler"])
        best_epoch = int(ckpt.extra.get("best_epoch", 0))
        # A last.pt written before best_metrics was saved: its own metrics are the best when it is the best.
        fallback = ckpt.val_metrics if ckpt.epoch == best_epoch else {}
        return cls(
            start_epoch=ckpt.epoch + 1,
            best_score=float(ckpt.extra.get("best_score", -1.0)),
            best_epoch=best_epoch,
            best_metrics=ckpt.extra.get("best_metrics", fallback),
        )


@dataclass(frozen=True)
class EpochRecord:
    """One line of ``metrics.jsonl``."""

    epoch: int
    train_loss: float
    val_score: float
    lr: float
    metrics: Metrics  # per attribute, all of ``training.metrics`` (with titles, for a title model)
    image_only: Metrics | None = None  # a title model's metrics without the titles

    def to_dict(self) -> dict[str, Any]:
        def brief(metrics: Metrics) -> dict[str, dict[str, float]]:
            return {k: {"accuracy": v["accuracy"], "macro_f1": v["macro_f1"]} for k, v in metrics.items()}

        doc = {
            "epoch": self.epoch,
            "train_loss": self.train_loss,
            "val_score": self.val_score,
            "lr": self.lr,
            "val": brief(self.metrics),
        }
        if self.image_only is not None:
            doc["val_image_only"] = brief(self.image_only)
        return doc


# Called on the main process after each epoch is validated and kept (``metrics.jsonl``, ``best.pt``,
# ``last.pt`` written); returns True to stop after this epoch. An exception it raises (a tuner's
# ``optuna.TrialPruned``) ends the run there: the run directory is as that epoch left it, uncalibrated.
EpochCallback = Callable[[EpochRecord], bool]


# --- one epoch ------------------------------------------------------------------------------------


def train_step(
    source: BatchSource, batch: Batch, opt: Optimisation, model: FashionNet, cfg: TrainConfig
) -> float:
    """Forward, masked loss, backward, clipped update and scheduler step; returns the loss."""
    with torch.autocast(batch.targets.device.type, dtype=torch.float16, enabled=opt.amp):
        loss = objective(
            source.logits(batch), batch.targets, model.schema, opt.class_weights, cfg.label_smoothing,
            batch.mix, priors=opt.priors, tau=cfg.logit_adjust, title_weight=cfg.title_loss,
        )
    opt.optimizer.zero_grad(set_to_none=True)
    opt.scaler.scale(loss).backward()
    if cfg.grad_clip > 0:
        opt.scaler.unscale_(opt.optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.scheduler.step()
    return float(loss.detach())


def train_epoch(
    epoch: int, source: BatchSource, opt: Optimisation, model: FashionNet, cfg: TrainConfig, show: bool
) -> float:
    """The steps of one epoch, with a progress bar on the main process; returns the mean loss."""
    losses: list[float] = []
    bar = tqdm(source.batches(epoch), desc=f"epoch {epoch}/{cfg.epochs}", total=source.steps_per_epoch,
               disable=not show, leave=False)
    for batch in bar:
        losses.append(train_step(source, batch, opt, model, cfg))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return float(np.mean(losses)) if losses else float("nan")


def validate(
    epoch: int, loss: float, source: BatchSource, model: FashionNet, labels: np.ndarray, opt: Optimisation
) -> EpochRecord:
    """The validation photos as served. A model with a title branch is scored both as image-only and as
    image + title requests; its score is their mean (one model must serve both), its metrics the latter."""
    lr = float(opt.scheduler.get_last_lr()[0])
    score, per = evaluate_arrays(model.schema, labels, source.validation_probabilities())
    if model.title is None:
        return EpochRecord(epoch, loss, score, lr, per)
    titled, per_titled = evaluate_arrays(model.schema, labels, source.validation_probabilities(titles=True))
    return EpochRecord(epoch, loss, (score + titled) / 2, lr, per_titled, per)


# --- after each epoch: checkpoints, and whether to go on ----------------------------------------------


def keep(
    run_dir: Path, record: EpochRecord, progress: Progress, model: FashionNet, cfg: TrainConfig,
    opt: Optimisation,
) -> Progress:
    """Append the record to ``metrics.jsonl``, write ``best.pt`` if the score improved and ``last.pt``
    (with what ``--resume`` needs); returns the progress with this epoch counted."""
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(record.to_dict()) + "\n")
    log.info("epoch %d: train_loss %.4f val_score %.4f", record.epoch, record.train_loss, record.val_score)
    settings = cfg.to_dict()
    if record.val_score > progress.best_score:
        progress = replace(progress, best_score=record.val_score, best_epoch=record.epoch,
                           best_metrics=record.metrics)
        best = Checkpoint(model, cfg.backbone, settings, record.epoch, record.val_score, record.metrics)
        save_checkpoint(run_dir / "best.pt", best)
    last = Checkpoint(model, cfg.backbone, settings, record.epoch, record.val_score, record.metrics,
                      extra=progress.extra(opt))
    save_checkpoint(run_dir / "last.pt", last)
    return progress


def should_stop(cfg: TrainConfig, epoch: int, progress: Progress, started: float) -> bool:
    """Out of patience (no better score for ``patience`` epochs) or out of the time budget."""
    out_of_patience = cfg.patience > 0 and epoch - progress.best_epoch >= cfg.patience
    budget = cfg.time_budget_min
    out_of_time = budget is not None and time.monotonic() - started > 60 * budget
    if out_of_patience:
        log.info("early stop: no better validation score for %d epochs", cfg.patience)
    if out_of_time:
        log.info("stopping: the time budget of %.1f min is spent", budget)
    return out_of_patience or out_of_time


def run_epochs(
    cfg: TrainConfig, run: Run, model: FashionNet, source: BatchSource, opt: Optimisation, progress: Progress,
    val_labels: np.ndarray, on_epoch: EpochCallback | None = None,
) -> Progress:
    """Epochs from ``progress.start_epoch`` to ``cfg.epochs`` or an earlier stop; the main process validates,
    keeps checkpoints and decides to stop (``on_epoch`` may ask it to), the others follow."""
    started = time.monotonic()
    for epoch in range(progress.start_epoch, cfg.epochs + 1):
        loss = train_epoch(epoch, source, opt, model, cfg, show=run.main)
        progress = replace(progress, epochs_run=progress.epochs_run + 1)
        stop = False
        if run.main:
            record = validate(epoch, loss, source, model, val_labels, opt)
            progress = keep(run.run_dir, record, progress, model, cfg, opt)
            asked = on_epoch is not None and on_epoch(record)
            if asked:
                log.info("stopping: the epoch callback asked to")
            stop = should_stop(cfg, epoch, progress, started) or asked
        if agree_to_stop(run, stop):
            break
    return progress
