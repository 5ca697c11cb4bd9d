"""The metadata document written next to each model version (``<repository>/<name>/<version>/metadata.json``).

It is the only thing the gateway reads besides Triton: the preprocessing contract, the input tensor,
each output's attribute and classes, category → attributes, calibration/abstain settings, and where the
model came from. Format ``fashion-tagger/metadata@1`` (documented in ``model_repository/README.md``).
Only the writer lives here; readers (the gateway) own their own parser and must not import ``export``.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping
from typing import Any

from fashion.contract import Preprocessing
from fashion.schema import LabelSchema

FORMAT = "fashion-tagger/metadata@1"


def build_metadata(
    *,
    schema: LabelSchema,
    preprocessing: Preprocessing,
    backbone: str,
    temperatures: Mapping[str, float],
    thresholds: Mapping[str, float],
    training: Mapping[str, Any],
    export: Mapping[str, Any],
    precision: str = "fp32",
    runtime: str = "onnxruntime",
) -> dict[str, Any]:
    """The metadata document; ``model.name`` and ``model.version`` are set by the repository writer."""
    size = preprocessing.image_size
    return {
        "format": FORMAT,
        "model": {
            "name": None,
            "version": None,
            "precision": precision,
            "runtime": runtime,  # what configs/cpu.pbtxt runs (export.runtimes)
            "backbone": backbone,
        },
        "input": {"name": "image", "datatype": "UINT8", "shape": [-1, size, size, 3], "layout": "NHWC"},
        "preprocessing": preprocessing.to_dict(),
        "category_column": schema.category_column,
        "categories": schema.categories,
        "outputs": [
            {
                "attribute": a.name,
                "label": a.label,
                "category": a.category,
                "tensor": a.tensor,
                "datatype": "FP32",
                "classes": list(a.classes),
                "temperature": float(temperatures.get(a.name, 1.0)),
                "threshold": thresholds.get(a.name),
            }
            for a in schema.attributes
        ],
        "training": dict(training),
        "export": {
            "created_unix_s": round(time.time(), 3),
            "host_python": platform.python_version(),
            **export,
        },
    }
