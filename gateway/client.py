"""The gateway's tagging logic as a library: preprocessing, the Triton call and label decoding.

A Python service can call Triton itself (gRPC or HTTP) and get the same answer as the HTTP gateway,
without Flask and without torch::

    from gateway.client import FashionClient

    client = FashionClient.connect("triton:8001", repository="model_repository", model_name="fashion")
    with open("shirt.jpg", "rb") as f:
        answer = client.predict(f.read(), top_k=3)
    answer["predictions"]["baseColour"]["label"]      # e.g. "Blue"

    # A model that reads titles (``metadata.json``'s ``title``) also takes the listing's title:
    answer = client.predict(photo, title="Turtle Check Men Navy Blue Shirt")
    answer["inputs"]                                   # ["image", "title"]
    answer["predictions"]["baseColour"]["conflict"]    # True: the photo and the title disagree

A title is tokenised here (``fashion.text``, with the tokenizer in ``metadata.json``) and sent as the
model's second input; no title (``None`` or ``""``) sends all-zero ids, which the model answers from the
photo alone. A model that reads photos only answers a title's request from the photo and says so in
``inputs``.

Errors are the gateway's typed errors (``gateway.errors``): ``InvalidImage``, ``PayloadTooLarge``,
``UnsupportedMediaType``, ``InvalidOption``, ``InvalidTitle``, ``ModelUnavailable``, ``UpstreamTimeout``, ...

When Triton says "busy" (its queue is full) or is briefly unreachable (a restart), a client made by
``connect`` tries again after a jittered exponential back-off (``gateway.retry.Backoff``, 4 tries) instead of
failing or hammering it; ``retry=None`` turns that off. The gateway's own clients never retry: the gateway
answers 503 with Retry-After at once and leaves the retry to its caller.
"""

from __future__ import annotations

import math
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fashion.contract import DecodeLimits, ImageError, open_image, resize
from fashion.metadata import INPUT_NAME, ModelMetadata, OutputSpec, load_metadata
from fashion.schema import is_uncertain
from fashion.text import INPUT_NAME as TITLE_INPUT
from fashion.text import TitleError, TitleTokenizer, has_title
from gateway.errors import (
    ErrorCode,
    GatewayError,
    InvalidOption,
    InvalidTitle,
    UpstreamError,
    from_image_error,
    from_title_error,
)
from gateway.retry import Backoff
from gateway.triton import TritonBackend, TritonTransport

MAX_TOP_K = 100
# The limits a title is checked against when the model reads none (its answer says it used the photo only).
DEFAULT_TITLES = TitleTokenizer()
WHITESPACE_CONTROLS = frozenset("\t\n\r")  # the only control characters a title may hold
# Triton's answers that mean "come back shortly": its queue is full, or it is restarting.
RETRIED = frozenset({ErrorCode.TRITON_OVERLOADED, ErrorCode.TRITON_UNREACHABLE})
POLITE = Backoff()


def refused_character(c: str) -> bool:
    """A character ``FashionClient.check_title`` refuses in a title: a control character other than tab and
    line breaks, or U+FFFD (what undecodable bytes become)."""
    return c == "\ufffd" or (unicodedata.category(c) == "Cc" and c not in WHITESPACE_CONTROLS)


