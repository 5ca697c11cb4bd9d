"""Which model version the gateway answers with, and whether it is ready.

``ModelState.current()`` hands each request one immutable ``FashionClient`` (metadata + transport), so a
request's labels always belong to the version it asked Triton for: a response never mixes one version's
labels with another's outputs.

Triton is the source of truth for which version serves (``fashion deploy`` loads one and unloads the others).
When no version is pinned, the state serves the highest version that has a ``<version>/metadata.json`` on
disk *and* is ready in Triton, looked up at most every ``metadata_refresh_s``: a new version is taken once
Triton has loaded it, and a rollback (which unloads the higher version) moves the gateway back. Switching is
an atomic swap of one reference. A request whose version Triton unloaded while it was in flight is retried
once with the version now served (``replacement``), so a switch costs no failed request.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from fashion.contract import DecodeLimits
from fashion.metadata import MetadataError, ModelMetadata, available_versions, load_metadata, skew
from gateway.client import FashionClient
from gateway.config import GatewayConfig
from gateway.errors import ErrorCode, GatewayError, ModelUnavailable
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
        self._waiting: set[int] = set()  # versions on disk but not ready in Triton, logged once each

    def _make(self, metadata: ModelMetadata) -> FashionClient:
        return FashionClient(metadata, self.triton, limits=self.limits, timeout_s=self.config.timeout_s)

    def refresh(self, *, force: bool = False) -> None:
        """Pick the version to serve again (at most every ``metadata_refresh_s`` unless ``force``).

        An unforced refresh never waits: when another thread is refreshing, this request keeps the current
        client instead of queueing behind Triton calls.
        """
        if not force and time.monotonic() - self._checked_at < self.config.metadata_refresh_s:
            return
        if not self._lock.acquire(blocking=force):
            return
        try:
            if not force and time.monotonic() - self._checked_at < self.config.metadata_refresh_s:
                return
            self._update()
        finally:
            self._lock.release()

    def replacement(self, failed: FashionClient) -> FashionClient | None:
        """After Triton said ``failed``'s version is not ready: the client of the version served now, or
        ``None`` when that is still ``failed``'s version (then the request fails with 503).

        Many requests fail together when Triton unloads a version; only the first one looks the new version
        up, the others take what it found.
        """
        with self._lock:
            if self._client is failed:
                self._update()
            client = self._client
        if client is None or client.metadata.version == failed.metadata.version:
            return None
        return client

    def _update(self) -> None:
        """Under the lock: switch to the version to serve, or keep the current one and say why."""
        self._checked_at = time.monotonic()
        cfg = self.config
        current = self._client
        if cfg.model_version:
            if current is None or current.metadata.version != int(cfg.model_version):
                self._load(int(cfg.model_version))
            return
        versions = available_versions(cfg.model_repository, cfg.model_name)
        if not versions:
            self._load(None)  # no version on disk: the error says where it looked
            return
        try:
            chosen = self._newest_ready(versions)
        except GatewayError as e:  # Triton unreachable: keep serving what we serve
            log.debug("cannot ask Triton which versions are ready: %s", e.message)
            chosen = None
        if chosen is not None:
            self._switch(chosen)
        elif current is None:
            # Nothing ready yet (Triton starting or down): take the newest so that /readyz can say why.
            self._load(versions[-1])

    def _newest_ready(self, versions: list[int]) -> ModelMetadata | None:
        """The metadata of the highest version in ``versions`` that Triton has ready, if any."""
        cfg = self.config
        current = self._client
        for version in reversed(versions):
            if current is not None and current.metadata.version == version:
                if self.triton.model_ready(cfg.model_name, version):
                    return current.metadata
                continue
            if not self.triton.model_ready(cfg.model_name, version):
                if version not in self._waiting:
                    self._waiting.add(version)
                    log.info("version %s of %s is on disk but not ready in Triton", version, cfg.model_name)
                continue
            try:
                return load_metadata(cfg.model_repository, cfg.model_name, version)
            except MetadataError as e:
                self._error = str(e)
                log.warning("version %s is ready in Triton but its metadata is unusable: %s", version, e)
        return None

    def _load(self, version: int | None) -> None:
        cfg = self.config
        try:
            metadata = load_metadata(cfg.model_repository, cfg.model_name, "" if version is None else version)
        except MetadataError as e:
            self._error = str(e)
            if self._client is None:
                log.warning("model metadata unavailable: %s", e)
            else:
                log.warning("keeping model version %s: %s", self._client.metadata.version, e)
            return
        self._switch(metadata)

    def _switch(self, metadata: ModelMetadata) -> None:
        current = self._client
        if current is not None and current.metadata is metadata:
            return
        self._client = self._make(metadata)
        self._error = ""
        self._waiting.discard(metadata.version)
        previous = "none" if current is None else current.metadata.version
        log.info(
            "serving model %s version %s (was %s; %s)",
            metadata.name,
            metadata.version,
            previous,
            metadata.path,
        )

    def current(self) -> FashionClient:
        """The client of the version to answer with; ``ModelUnavailable`` (503) when there is none."""
        self.refresh()
        client = self._client
        if client is None:
            raise ModelUnavailable(f"no model metadata: {self._error}", code=ErrorCode.METADATA_UNAVAILABLE)
        return client

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, details): the served version ready in Triton, its outputs matching the metadata.

        Triton's own ``/v2/health/ready`` is false while any version loads (strict readiness), so a deploy
        would take every gateway out of its Service; the version this gateway calls is what counts. A
        version that went away between the refresh and the check (a deploy switching) is looked up again.
        """
        for attempt in (0, 1):
            self.refresh(force=True)
            client = self._client
            if client is None:
                return False, {"reason": f"no model metadata: {self._error}"}
            meta = client.metadata
            details: dict[str, Any] = {"model": client.model}
            try:
                if not self.triton.model_ready(meta.name, meta.version):
                    if attempt == 0:
                        continue
                    if not self.triton.server_ready():
                        return False, {**details, "reason": "Triton is not ready"}
                    return False, {
                        **details,
                        "reason": f"model {meta.name} version {meta.version} is not ready in Triton",
                    }
                served = self.triton.model_metadata(meta.name, meta.version)
            except GatewayError as e:
                if attempt == 0 and e.code is ErrorCode.MODEL_NOT_READY:
                    continue  # unloaded between the two calls (a deploy switching): look again
                return False, {**details, "reason": e.message}
            problems = skew(meta, served)
            if problems:
                return False, {
                    **details,
                    "reason": "the served model does not match metadata.json (version skew): "
                    + "; ".join(problems),
                }
            return True, details
        raise AssertionError("unreachable")  # pragma: no cover
