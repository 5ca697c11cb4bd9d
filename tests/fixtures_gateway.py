"""Helpers of the gateway's unit tests: a metadata.json writer, test images, and a stand-in for Triton.

``FakeTriton`` implements ``gateway.triton.TritonBackend`` for the unit tests only; the stack tests run the
real Triton. Its "model" scores each image by its mean colour, so a test can check that answers come back
for the right image in the right order. With a ``title`` section in its metadata (``titled_metadata``) it
reads titles too: its conflict score for ``colour`` is high when the title names a colour that is not the
photo's (found by the title's ids, so a gateway that tokenised differently would get no conflict).
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fashion.contract import Preprocessing
from gateway.errors import GatewayError

COLOURS = ("red", "green", "blue")
OUTPUTS = [
    # attribute, label, category, tensor, classes, threshold
    ("colour", "colour", None, "colour", list(COLOURS), None),
    ("brightness", "brightness", None, "brightness", ["dark", "light"], 0.9),
    ("Tshirts/neck", "neck", "Tshirts", "Tshirts_neck", ["round", "polo", "v", "henley"], None),
    ("Sarees/border", "border", "Sarees", "Sarees_border", ["zari", "solid"], None),
]


def metadata_dict(
    name: str = "fashion", version: int = 1, image_size: int = 32, outputs: list[tuple] | None = None
) -> dict[str, Any]:
    outputs = OUTPUTS if outputs is None else outputs
    pre = Preprocessing(image_size=image_size, resize_mode="letterbox")
    categories: dict[str, list[str]] = {}
    for attribute, _label, category, *_ in outputs:
        if category is not None:
            categories.setdefault(category, []).append(attribute)
    return {
        "format": "fashion-tagger/metadata@1",
        "model": {"name": name, "version": version, "precision": "fp32", "backbone": "test"},
        "input": {
            "name": "image",
            "datatype": "UINT8",
            "shape": [-1, image_size, image_size, 3],
            "layout": "NHWC",
        },
        "preprocessing": pre.to_dict(),
        "category_column": "Category",
        "categories": categories,
        "outputs": [
            {
                "attribute": a,
                "label": lab,
                "category": c,
                "tensor": t,
                "datatype": "FP32",
                "classes": cls,
                "temperature": 1.0,
                "threshold": th,
            }
            for a, lab, c, t, cls, th in outputs
        ],
    }


def titled_metadata(buckets: int = 4096, max_tokens: int = 24, **kwargs: Any) -> dict[str, Any]:
    """``metadata_dict`` of a model that reads titles (``fashion.metadata.TitleSpec``): conflict thresholds
    0.5 for ``colour``, none for the other attributes."""
    from fashion.metadata import TitleSpec
    from fashion.text import TitleTokenizer

    doc = metadata_dict(**kwargs)
    spec = TitleSpec(
        TitleTokenizer(buckets=buckets, max_tokens=max_tokens), conflict_thresholds={"colour": 0.5}
    )
    return {**doc, "title": spec.to_dict()}


def write_metadata(repository: Path, name: str = "fashion", version: int = 1, **kwargs: Any) -> Path:
    folder = repository / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "metadata.json"
    path.write_text(json.dumps(metadata_dict(name, version, **kwargs)))
    return path


def encode(image: Image.Image, fmt: str = "JPEG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (40, 56), fmt: str = "JPEG") -> bytes:
    return encode(Image.new("RGB", size, colour), fmt)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width``×``height`` pixels and holds almost no data (a bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` whose labels include ``labels`` in a Prometheus text exposition (a
    gateway's ``/metrics``), parsed by prometheus-client's own parser; 0 when there is none."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


class FakeTriton:
    """A ``TritonBackend`` whose model scores images by mean colour; failures are injected per test."""

    def __init__(self, metadata: dict[str, Any] | None = None) -> None:
        self.metadata = metadata or metadata_dict()
        self.calls: list[dict[str, Any]] = []
        self.error: GatewayError | None = None  # raised by every call when set
        self.ready = True
        self.ready_versions: set[int] | None = None  # None = every version
        self.served_outputs: list[dict[str, Any]] | None = None  # None = what the metadata says
        self.block: threading.Event | None = None  # infer waits for it when set
        self.entered = threading.Event()

    def infer(
        self,
        model: str,
        version: int,
        input_name: str,
        batch: np.ndarray,
        outputs: Any,
        timeout_s: float,
        *,
        extra_inputs: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        self.calls.append(
            {
                "model": model,
                "version": version,
                "input": input_name,
                "shape": batch.shape,
                "dtype": batch.dtype,
                "outputs": list(outputs),
                "extra_inputs": dict(extra_inputs or {}),
            }
        )
        self.entered.set()
        if self.block is not None:
            self.block.wait(10)
        if self.error is not None:
            raise self.error
        means = batch.reshape(batch.shape[0], -1, 3).mean(axis=1)  # (N, 3) in 0..255
        result = {}
        for spec in self.metadata["outputs"]:
            n = len(spec["classes"])
            if spec["tensor"] == "colour":
                logits = means / 10.0
            elif spec["tensor"] == "brightness":
                light = means.mean(axis=1, keepdims=True) / 255.0
                logits = np.concatenate([1 - light, light], axis=1) * 4
            else:
                logits = np.tile(np.arange(n, 0, -1, dtype=np.float64), (batch.shape[0], 1))
            result[spec["tensor"]] = softmax(logits)
        title = self.metadata.get("title")
        if title is not None:
            result[title["conflict"]["output"]] = self._conflict(means, (extra_inputs or {})[title["input"]])
        return {name: result[name] for name in outputs}

    def _conflict(self, means: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """``(N, attributes)``: 0.95 for ``colour`` where the title names a colour that is not the photo's
        (by the id of the colour's word), 0.05 where it names the photo's or none, 0 without a title."""
        from fashion.text import TitleTokenizer, has_title

        tokenizer = TitleTokenizer.from_dict(self.metadata["title"]["tokenizer"])
        word = {c: tokenizer.ids(c)[0] for c in COLOURS}  # "w:<colour>", the first token of the word
        scores = np.zeros((len(ids), len(self.metadata["outputs"])), np.float32)
        column = [o["tensor"] for o in self.metadata["outputs"]].index("colour")
        for row, (mean, title) in enumerate(zip(means, ids, strict=True)):
            named = [c for c in COLOURS if word[c] in title]
            photo = COLOURS[int(np.argmax(mean))]
            scores[row, column] = (
                0.95 if named and photo not in named else 0.05 if has_title(title[None])[0] else 0
            )
        return scores

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def server_ready(self) -> bool:
        self._check()
        return self.ready

    def model_ready(self, model: str, version: int) -> bool:
        self._check()
        return self.ready and (self.ready_versions is None or version in self.ready_versions)

    def model_metadata(self, model: str, version: int) -> dict[str, Any]:
        self._check()
        outputs = self.served_outputs
        inputs = [{"name": "image", "datatype": "UINT8", "shape": self.metadata["input"]["shape"]}]
        title = self.metadata.get("title")
        if outputs is None:
            outputs = [
                {"name": o["tensor"], "datatype": "FP32", "shape": [-1, len(o["classes"])]}
                for o in self.metadata["outputs"]
            ]
            if title is not None:
                shape = [-1, len(self.metadata["outputs"])]
                outputs.append({"name": title["conflict"]["output"], "datatype": "FP32", "shape": shape})
        if title is not None:
            inputs.append({"name": title["input"], "datatype": "INT64", "shape": title["shape"]})
        return {"inputs": inputs, "outputs": outputs}


@contextlib.contextmanager
def prediction_in_flight(app: Any, fake: FakeTriton, image: bytes) -> Iterator[dict[str, Any]]:
    """One prediction of ``image`` held inside ``fake``'s Triton call while the body runs (it holds a slot);
    released on exit, its response then under ``"response"`` of the yielded dict."""
    fake.block = threading.Event()
    first: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: first.update(
            response=app.test_client().post("/v1/predict", data=image, content_type="image/jpeg")
        )
    )
    worker.start()
    try:
        assert fake.entered.wait(5)
        yield first
    finally:
        fake.block.set()
        worker.join(10)
