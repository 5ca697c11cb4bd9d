"""``fashion deploy``: make a running Triton serve exactly one version of a model (a new one, or an older).

Triton (``--model-control-mode=explicit``) is the single source of truth for which version answers.
Deploying version N asks Triton to reload the model with the configuration it serves now and
``version_policy: {specific: {versions: [N]}}``: Triton loads N while the old version keeps answering, then
unloads the old one once N is ready; a load that fails leaves the old version serving. A rollback is the
same call with an older N::

    result = deploy("127.0.0.1:8000", "fashion", 2, repository="model_repository")
    result.ready        # (2,)

Gateways that follow the newest version (no ``FASHION_MODEL_VERSION``) serve the highest version that has a
``metadata.json`` and is ready in Triton, so they move with it, forward and back. Torch- and ONNX-free: it
needs only ``tritonclient[http]``.

A deployed version lasts until Triton restarts: a restarted Triton reads the model's ``config.pbtxt``
(``latest: 1``) and serves the newest version folder again, so make a rollback permanent by removing the bad
version from the repository.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.errors import ExportError
from fashion.metadata import MetadataError, load_metadata, skew

log = logging.getLogger(__name__)


class DeployError(ExportError):
    """Triton cannot serve the asked version or cannot be reached; the message says what serves now."""


@dataclass(frozen=True)
class DeployResult:
    """What Triton serves after a deploy, and what it served before."""

    model: str
    version: int
    before: tuple[int, ...]  # versions ready before the call
    ready: tuple[int, ...]  # versions ready after it (just ``version`` on success)
    seconds: float  # until the version was ready (the load, as Triton took it)
    settled_s: float  # until the other versions were unloaded too (their in-flight requests done)

    def summary(self) -> str:
        before = ", ".join(map(str, self.before)) or "none"
        return (
            f"{self.model}: version {self.version} ready in {self.seconds:.1f} s, old versions unloaded "
            f"after {self.settled_s:.1f} s (was serving: {before}; now serving: "
            f"{', '.join(map(str, self.ready))})"
        )


def version_policy_config(config: dict[str, Any], version: int) -> dict[str, Any]:
    """A copy of a model configuration (Triton's JSON form) that serves only ``version``."""
    return {**config, "version_policy": {"specific": {"versions": [int(version)]}}}


def served_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """Triton's model configuration (JSON) as the tensors the gateway compares metadata against
    (``fashion.metadata.skew``): names, datatypes and shapes without the batch dimension."""

    def tensors(key: str) -> list[dict[str, Any]]:
        return [
            {
                "name": t["name"],
                "datatype": str(t.get("data_type", "")).removeprefix("TYPE_"),
                "shape": [int(d) for d in t.get("dims", [])],
            }
            for t in config.get(key, [])
        ]

    return {"inputs": tensors("input"), "outputs": tensors("output")}


def check_version_files(repository: str | Path, model: str, version: int, config: dict[str, Any]) -> None:
    """Refuse a version the gateway could not serve with ``config``: metadata the gateway cannot read, or
    tensors and class counts other than the configuration's (the gateway's own skew check).

    All versions of one Triton model share one configuration, so a version whose heads or class counts
    differ needs a new model name, not a deploy.
    """

    folder = Path(repository) / model / str(version)
    if not folder.is_dir():
        raise DeployError(f"{folder} does not exist: export version {version} first (fashion export)")
    try:
        meta = load_metadata(repository, model, version)
    except MetadataError as e:
        raise DeployError(f"the gateway could not label version {version}'s answers: {e}") from e
    problems = skew(meta, served_from_config(config))
    if problems:
        raise DeployError(
            f"version {version} of {model!r} does not fit the configuration Triton serves the model with ("
            + "; ".join(problems)
            + "); versions of one model must share their heads and class counts: export it under a new name"
        )


class _Triton:
    """The few repository calls a deploy needs, over tritonclient's HTTP client."""

    def __init__(self, url: str, timeout_s: float) -> None:
        try:
            import tritonclient.http as httpclient
            from tritonclient.utils import InferenceServerException
        except ModuleNotFoundError as e:
            raise DeployError(
                "fashion deploy needs tritonclient[http]: pip install 'fashion-tagger[gateway]'"
            ) from e
        self.url = url.removeprefix("http://")
        self.failure = InferenceServerException
        self.client = httpclient.InferenceServerClient(
            self.url, connection_timeout=min(timeout_s, 10.0), network_timeout=timeout_s
        )

    def call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self.failure as e:
            raise DeployError(f"{what}: {str(e.message() or e).strip()}") from e
        except (OSError, EOFError) as e:
            raise DeployError(f"{what}: Triton at {self.url} is unreachable ({e})") from e

    def versions(self, model: str, state: str) -> tuple[int, ...]:
        """The versions of ``model`` in ``state`` (READY, LOADING, UNLOADING, UNAVAILABLE)."""
        index = self.call("listing Triton's models", self.client.get_model_repository_index)
        return tuple(
            sorted(
                int(entry["version"])
                for entry in index
                if entry.get("name") == model
                and entry.get("state") == state
                and str(entry.get("version", "")).isdigit()
            )
        )

    def ready_versions(self, model: str) -> tuple[int, ...]:
        return self.versions(model, "READY")

    def wait_unloaded(self, model: str, deadline: float) -> None:
        """Until no version of ``model`` is still unloading (Triton lets its in-flight requests finish)."""
        while self.versions(model, "UNLOADING") and time.monotonic() < deadline:
            time.sleep(0.1)

    def config(self, model: str) -> dict[str, Any]:
        return self.call(f"reading the configuration of {model!r}", self.client.get_model_config, model)

    def load(self, model: str, config: dict[str, Any] | None = None) -> None:
        text = None if config is None else json.dumps(config)
        self.call(f"Triton could not load {model!r}", self.client.load_model, model, config=text)

    def close(self) -> None:
        self.client.close()


def deploy(
    triton_url: str,
    model: str,
    version: int,
    *,
    repository: str | Path | None = None,
    timeout_s: float = 300.0,
) -> DeployResult:
    """Make Triton at ``triton_url`` (HTTP ``host:port``) serve ``version`` of ``model`` and nothing else.

    Args:
        triton_url: Triton's HTTP endpoint, ``host:port``.
        model: the model name.
        version: the version to serve; an older one is a rollback.
        repository: a local copy of the model repository to check the version against first (its
            ``metadata.json`` exists and fits the configuration Triton serves); ``None`` skips the check.
        timeout_s: how long Triton may take to load the version.

    Raises ``DeployError`` when the version cannot be served; what served before keeps serving then.
    """
    if version < 1:
        raise DeployError(f"--version must be a positive integer, got {version}")
    if timeout_s <= 0:
        raise DeployError(f"the timeout must be positive, got {timeout_s}")
    triton = _Triton(triton_url, timeout_s)
    try:
        before = triton.ready_versions(model)
        if not before:
            # Not loaded yet: load it from its files first, so that its configuration can be read.
            log.info("%s is not loaded in Triton; loading it from the repository's configuration", model)
            triton.load(model)
        config = triton.config(model)
        if repository is not None:
            check_version_files(repository, model, version, config)
        start = time.monotonic()
        try:
            triton.load(model, version_policy_config(config, version))
        except DeployError as e:
            now = triton.ready_versions(model)
            serving = ", ".join(map(str, now)) or "none"
            raise DeployError(f"{e}; version {version} is not served; Triton serves: {serving}") from e
        seconds = time.monotonic() - start
        triton.wait_unloaded(model, start + timeout_s)
        settled_s = time.monotonic() - start
        ready = triton.ready_versions(model)
    finally:
        triton.close()
    if ready != (version,):
        raise DeployError(
            f"Triton accepted the load of {model!r} version {version} but serves {list(ready)}; "
            "see Triton's log"
        )
    result = DeployResult(model, version, before, ready, seconds, settled_s)
    log.info("%s", result.summary())
    return result
