"""``fashion tune`` (training/tune.py) and the trainer's epoch callback it drives: real studies on a small
synthetic catalogue with timm's tiny ``test_efficientnet``, real Optuna storages, real worker processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.loop import EpochRecord
from training.train import train

TINY = dict(backbone="test_efficientnet", image_size=32, batch_size=16, workers=0, freeze_blocks=2,
            novelty_quantile=0, min_class_count=0, warmup_epochs=0)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """160 synthetic products in the Kaggle layout (``fashion synth``)."""
    from training.synth import generate

    root = tmp_path_factory.mktemp("tune") / "synth"
    generate(root, 160, seed=0)
    return root


class Stop(Exception):
    pass


def test_an_epoch_callback_that_asks_to_stop_ends_the_run_after_that_epoch(synth, tmp_path):
    seen: list[EpochRecord] = []

    def on_epoch(record: EpochRecord) -> bool:
        seen.append(record)
        return record.epoch == 2

    cfg = TrainConfig(data=str(synth), out=str(tmp_path / "run"), epochs=4, **TINY)
    result = train(cfg, on_epoch=on_epoch)
    assert [r.epoch for r in seen] == [1, 2] and result.epochs_run == 2
    assert result.best_score == max(r.val_score for r in seen)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_an_exception_from_the_epoch_callback_leaves_a_run_directory_that_resumes(synth, tmp_path):
    def on_epoch(record: EpochRecord) -> bool:
        if record.epoch == 2:
            raise Stop
        return False

    cfg = TrainConfig(data=str(synth), out=str(tmp_path / "run"), epochs=3, **TINY)
    with pytest.raises(Stop):
        train(cfg, on_epoch=on_epoch)
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    last = load_checkpoint(run / "last.pt")
    assert last.epoch == 2 and last.extra["best_epoch"] == load_checkpoint(run / "best.pt").epoch
    resumed = TrainConfig(data=str(synth), out=str(tmp_path / "resumed"), epochs=3,
                          resume=str(run / "last.pt"), **TINY)
    assert train(resumed).epochs_run == 1  # epoch 3 only: what the interrupted run left is whole
