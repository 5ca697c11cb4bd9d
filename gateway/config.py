"""The gateway's settings: one frozen dataclass, checked when it is built.

Precedence: defaults < ``FASHION_*`` environment variables < explicit keyword arguments
(``GatewayConfig.from_env(timeout_s=2)``). Helm sets the environment; tests pass explicit values.
Nothing here imports Flask or tritonclient, so ``gunicorn_conf`` and ``client`` can use it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from fashion.errors import UserError

PROTOCOLS = ("grpc", "http")
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}

# field name -> environment variable
ENV_NAMES = {
    "triton_url": "FASHION_TRITON_URL",
    "triton_protocol": "FASHION_TRITON_PROTOCOL",
    "model_name": "FASHION_MODEL_NAME",
    "model_version": "FASHION_MODEL_VERSION",
    "model_repository": "FASHION_MODEL_REPOSITORY",
    "timeout_s": "FASHION_TIMEOUT_S",
    "client_timeout_s": "FASHION_CLIENT_TIMEOUT_S",
    "max_image_bytes": "FASHION_MAX_IMAGE_BYTES",
    "max_image_pixels": "FASHION_MAX_IMAGE_PIXELS",
    "max_batch_images": "FASHION_MAX_BATCH_IMAGES",
    "max_request_bytes": "FASHION_MAX_REQUEST_BYTES",
    "max_inflight": "FASHION_MAX_INFLIGHT",
    "queue_wait_s": "FASHION_QUEUE_WAIT_S",
    "api_keys": "FASHION_API_KEYS",
    "metrics_require_key": "FASHION_METRICS_REQUIRE_KEY",
    "metadata_refresh_s": "FASHION_METADATA_REFRESH_S",
    "retry_after_s": "FASHION_RETRY_AFTER_S",
    "workers": "FASHION_WORKERS",
    "threads": "FASHION_THREADS",
    "port": "FASHION_PORT",
}


def default_max_inflight(threads: int) -> int:
    """In-flight slots per worker when ``FASHION_MAX_INFLIGHT`` is unset: a quarter of the threads (at
    least one) stay spare, so a full worker still answers 429s and health checks at once."""
    return threads - max(1, threads // 4)


class ConfigError(UserError, ValueError):
    """A setting has a value the gateway cannot run with; the message names the variable."""


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway process needs to know; see the README's configuration table."""

    triton_url: str = ""  # host:port without scheme; "" = localhost on the protocol's default port
    triton_protocol: str = "grpc"
    model_name: str = "fashion"
    model_version: str = ""  # "" = the highest version folder in the model repository
    model_repository: str = "model_repository"
    timeout_s: float = 10.0  # deadline of one Triton call
    client_timeout_s: float = 20.0  # from a client's first byte to its whole request (gunicorn_conf)
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    max_batch_images: int = 16
    max_request_bytes: int = 0  # 0 = max_image_bytes * max_batch_images + 1 MiB of multipart overhead
    # Concurrent prediction requests per worker; None = default_max_inflight(threads). Beyond it a request
    # waits for a slot (queue_wait_s). Below ``threads``: spare threads wait, refuse and answer probes.
    max_inflight: int | None = None
    # The longest a prediction may wait for a slot, counted from its arrival, before its 429; the wait
    # itself is a few recent service times (gateway.admission).
    queue_wait_s: float = 1.0
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # empty = authentication off
    metrics_require_key: bool = False
    metadata_refresh_s: float = 5.0  # how often a "latest" gateway looks for a newer model version
    retry_after_s: int = 1  # Retry-After of 429 and 503 answers
    workers: int = 2
    threads: int = 8  # gunicorn threads per worker: max_inflight slots + spare threads
    port: int = 8080

    def __post_init__(self) -> None:
        if self.triton_protocol not in PROTOCOLS:
            raise ConfigError(
                f"FASHION_TRITON_PROTOCOL must be one of {PROTOCOLS}, got {self.triton_protocol!r}"
            )
        url = self.triton_url.strip()
        if not url:
            url = f"localhost:{DEFAULT_PORTS[self.triton_protocol]}"
        if "://" in url:
            raise ConfigError(f"FASHION_TRITON_URL is host:port without a scheme, got {url!r}")
        object.__setattr__(self, "triton_url", url)
        if not self.model_name or "/" in self.model_name or self.model_name in (".", ".."):
            raise ConfigError(f"FASHION_MODEL_NAME must be a plain folder name, got {self.model_name!r}")
        if self.model_version and not self.model_version.isdigit():
            raise ConfigError(
                f"FASHION_MODEL_VERSION must be a positive integer or empty, got {self.model_version!r}"
            )
        if self.threads < 2:
            raise ConfigError(
                f"FASHION_THREADS must be at least 2, got {self.threads}: one thread per worker stays free "
                "to answer 429s and health checks while the others wait on Triton"
            )
        if self.max_inflight is None:
            object.__setattr__(self, "max_inflight", default_max_inflight(self.threads))
        positive = (
            "timeout_s",
            "max_image_bytes",
            "max_image_pixels",
            "max_batch_images",
            "max_inflight",
            "workers",
            "metadata_refresh_s",
            "retry_after_s",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{ENV_NAMES[name]} must be positive, got {getattr(self, name)}")
        if self.inflight_limit >= self.threads:
            raise ConfigError(
                f"FASHION_MAX_INFLIGHT ({self.max_inflight}) must be below FASHION_THREADS ({self.threads}): "
                "a gunicorn worker runs at most FASHION_THREADS requests at once, so a limit at or above "
                "it never answers 429 and excess requests queue inside gunicorn instead; keep a few spare "
                "threads for the 429s and health checks (e.g. FASHION_THREADS=8 with FASHION_MAX_INFLIGHT=6, "
                "or leave FASHION_MAX_INFLIGHT unset: it then defaults to "
                f"{default_max_inflight(self.threads)} for {self.threads} threads)"
            )
        if not 0 <= self.queue_wait_s <= 60:
            raise ConfigError(
                f"FASHION_QUEUE_WAIT_S must be from 0 (refuse at once) to 60 seconds, got {self.queue_wait_s}"
            )
        if not 0 < self.client_timeout_s <= 3600:
            raise ConfigError(
                f"FASHION_CLIENT_TIMEOUT_S must be between 0 and 3600 seconds, got {self.client_timeout_s}"
            )
        if not 0 < self.port < 65536:
            raise ConfigError(f"FASHION_PORT must be a TCP port (1-65535), got {self.port}")
        if self.max_request_bytes < 0:
            raise ConfigError("FASHION_MAX_REQUEST_BYTES must be positive (or 0 for the default)")
        if self.max_request_bytes == 0:
            default = self.max_image_bytes * self.max_batch_images + 1024 * 1024
            object.__setattr__(self, "max_request_bytes", default)
        keys = self.api_keys
        if isinstance(keys, str):
            keys = tuple(k for k in (p.strip() for p in keys.split(",")) if k)
        object.__setattr__(self, "api_keys", tuple(keys))

    @property
    def inflight_limit(self) -> int:
        """``max_inflight`` as resolved when the config was built (unset = ``default_max_inflight``)."""
        return self.max_inflight if self.max_inflight is not None else default_max_inflight(self.threads)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    @property
    def single_request_bytes(self) -> int:
        """Largest body accepted by ``/v1/predict`` (one image plus multipart overhead)."""
        return min(self.max_request_bytes, self.max_image_bytes + 64 * 1024)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> GatewayConfig:
        """Defaults, then ``FASHION_*`` variables from ``environ`` (default ``os.environ``), then arguments.

        Raises ``ConfigError`` naming the variable when a value is unusable.
        """
        environ = os.environ if environ is None else environ
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, var in ENV_NAMES.items():
            raw = environ.get(var)
            if raw is None or (raw.strip() == "" and name not in ("model_version", "api_keys")):
                continue
            values[name] = _parse(var, raw.strip(), types[name])
        unknown = set(overrides) - set(types)
        if unknown:
            raise ConfigError(f"unknown gateway settings: {sorted(unknown)}")
        return cls(**{**values, **overrides})


def _parse(var: str, raw: str, kind: Any) -> Any:
    kind = str(kind).removesuffix(" | None")  # optional settings: unset or empty = the default
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
    except ValueError as e:
        raise ConfigError(f"{var} must be a {kind}, got {raw!r}") from e
    return raw
