"""The gateway's tagging logic as a library: preprocessing, the Triton call and label decoding.

A Python service can call Triton itself (gRPC or HTTP) and get the same answer as the HTTP gateway,
without Flask and without torch::

    from gateway.client import FashionClient

    client = FashionClient.connect("triton:8001", repository="model_repository", model_name="fashion")
    with open("shirt.jpg", "rb") as f:
        answer = client.predict(f.read(), top_k=3)
    answer["predictions"]["baseColour"]["label"]      # e.g. "Blue"

Errors are the gateway's typed errors (``gateway.errors``): ``InvalidImage``, ``PayloadTooLarge``,
``UnsupportedMediaType``, ``InvalidOption``, ``ModelUnavailable``, ``UpstreamTimeout``, ...

When Triton says "busy" (its queue is full) or is briefly unreachable (a restart), a client made by
``connect`` tries again after a jittered exponential back-off (``gateway.retry.Backoff``, 4 tries) instead of
failing or hammering it; ``retry=None`` turns that off. The gateway's own clients never retry: the gateway
answers 503 with Retry-After at once and leaves the retry to its caller.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fashion.contract import DecodeLimits, ImageError, open_image, resize
from fashion.metadata import ModelMetadata, OutputSpec, load_metadata
from fashion.schema import is_uncertain
from gateway.errors import ErrorCode, GatewayError, InvalidOption, UpstreamError, from_image_error
from gateway.retry import Backoff
from gateway.triton import TritonBackend, TritonTransport

MAX_TOP_K = 100
# Triton's answers that mean "come back shortly": its queue is full, or it is restarting.
RETRIED = frozenset({ErrorCode.TRITON_OVERLOADED, ErrorCode.TRITON_UNREACHABLE})
POLITE = Backoff()


@dataclass
class BatchResult:
    """Per image either ``{"predictions": ...}`` or ``{"error": {...}}``, in input order, plus stage times."""

    results: list[dict[str, Any]]
    errors: list[GatewayError | None]
    stage_s: dict[str, float] = field(default_factory=dict)  # decode, resize, triton, postprocess

    @property
    def timing_ms(self) -> dict[str, float]:
        pre = self.stage_s.get("decode", 0.0) + self.stage_s.get("resize", 0.0)
        return {
            "preprocess": round(pre * 1000, 3),
            "inference": round(self.stage_s.get("triton", 0.0) * 1000, 3),
            "total": round(sum(self.stage_s.values()) * 1000, 3),
        }


class FashionClient:
    """Tag images with one model version: ``metadata`` says how, ``triton`` does the inference."""

    def __init__(
        self,
        metadata: ModelMetadata,
        triton: TritonBackend,
        *,
        limits: DecodeLimits | None = None,
        timeout_s: float = 10.0,
        retry: Backoff | None = None,
    ) -> None:
        self.metadata = metadata
        self.triton = triton
        self.limits = limits or DecodeLimits()
        self.timeout_s = timeout_s
        self.retry = retry

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        repository: str | Path = "model_repository",
        model_name: str = "fashion",
        version: str | int = "",
        protocol: str = "grpc",
        timeout_s: float = 10.0,
        limits: DecodeLimits | None = None,
        retry: Backoff | None = POLITE,
    ) -> FashionClient:
        """A client for ``<repository>/<model_name>/<version>/metadata.json`` served by Triton at ``url``;
        Triton's "busy" answers are retried with ``retry`` (``None``: never)."""
        metadata = load_metadata(repository, model_name, version)
        transport = TritonTransport(url, protocol, timeout_s)
        return cls(metadata, transport, limits=limits, timeout_s=timeout_s, retry=retry)

    @property
    def model(self) -> dict[str, Any]:
        return {"name": self.metadata.name, "version": self.metadata.version}

    # -- options -------------------------------------------------------------------------------
    def outputs_for(self, category: str | None) -> tuple[OutputSpec, ...]:
        """The heads answered for ``category``; an unknown category is an ``InvalidOption`` (422)."""
        if category is None:
            return self.metadata.outputs
        if category not in self.metadata.categories:
            known = ", ".join(sorted(self.metadata.categories)) or "none (this model has no categories)"
            raise InvalidOption(
                f"unknown category {category!r}; known categories: {known}", code=ErrorCode.UNKNOWN_CATEGORY
            )
        return self.metadata.outputs_for(category)

    @staticmethod
    def check_top_k(top_k: Any) -> int:
        try:
            value = int(str(top_k).strip()) if not isinstance(top_k, int) else top_k
        except ValueError:
            value = 0
        if isinstance(top_k, bool) or not 1 <= value <= MAX_TOP_K:
            raise InvalidOption(
                f"top_k must be an integer from 1 to {MAX_TOP_K}, got {top_k!r}", code=ErrorCode.INVALID_TOP_K
            )
        return value

    # -- the three stages ----------------------------------------------------------------------
    def preprocess(self, data: bytes) -> tuple[np.ndarray, float, float]:
        """Bytes → the contract's uint8 HWC array, and the decode and resize seconds."""
        pre = self.metadata.preprocessing
        t0 = time.perf_counter()
        try:
            image = open_image(data, pre, self.limits)
        except ImageError as e:
            raise from_image_error(e) from e
        t1 = time.perf_counter()
        array = resize(image, pre)
        return array, t1 - t0, time.perf_counter() - t1

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Triton's outputs for ``batch``; "busy" answers are tried again as ``retry`` says."""
        meta = self.metadata
        attempt = 0
        while True:
            try:
                return self.triton.infer(
                    meta.name, meta.version, meta.input.name, batch, meta.output_names, self.timeout_s
                )
            except GatewayError as e:
                attempt += 1
                if self.retry is None or e.code not in RETRIED or attempt >= self.retry.attempts:
                    raise
                time.sleep(self.retry.delay_s(attempt))

    def decode(
        self, outputs: dict[str, np.ndarray], row: int, specs: Sequence[OutputSpec], top_k: int
    ) -> dict[str, Any]:
        """One image's probabilities → ``{attribute: {label, confidence, top_k, uncertain}}``."""
        predictions = {}
        for spec in specs:
            array = outputs.get(spec.tensor)
            if array is None or array.ndim != 2 or array.shape[1] != len(spec.classes):
                shape = None if array is None else list(array.shape)
                raise UpstreamError(
                    f"output {spec.tensor!r} has shape {shape}, the metadata expects "
                    f"[N, {len(spec.classes)}]: "
                    "the served model and its metadata.json disagree",
                    code=ErrorCode.OUTPUT_MISMATCH,
                )
            probs = array[row].astype(np.float64)
            if not np.all(np.isfinite(probs)):
                raise UpstreamError(
                    f"output {spec.tensor!r} holds NaN or infinite values", code=ErrorCode.OUTPUT_MISMATCH
                )
            order = np.argsort(-probs, kind="stable")[: min(top_k, len(spec.classes))]
            ranked = [{"label": spec.classes[i], "confidence": _round(probs[i])} for i in order]
            best = ranked[0]
            predictions[spec.attribute] = {
                "label": best["label"],
                "confidence": best["confidence"],
                "top_k": ranked,
                "uncertain": bool(is_uncertain(probs[order[0]], spec.threshold)),
            }
        return predictions

    # -- whole requests ------------------------------------------------------------------------
    def predict_batch(
        self, images: Sequence[bytes], *, top_k: int = 3, category: str | None = None
    ) -> BatchResult:
        """Tag ``images`` with one Triton request; a bad image gets an error entry, not a failed batch.

        Triton failures (``ModelUnavailable``, ``UpstreamTimeout``, ``UpstreamError``) raise: they concern
        every image alike.
        """
        top_k = self.check_top_k(top_k)
        specs = self.outputs_for(category)
        stage = {"decode": 0.0, "resize": 0.0, "triton": 0.0, "postprocess": 0.0}
        arrays: list[np.ndarray] = []
        rows: list[int | None] = []
        errors: list[GatewayError | None] = []
        for data in images:
            try:
                array, decode_s, resize_s = self.preprocess(data)
            except GatewayError as e:
                rows.append(None)
                errors.append(e)
                continue
            stage["decode"] += decode_s
            stage["resize"] += resize_s
            rows.append(len(arrays))
            arrays.append(array)
            errors.append(None)
        outputs: dict[str, np.ndarray] = {}
        if arrays:
            t0 = time.perf_counter()
            outputs = self.infer(np.stack(arrays))
            stage["triton"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        results: list[dict[str, Any]] = []
        for row, error in zip(rows, errors, strict=True):
            if row is None:
                assert error is not None
                results.append({"error": {"code": error.code, "message": error.message}})
            else:
                results.append({"predictions": self.decode(outputs, row, specs, top_k)})
        stage["postprocess"] = time.perf_counter() - t0
        return BatchResult(results, errors, stage)

    def predict(self, image: bytes, *, top_k: int = 3, category: str | None = None) -> dict[str, Any]:
        """Tag one image: ``{"model", "predictions", "timing_ms"}``, the gateway's response body."""
        batch = self.predict_batch([image], top_k=top_k, category=category)
        if batch.errors[0] is not None:
            raise batch.errors[0]
        return {
            "model": self.model,
            "predictions": batch.results[0]["predictions"],
            "timing_ms": batch.timing_ms,
        }


def _round(value: float) -> float:
    return 0.0 if math.isnan(value) else round(float(value), 6)
