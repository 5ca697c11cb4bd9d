"""Prior correction: divide the training catalogue's class mix out of a trained model's answers.

A classifier trained on a catalogue that is 68 % Men learns that mix as a prior; a later catalogue that is
45 % Women pays for it. Post-hoc logit adjustment (Menon et al., ICLR 2021, eq. 2) subtracts
``tau * log prior`` from each head's logits — here folded into the head's bias, so that the exported graph,
the gateway and every tool serve the corrected model with no change. ``tau = 1`` gives the balanced
classifier (each class equally likely a priori), ``0`` leaves the model as trained; the recipe chooses
``tau`` by measurement on a split by period (``fashion evaluate --subset drift --prior-correction T``).
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
from torch import nn

from training.checkpoint import Checkpoint
from training.context import checkpoint_config, prepare_data
from training.data import encode
from training.loss import log_priors
from training.model import FashionNet


def shift_biases(model: FashionNet, priors: list[torch.Tensor], tau: float) -> None:
    """``bias -= tau * log prior`` on every head (in place), the title-only heads too: they vote in an
    image + title answer (``FashionNet.served_logits``) and learnt the same training mix."""
    with torch.no_grad():
        for j, a in enumerate(model.schema.attributes):
            linears = [cast(nn.Linear, cast(nn.Sequential, model.heads[a.tensor])[1])]
            if model.title_heads is not None:
                linears.append(cast(nn.Linear, model.title_heads[a.tensor]))
            for linear in linears:
                linear.bias.sub_(tau * priors[j].to(linear.bias.device, linear.bias.dtype))


def training_priors(ckpt: Checkpoint, labels: np.ndarray | None = None) -> list[torch.Tensor]:
    """Log class frequencies of the checkpoint's training split (re-created from its data unless the
    labels are given)."""
    if labels is None:
        _, train, _ = prepare_data(checkpoint_config(ckpt))
        labels = encode(ckpt.schema, train)
    return log_priors(labels, ckpt.schema)


def correct_priors(ckpt: Checkpoint, tau: float, labels: np.ndarray | None = None) -> None:
    """Fold ``tau`` of prior correction into ``ckpt``'s model and record it in its config."""
    if tau <= 0:
        return
    shift_biases(ckpt.model, training_priors(ckpt, labels), tau)
    ckpt.config = {**ckpt.config, "prior_correction": tau}
