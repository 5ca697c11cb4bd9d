"""Where a training run executes: this process's rank among the DistributedDataParallel processes (when
``torchrun`` started it: ``LOCAL_RANK`` set), its device, its seeds and the run directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from training.config import TrainConfig
from training.context import resolve_device


@dataclass(frozen=True)
class Run:
    """One process of a training run. Rank 0 (``main``) validates and writes the run directory."""

    device: torch.device
    rank: int
    world: int  # processes in all; 1 without torchrun
    local_rank: int
    rng: np.random.Generator  # the run's NumPy randomness (batch order of cached features, MixUp/CutMix)
    run_dir: Path

    @property
    def main(self) -> bool:
        return self.rank == 0


def _distributed() -> tuple[int, int, int]:
    """(local rank, rank, world size); joins the process group when torchrun started this process."""
    if "LOCAL_RANK" not in os.environ:
        return 0, 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ["LOCAL_RANK"]), dist.get_rank(), dist.get_world_size()


def start_run(cfg: TrainConfig) -> Run:
    """Join the process group if any, pick the device, seed torch and NumPy, create the run directory."""
    local_rank, rank, world = _distributed()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    torch.manual_seed(cfg.seed + rank)
    rng = np.random.default_rng(cfg.seed + rank)
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    return Run(device, rank, world, local_rank, rng, run_dir)


def agree_to_stop(run: Run, stop: bool) -> bool:
    """Rank 0's decision to stop, for every process (each must leave the epoch loop together)."""
    if run.world == 1:
        return stop
    flag = torch.tensor([int(stop)], device=run.device)
    dist.broadcast(flag, 0)
    return bool(flag.item())


def end_run(run: Run) -> None:
    if run.world > 1:
        dist.destroy_process_group()
