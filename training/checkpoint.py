"""Checkpoints: weights plus everything needed to rebuild, evaluate and export the model.

A checkpoint is self-describing: backbone name, label schema, preprocessing contract, the resolved
training configuration, validation metrics and (after calibration) temperatures and abstain
thresholds. Nothing needs to be re-typed downstream.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fashion.contract import Preprocessing
from fashion.errors import UserError
from fashion.schema import LabelSchema
from training.model import FashionNet, build_model
from training.novelty import NoveltyGate
from training.title import TitleEncoder

FORMAT = "fashion-tagger/checkpoint@1"


class CheckpointError(UserError, ValueError):
    """The file is not a checkpoint this code can read."""


@dataclass
class Checkpoint:
    model: FashionNet
    backbone: str
    config: dict[str, Any]
    epoch: int = 0
    val_score: float | None = None
    val_metrics: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)  # per-attribute abstain thresholds
    # A title model's: the ``conflict`` score above which a photo and its title are flagged as disagreeing
    conflict_thresholds: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # optimizer/scheduler state for --resume

    @property
    def schema(self) -> LabelSchema:
        return self.model.schema

    @property
    def preprocessing(self) -> Preprocessing:
        return self.model.preprocessing

    def temperatures(self) -> dict[str, float]:
        t = self.model.temperature.detach().cpu().tolist()
        return {a.name: float(t[i]) for i, a in enumerate(self.schema.attributes)}


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = ckpt.model
    state = {k.removeprefix("module."): v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "backbone": ckpt.backbone,
        "schema": model.schema.to_dict(),
        "preprocessing": model.preprocessing.to_dict(),
        "dropout": model.dropout,
        "colour_grid": model.colour_grid,
        "colour_hist": model.colour_hist,
        "novelty": model.novelty.describe() if model.novelty is not None else None,
        "title": model.title.describe() if model.title is not None else None,
        "state_dict": state,
        "config": ckpt.config,
        "epoch": ckpt.epoch,
        "val_score": ckpt.val_score,
        "val_metrics": ckpt.val_metrics,
        "thresholds": ckpt.thresholds,
        "conflict_thresholds": ckpt.conflict_thresholds,
        "extra": ckpt.extra,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint behind


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for foreign files
        raise CheckpointError(f"{path} is not a readable checkpoint: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file (written by `fashion train`)")
    schema = LabelSchema.from_dict(payload["schema"])
    pre = Preprocessing.from_dict(payload["preprocessing"])
    title = TitleEncoder.from_description(payload["title"]) if payload.get("title") else None
    model = build_model(payload["backbone"], schema, pre, dropout=payload.get("dropout", 0.2),
        colour_grid=payload.get("colour_grid", 0), title=title, colour_hist=payload.get("colour_hist", 0),
    )
    if payload.get("novelty"):
        model.novelty = NoveltyGate.from_description(payload["novelty"])
    state = dict(payload["state_dict"])
    if title is not None and "title_weight" not in state:  # saved before the blend existed: fused heads only
        state["title_weight"] = torch.zeros(len(schema.attributes))
    model.load_state_dict(state)
    model.to(device).eval()
    return Checkpoint(
        model=model,
        backbone=payload["backbone"],
        config=payload.get("config", {}),
        epoch=payload.get("epoch", 0),
        val_score=payload.get("val_score"),
        val_metrics=payload.get("val_metrics", {}),
        thresholds=payload.get("thresholds", {}),
        conflict_thresholds=payload.get("conflict_thresholds", {}),
        extra=payload.get("extra", {}),
    )
