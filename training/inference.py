"""The one batched-inference loop: run a model step over batches and gather its outputs as numpy arrays.

Training validation, calibration, prediction, the novelty experiments and the export's PyTorch reference
all need "these images through the model, in batches, without gradients, back as arrays per head". They
differ only in what one step returns (logits, calibrated probabilities, pooled features) and where the
batches come from (an array in memory, decoded files, a trunk cache), so those two are the arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from fashion.schema import LabelSchema


def head_widths(schema: LabelSchema) -> dict[str, int]:
    """Output name → class count of every head, in schema order (the shape of an empty result)."""
    return {a.name: a.num_classes for a in schema.attributes}


def image_batches(
    images: np.ndarray, batch_size: int, device: torch.device | str = "cpu"
) -> Iterator[torch.Tensor]:
    """Consecutive uint8 NHWC batches of ``images`` as tensors on ``device``."""
    for start in range(0, len(images), batch_size):
        yield torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)


def collect(
    step: Callable[[Any], Mapping[str, torch.Tensor]],
    batches: Iterable[Any],
    widths: Mapping[str, int],
) -> dict[str, np.ndarray]:
    """``step`` applied to every batch under ``torch.no_grad``, its outputs concatenated per name.

    ``widths`` names the outputs kept and their second dimension, so that no batches at all still gives
    ``(0, width)`` arrays. The caller puts the model in eval mode.
    """
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in widths}
    with torch.no_grad():
        for batch in batches:
            out = step(batch)
            for name in widths:
                chunks[name].append(out[name].float().cpu().numpy())
    return {
        name: np.concatenate(chunks[name]) if chunks[name] else np.zeros((0, width), np.float32)
        for name, width in widths.items()
    }
