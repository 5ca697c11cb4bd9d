"""Which model version the gateway answers with, and whether it is ready.

``ModelState.current()`` hands each request one immutable ``FashionClient`` (metadata + transport), so a
request's labels always belong to the version it asked Triton for. When no version is pinned, the state
looks for a newer ``<version>/metadata.json`` at most every ``metadata_refresh_s`` and switches to it once
Triton reports that version ready — an atomic swap of one reference, no request sees a mix.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from fashion.contract import DecodeLimits
from gateway.client import FashionClient
from gateway.config import GatewayConfig
from gateway.errors import GatewayError, ModelUnavailable
from gateway.metadata import MetadataError, ModelMetadata, load_metadata, resolve_version
from gateway.triton import TritonBackend

log = logging.getLogger(__name__)


class ModelState:
    def __init__(self, config: GatewayConfig, triton: TritonBackend) -> None:
        self.config = config
        self.triton = triton
        self.limits = DecodeLimits(max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels)
        self._lock = threading.Lock()
        self._client: FashionClient | None = None
        self._error = "metadata not loaded yet"
        self._checked_at = float("-inf")

    def _make(self, metadata: ModelMetadata) -> FashionClient:
        return FashionClient(metadata, self.triton, limits=self.limits, timeout_s=self.config.timeout_s)

    def refresh(self, *, force: bool = False) -> None:
        """Load the metadata of the version to serve; switch only to a version Triton has ready."""
        now = time.monotonic()
        if not force and now - self._checked_at < self.config.metadata_refresh_s:
            return
        with self._lock:
            if not force and now - self._checked_at < self.config.metadata_refresh_s:
                return
            self._checked_at = now
            current = self._client
            cfg = self.config
            try:
                version = resolve_version(cfg.model_repository, cfg.model_name, cfg.model_version)
                if current is not None and current.metadata.version == version:
                    return
                metadata = load_metadata(cfg.model_repository, cfg.model_name, version)
            except MetadataError as e:
                self._error = str(e)
                if current is None:
                    log.warning("model metadata unavailable: %s", e)
                else:
                    log.warning("keeping model version %s: %s", current.metadata.version, e)
                return
            if current is not None:
                try:
                    ready = self.triton.model_ready(cfg.model_name, version)
                except GatewayError:
                    ready = False
                if not ready:
                    log.info(
                        "version %s of %s is on disk but not ready in Triton; still serving %s",
                        version,
                        cfg.model_name,
                        current.metadata.version,
                    )
                    return
            self._client = self._make(metadata)
            self._error = ""
            log.info("serving model %s version %s (%s)", metadata.name, metadata.version, metadata.path)

    def current(self) -> FashionClient:
        """The client of the version to answer with; ``ModelUnavailable`` (503) when there is none."""
        self.refresh()
        client = self._client
        if client is None:
            raise ModelUnavailable(f"no model metadata: {self._error}", code="metadata_unavailable")
        return client

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, details): Triton reachable, model version ready, served outputs match the metadata."""
        self.refresh(force=True)
        client = self._client
        if client is None:
            return False, {"reason": f"no model metadata: {self._error}"}
        meta = client.metadata
        details: dict[str, Any] = {"model": client.model}
        try:
            if not self.triton.server_ready():
                return False, {**details, "reason": "Triton is not ready"}
            if not self.triton.model_ready(meta.name, meta.version):
                return False, {
                    **details,
                    "reason": f"model {meta.name} version {meta.version} is not ready in Triton",
                }
            served = self.triton.model_metadata(meta.name, meta.version)
        except GatewayError as e:
            return False, {**details, "reason": e.message}
        problems = skew(meta, served)
        if problems:
            return False, {
                **details,
                "reason": "the served model does not match metadata.json (version skew): "
                + "; ".join(problems),
            }
        return True, details


def skew(meta: ModelMetadata, served: dict[str, Any]) -> list[str]:
    """What differs between the metadata file and the model Triton serves (empty when they agree)."""
    problems = []
    inputs = {t["name"]: t for t in served.get("inputs", [])}
    given = inputs.get(meta.input.name)
    if given is None:
        problems.append(f"Triton's model has no input {meta.input.name!r} (it has {sorted(inputs)})")
    elif given["datatype"] != meta.input.datatype:
        problems.append(
            f"input {meta.input.name!r} is {given['datatype']} in Triton, "
            f"{meta.input.datatype} in metadata.json"
        )
    elif list(given["shape"][-3:]) != list(meta.input.shape[-3:]):
        problems.append(
            f"input {meta.input.name!r} has shape {given['shape']} in Triton, "
            f"{list(meta.input.shape)} in metadata.json"
        )
    outputs = {t["name"]: t for t in served.get("outputs", [])}
    expected = {o.tensor: o for o in meta.outputs}
    missing = sorted(set(expected) - set(outputs))
    extra = sorted(set(outputs) - set(expected))
    if missing:
        problems.append(f"outputs missing in Triton's model: {missing}")
    if extra:
        problems.append(f"outputs in Triton's model that metadata.json lacks: {extra}")
    for name in sorted(set(expected) & set(outputs)):
        shape = outputs[name]["shape"]
        if not shape or shape[-1] != len(expected[name].classes):
            problems.append(
                f"output {name!r} has shape {shape} in Triton but "
                f"{len(expected[name].classes)} classes in metadata.json"
            )
    return problems
