"""The title branch: hashed title tokens (``fashion.text``) → one feature vector beside the photo's.

An embedding bag (the mean of the embeddings of the title's token ids, padding excluded), as fastText
classifies text: no download, a few MB of weights, and in ONNX nothing but a Gather, a sum and a division.
The branch returns the vector and a 0/1 column that says whether the row had a title; a row without one
gets zeros in both, so the heads read exactly the image-only features (one model serves both kinds of
request).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fashion.text import PAD, TitleTokenizer


class TitleEncoder(nn.Module):
    """``(N, max_tokens)`` int64 ids → ``(N, dim + 1)``: the mean embedding, then the has-title flag."""

    def __init__(self, tokenizer: TitleTokenizer, dim: int = 64) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.dim = dim
        self.embedding = nn.Embedding(tokenizer.buckets, dim, padding_idx=PAD)
        nn.init.normal_(self.embedding.weight, std=0.1)
        with torch.no_grad():
            self.embedding.weight[PAD].zero_()

    @property
    def features(self) -> int:
        return self.dim + 1

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        present = (ids != PAD).to(self.embedding.weight.dtype)  # (N, L)
        count = present.sum(1, keepdim=True)
        summed = self.embedding(ids).sum(1)  # the padding row is zero and stays zero (padding_idx)
        has = (count > 0).to(summed.dtype)
        return torch.cat([summed / count.clamp(min=1.0), has], dim=1)

    def describe(self) -> dict[str, object]:
        """What a checkpoint stores to rebuild the branch before loading its weights."""
        return {"tokenizer": self.tokenizer.to_dict(), "dim": self.dim}

    @classmethod
    def from_description(cls, d: dict) -> TitleEncoder:
        return cls(TitleTokenizer.from_dict(d["tokenizer"]), int(d["dim"]))


@dataclass(frozen=True)
class Titles:
    """The listings' titles as model input (``fashion.text``), rows aligned with the split's labels."""

    tokenizer: TitleTokenizer
    train: np.ndarray  # (n, max_tokens) int64, all zeros where a listing has no title
    val: np.ndarray