def acceptable_title(title: str | None, tokenizer: TitleTokenizer) -> str:
    """A catalogue's title as the gateway accepts it, with the very ids a trainer or a local run makes of
    it (``fashion.text.tokenize_all``): cut to ``max_chars``, the refused characters blanked (the tokenizer
    reads them as spaces anyway); ``""`` for no title."""
    cut = (title or "")[: tokenizer.max_chars]
    return "".join(" " if refused_character(c) else c for c in cut)


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

    def check_title(self, title: str | None) -> str | None:
        """``title`` as it will be used: None for no title (``None`` or ``""``), else the text checked
        against the model's tokenizer (``fashion.text``: at most ``max_chars`` characters, else
        ``title_too_long``) and refused as ``invalid_title`` when it holds control characters other than
        tab and line breaks, U+FFFD (what undecodable bytes become), or text that is not Unicode. A model
        that reads no titles checks them all the same, against ``fashion.text``'s limits."""
        if title is None or title == "":
            return None
        tokenizer = self.metadata.title.tokenizer if self.metadata.title is not None else DEFAULT_TITLES
        try:
            tokenizer.check(title)
        except TitleError as e:
            raise from_title_error(e) from e
        try:
            title.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidTitle(f"the title is not valid Unicode text ({e.reason})") from e
        bad = next((c for c in title if refused_character(c)), None)
        if bad == "\ufffd":
            raise InvalidTitle("the title is not UTF-8 text (it holds U+FFFD, what undecodable bytes become)")
        if bad is not None:
            raise InvalidTitle(f"the title holds the control character U+{ord(bad):04X}; send plain text")
        return title

    def title_ids(self, titles: Sequence[str | None]) -> np.ndarray | None:
        """The model's title input for checked ``titles`` (``check_title``): ``(N, max_tokens)`` int64 ids,
        all zeros where there is none; None for a model that reads no titles."""
        spec = self.metadata.title
        return None if spec is None else spec.tokenizer.batch(titles)

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

    def infer(self, batch: np.ndarray, titles: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Triton's outputs for ``batch`` and, for a model that reads titles, their ``titles`` ids (``None``:
        all zeros, no titles); "busy" answers are tried again as ``retry`` says."""
        meta = self.metadata
        extra: dict[str, np.ndarray] = {}
        if meta.title is not None:
            zeros = np.zeros((len(batch), meta.title.max_tokens), np.int64)  # no titles: the photo alone
            extra[meta.title.input] = titles if titles is not None else zeros
        attempt = 0
        while True:
            try:
                if not extra:  # a model that reads photos only: its one input (what any TritonBackend takes)
                    return self.triton.infer(
                        meta.name, meta.version, meta.input.name, batch, meta.output_names, self.timeout_s
                    )
                return self.triton.infer(
                    meta.name,
                    meta.version,
                    meta.input.name,
                    batch,
                    meta.output_names,
                    self.timeout_s,
                    extra_inputs=extra,
                )
            except GatewayError as e:
                attempt += 1
                if self.retry is None or e.code not in RETRIED or attempt >= self.retry.attempts:
                    raise
                time.sleep(self.retry.delay_s(attempt))

    def inputs_used(self, titled: bool) -> list[str]:
        """What the model read for an image: the photo and, when it reads titles and one was given, the
        title (the response's ``inputs``)."""
        return [INPUT_NAME, TITLE_INPUT] if titled and self.metadata.title is not None else [INPUT_NAME]

    def decode(
        self,
        outputs: dict[str, np.ndarray],
        row: int,
        specs: Sequence[OutputSpec],
        top_k: int,
        titled: bool = False,
    ) -> dict[str, Any]:
        """One image's probabilities → ``{attribute: {label, confidence, top_k, uncertain}}``; with a title
        the model read (``titled``), each attribute also has ``conflict`` (its score above the threshold)."""
        conflicts = self._conflicts(outputs, row) if titled else None
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
            if conflicts is not None:
                predictions[spec.attribute]["conflict"] = conflicts[spec.attribute]
        return predictions

    def _conflicts(self, outputs: dict[str, np.ndarray], row: int) -> dict[str, bool] | None:
        """Per attribute, whether the title model's conflict score of ``row`` is above its threshold."""
        spec = self.metadata.title
        if spec is None:
            return None
        scores = outputs.get(spec.conflict_output)
        if scores is None or scores.ndim != 2 or scores.shape[1] != len(self.metadata.outputs):
            shape = None if scores is None else list(scores.shape)
            raise UpstreamError(
                f"output {spec.conflict_output!r} has shape {shape}, the metadata expects "
                f"[N, {len(self.metadata.outputs)}]: the served model and its metadata.json disagree",
                code=ErrorCode.OUTPUT_MISMATCH,
            )
        values = scores[row].astype(np.float64)
        if not np.all(np.isfinite(values)):
            raise UpstreamError(
                f"output {spec.conflict_output!r} holds NaN or infinite values",
                code=ErrorCode.OUTPUT_MISMATCH,
            )
        outputs_and_scores = zip(self.metadata.outputs, values, strict=True)
        return {o.attribute: spec.conflicts(o.attribute, float(v)) for o, v in outputs_and_scores}

    # -- whole requests ------------------------------------------------------------------------
    def predict_batch(
        self,
        images: Sequence[bytes],
        *,
        top_k: int = 3,
        category: str | None = None,
        titles: Sequence[str | None] | None = None,
    ) -> BatchResult:
        """Tag ``images`` with one Triton request; a bad image (or a bad title) gets an error entry, not a
        failed batch. ``titles``: one per image, in order (``None`` or ``""``: none), or ``None`` for none.

        Triton failures (``ModelUnavailable``, ``UpstreamTimeout``, ``UpstreamError``) raise: they concern
        every image alike.
        """
        top_k = self.check_top_k(top_k)
        specs = self.outputs_for(category)
        given = [None] * len(images) if titles is None else list(titles)
        if len(given) != len(images):
            raise InvalidTitle(
                f"{len(given)} titles for {len(images)} images: send one title per image, in order "
                "(an empty one for an image without), or none",
                code=ErrorCode.TITLE_COUNT_MISMATCH,
            )
        stage = {"decode": 0.0, "resize": 0.0, "triton": 0.0, "postprocess": 0.0}
        arrays: list[np.ndarray] = []
        kept: list[str | None] = []
        rows: list[int | None] = []
        errors: list[GatewayError | None] = []
        for data, raw in zip(images, given, strict=True):
            try:
                title = self.check_title(raw)  # before the decode: a refused title costs no decoding
                array, decode_s, resize_s = self.preprocess(data)
            except GatewayError as e:
                rows.append(None)
                errors.append(e)
                continue
            stage["decode"] += decode_s
            stage["resize"] += resize_s
            rows.append(len(arrays))
            arrays.append(array)
            kept.append(title)
            errors.append(None)
        outputs: dict[str, np.ndarray] = {}
        ids = self.title_ids(kept)
        titled = has_title(ids) if ids is not None else np.zeros(len(arrays), bool)
        if arrays:
            t0 = time.perf_counter()
            outputs = self.infer(np.stack(arrays), ids)
            stage["triton"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        results: list[dict[str, Any]] = []
        for row, error in zip(rows, errors, strict=True):
            if row is None:
                assert error is not None
                results.append({"error": {"code": error.code, "message": error.message}})
            else:
                used = bool(titled[row])
                results.append(
                    {
                        "inputs": self.inputs_used(used),
                        "predictions": self.decode(outputs, row, specs, top_k, titled=used),
                    }
                )
        stage["postprocess"] = time.perf_counter() - t0
        return BatchResult(results, errors, stage)

    def predict(
        self, image: bytes, *, top_k: int = 3, category: str | None = None, title: str | None = None
    ) -> dict[str, Any]:
        """Tag one image, with the listing's ``title`` if given: ``{"model", "inputs", "predictions",
        "timing_ms"}``, the gateway's response body."""
        batch = self.predict_batch([image], top_k=top_k, category=category, titles=[title])
        if batch.errors[0] is not None:
            raise batch.errors[0]
        return {
            "model": self.model,
            "inputs": batch.results[0]["inputs"],
            "predictions": batch.results[0]["predictions"],
            "timing_ms": batch.timing_ms,
        }


def _round(value: float) -> float:
    return 0.0 if math.isnan(value) else round(float(value), 6)
