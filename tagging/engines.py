"""Three ways to reach the model, one result: ``--local``, ``--triton URL`` and ``--gateway URL``.

Every engine does two things the job (``tagging.run``) overlaps: ``prepare`` an input (read the file and,
for the local and Triton engines, decode it with the preprocessing contract of the model's
``metadata.json``; runs on decode threads) and ``infer`` a batch of prepared inputs (rows out). An input
that cannot be read or decoded becomes a row with an error, never an exception; a failure that concerns
every input (a server that stays down) raises.

- ``local``: no server. The export's chosen CPU candidate (``ExportRecord.chosen``) built by
  ``export.sessions.open_session`` from the session spec in its Triton config — the file and precision
  Triton serves; OpenVINO in throughput mode, one stream per call in flight (``SessionSpec.for_throughput``)
  — in this process, behind ``gateway.client.FashionClient`` (decoding and label decoding as the gateway
  does them).
- ``triton``: ``FashionClient`` over gRPC to Triton; preprocessing here, in the client.
- ``gateway``: ``POST /v1/predict/batch`` to the shop's deployed gateway, which decodes.

A model that reads titles (its ``metadata.json``, or the gateway's ``GET /v1/models``, declares the title
input) gets each input's title from the manifest: the local and Triton engines send its ids (``fashion.text``,
titles longer than the tokenizer's ``max_chars`` cut, as the trainer cuts them), the gateway engine one
``titles`` field per image (cut the same way, and with the characters the gateway refuses blanked: the same
ids), and every row has ``<attr>_conflict`` (null for an input without a title).

The servers' "come back shortly" answers (the gateway's 429/503 with ``Retry-After``, Triton's full queue or
restart) are waited out with ``gateway.retry.Backoff`` (``Retry-After`` plus a jittered, doubling window)
for at most ``give_up_s``; then ``EngineDown`` stops the job, whose completed parts stay on disk.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from export.repository import read_session_spec
from export.sessions import Session, SessionSpec, open_session
from fashion.host import usable_cores
from fashion.metadata import ModelMetadata, load_export_record, load_metadata, read_document, skew
from fashion.text import has_title
from gateway.client import POLITE, RETRIED, FashionClient, acceptable_title
from gateway.errors import ErrorCode, GatewayError
from gateway.retry import RETRY_STATUSES, Backoff, retry_after_s
from gateway.triton import TritonTransport
from tagging.columns import ModelRef, TagColumns, TitleInput, error_text, title_input
from tagging.errors import EngineDown, TagError
from tagging.inputs import Item

log = logging.getLogger(__name__)
T = TypeVar("T")

KINDS = ("local", "triton", "gateway")
# Triton's answers worth waiting out: busy, away, still loading, or its queue timed the request out.
TRITON_WAIT = RETRIED | {ErrorCode.MODEL_NOT_READY, ErrorCode.UPSTREAM_TIMEOUT}
DEFAULT_BATCH = {"triton": 16, "gateway": 16}  # local: the batch the export timed its choice fastest at
# Servers: 4 calls in flight keep a batch queued behind the one Triton runs (its dynamic batcher merges two
# into 32). Measured on 2 cores (Zen 5, shipped model, OpenVINO BF16, 2,000 photos, 2026-12-03): --triton
# 222 images/s with 2 in flight, 255 with 3, 326-356 with 4, 289 with 8; --gateway 223 with 2, 262 with 4.
DEFAULT_CONCURRENCY = {"triton": 4, "gateway": 4}  # local: one call per stream of its session


@dataclass(frozen=True)
class EngineSpec:
    """Which engine, where, and how hard it may push; plain values, so that a Ray actor can rebuild it."""

    kind: str
    url: str = ""  # triton: host:port (gRPC); gateway: http://host:port
    repository: str = "model_repository"  # local, triton: where metadata.json (and the model) lie
    model_name: str = "fashion"
    version: str = ""  # "" = the newest version in the repository
    batch_size: int = 0  # 0 = the engine's default
    concurrency: int = 0  # inference calls in flight; 0 = the engine's default
    decode_threads: int = 2
    timeout_s: float = 30.0  # one call
    give_up_s: float = 120.0  # how long a server may stay busy or away before the job stops
    api_key: str = field(default="", repr=False)  # gateway: sent as X-API-Key

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TagError(f"unknown engine {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.kind != "local" and not self.url:
            raise TagError(f"the {self.kind} engine needs a URL (--{self.kind} URL)")
        if self.batch_size < 0 or self.concurrency < 0 or self.decode_threads < 1:
            raise TagError("batch size and concurrency must not be negative; decode threads at least 1")
        if self.timeout_s <= 0 or self.give_up_s < 0:
            raise TagError("timeout_s must be positive and give_up_s not negative")


@dataclass
class Prepared:
    """An input ready for ``infer``: the model's input array (local, triton), the file's bytes (gateway),
    or the error that makes it an error row."""

    item: Item
    array: np.ndarray | None = None
    data: bytes | None = None
    error: str | None = None


@dataclass(frozen=True)
class ModelView:
    """The model an engine answers with: the ``model`` columns, the attribute columns, its title input."""

    model: ModelRef
    columns: TagColumns
    title: TitleInput | None = None


# --- waiting out a busy server ---------------------------------------------------------------------------


def politely(
    call: Callable[[], T],
    wait_for: Callable[[Exception], float | None],
    *,
    what: str,
    give_up_s: float,
    backoff: Backoff = POLITE,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``call()``; when it raises an error that ``wait_for`` maps to a ``Retry-After`` (seconds, 0 when the
    server gave none), wait that plus ``backoff``'s jittered, doubling window and call again — for
    ``give_up_s`` from the first call (the last try comes at ``give_up_s``): then ``EngineDown`` says so."""
    start = clock()
    attempt = 0
    while True:
        try:
            result = call()
        except Exception as e:
            retry_after = wait_for(e)
            if retry_after is None:
                raise
            attempt += 1
            waited = clock() - start
            if waited >= give_up_s:
                raise EngineDown(
                    f"{what} stayed unavailable for {waited:.0f} s ({attempt} tries; the last: {e})"
                ) from e
            delay = min(backoff.delay_s(attempt, retry_after), give_up_s - waited)  # last try: at give_up_s
            (log.warning if attempt == 1 else log.debug)("%s: %s; trying again in %.1f s", what, e, delay)
            sleep(delay)
            continue
        if attempt:
            log.info("%s answers again after %d tries", what, attempt + 1)
        return result


# --- the engines ---------------------------------------------------------------------------------------


class Engine:
    """What ``tagging.run`` drives: ``prepare`` on decode threads, ``infer`` on ``concurrency`` threads."""

    view: ModelView
    batch_size: int
    concurrency: int

    @property
    def model(self) -> ModelRef:
        return self.view.model

    @property
    def columns(self) -> TagColumns:
        return self.view.columns

    def prepare(self, item: Item) -> Prepared:
        raise NotImplementedError

    def infer(self, batch: Sequence[Prepared]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections and sessions."""

    def _read(self, item: Item) -> Prepared:
        try:
            return Prepared(item, data=Path(item.path).read_bytes())
        except OSError as e:
            return Prepared(item, error=error_text("unreadable_file", f"{item.path}: {e.strerror or e}"))

    def _titles(self, batch: Sequence[Prepared]) -> np.ndarray | None:
        """The title ids when the model declares a title input (zeros for inputs without a title)."""
        title = self.view.title
        return None if title is None else title.tensor([p.item.title for p in batch])


class _ClientEngine(Engine):
    """The local and Triton engines: ``FashionClient`` decodes here and decodes the answers."""

    client: FashionClient

    def prepare(self, item: Item) -> Prepared:
        read = self._read(item)
        if read.data is None:
            return read
        try:
            array, _, _ = self.client.preprocess(read.data)
        except GatewayError as e:
            return Prepared(item, error=error_text(e.code, e.message))
        except Exception as e:  # one odd file must not stop a catalogue: its row says what happened
            log.exception("decoding %s failed unexpectedly", item.path)
            return Prepared(item, error=error_text(ErrorCode.INTERNAL_ERROR, f"{type(e).__name__}: {e}"))
        return Prepared(item, array=array)

    def infer(self, batch: Sequence[Prepared]) -> list[dict[str, Any]]:
        good = [p for p in batch if p.error is None]
        outputs: dict[str, np.ndarray] = {}
        ids = self._titles(good)
        titled = has_title(ids) if ids is not None else np.zeros(len(good), bool)
        if good:
            outputs = self._infer(np.stack([p.array for p in good]), ids)  # type: ignore[misc]
        rows, k = [], 0
        specs = self.client.metadata.outputs
        for p in batch:
            if p.error is not None:
                rows.append(self.columns.error_row(p.item.id, p.error, self.model))
                continue
            predictions = self.client.decode(outputs, k, specs, top_k=1, titled=bool(titled[k]))
            rows.append(self.columns.row(p.item.id, predictions, self.model))
            k += 1
        return rows

    def _infer(self, batch: np.ndarray, titles: np.ndarray | None) -> dict[str, np.ndarray]:
        raise NotImplementedError


def _view(meta: ModelMetadata) -> ModelView:
    title = title_input(read_document(meta.path))
    return ModelView(ModelRef(meta.name, meta.version), TagColumns.of(meta, title), title)


class SessionBackend:
    """``gateway.triton.TritonBackend`` over an in-process session, so that ``FashionClient`` serves it."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def infer(
        self,
        model: str,
        version: int,
        input_name: str,
        batch: np.ndarray,
        outputs: Sequence[str],
        timeout_s: float,
        *,
        extra_inputs: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        titles = next(iter((extra_inputs or {}).values()), None)  # a model that reads titles: their ids
        arrays = dict(zip(self.session.output_names, self.session(batch, titles), strict=True))
        return {name: arrays[name] for name in outputs}

    def server_ready(self) -> bool:
        return True

    def model_ready(self, model: str, version: int) -> bool:
        return True

    def model_metadata(self, model: str, version: int) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class ExportChoice:
    """What the export chose for a version: its metadata, the chosen session as its Triton config runs it
    (the spec the export timed), that session's model file and the batch it timed fastest."""

    meta: ModelMetadata
    session_spec: SessionSpec
    model_path: Path
    batch_size: int


def export_choice(spec: EngineSpec) -> ExportChoice:
    """The export's chosen CPU candidate of ``spec``'s version, read from the repository (nothing built)."""
    meta = load_metadata(spec.repository, spec.model_name, spec.version)
    chosen = load_export_record(spec.repository, spec.model_name, meta.version).chosen
    session_spec = read_session_spec(Path(spec.repository) / spec.model_name, chosen.config_name)
    if session_spec.name != chosen.name:
        raise TagError(
            f"configs/{chosen.config_name}.pbtxt runs {session_spec.name}, but version {meta.version} "
            f"chose {chosen.name}: the model folder's configs are a newer export's; tag with that version"
        )
    path = Path(meta.path).parent / session_spec.file
    return ExportChoice(meta, session_spec, path, spec.batch_size or chosen.best_batch or 8)


class LocalEngine(_ClientEngine):
    """The export's chosen CPU candidate in this process (no servers)."""

    def __init__(self, spec: EngineSpec) -> None:
        choice = export_choice(spec)
        # Tagging is bulk work: the export's session, same runtime and precision, in throughput mode (one
        # single-threaded stream per call in flight, by default one per usable core; --concurrency 1, as each
        # Ray actor runs, keeps the export's own setting); tag-bench times the export's setting beside it.
        cores = usable_cores()
        session_spec = choice.session_spec.for_throughput(min(cores, spec.concurrency or cores))
        self.session = open_session(session_spec, choice.model_path)
        self.session_name = session_spec.name
        self.view = _view(choice.meta)
        self.client = FashionClient(
            choice.meta, SessionBackend(self.session), timeout_s=spec.timeout_s, retry=None
        )
        self.batch_size = choice.batch_size
        self.concurrency = spec.concurrency or session_spec.num_streams

    def _infer(self, batch: np.ndarray, titles: np.ndarray | None) -> dict[str, np.ndarray]:
        return self.client.infer(batch, titles)


def _triton_wait(error: Exception) -> float | None:
    return 0.0 if isinstance(error, GatewayError) and error.code in TRITON_WAIT else None


class TritonEngine(_ClientEngine):
    """``FashionClient`` over gRPC to Triton; preprocessing in this process."""

    def __init__(self, spec: EngineSpec) -> None:
        meta = load_metadata(spec.repository, spec.model_name, spec.version)
        self.spec = spec
        self.view = _view(meta)
        self.client = FashionClient(
            meta, TritonTransport(spec.url, "grpc", spec.timeout_s), timeout_s=spec.timeout_s, retry=None
        )
        self.batch_size = spec.batch_size or DEFAULT_BATCH["triton"]
        self.concurrency = spec.concurrency or DEFAULT_CONCURRENCY["triton"]
        served = self._politely(lambda: self.client.triton.model_metadata(meta.name, meta.version))
        problems = skew(meta, served)
        if problems:
            raise TagError(f"Triton at {spec.url} does not serve {meta.path}: {'; '.join(problems)}")

    def _politely(self, call: Callable[[], T]) -> T:
        return politely(call, _triton_wait, what=f"Triton at {self.spec.url}", give_up_s=self.spec.give_up_s)

    def _infer(self, batch: np.ndarray, titles: np.ndarray | None) -> dict[str, np.ndarray]:
        return self._politely(lambda: self.client.infer(batch, titles))


class Refused(Exception):
    """The gateway said "come back shortly" (429, 503, 504) or could not be reached."""

    def __init__(self, status: int | None, retry_after: float, detail: str) -> None:
        super().__init__(f"{status or 'no answer'} {detail}".strip())
        self.status = status
        self.retry_after = retry_after


def _gateway_wait(error: Exception) -> float | None:
    return error.retry_after if isinstance(error, Refused) else None


class GatewayEngine(Engine):
    """``POST /v1/predict/batch`` to a deployed gateway; it decodes the images."""

    def __init__(self, spec: EngineSpec) -> None:
        import urllib3

        self.spec = spec
        self.url = spec.url.rstrip("/")
        self.batch_size = spec.batch_size or DEFAULT_BATCH["gateway"]
        self.concurrency = spec.concurrency or DEFAULT_CONCURRENCY["gateway"]
        self.http = urllib3.PoolManager(
            maxsize=max(self.concurrency, 1),
            retries=False,
            timeout=urllib3.Timeout(connect=min(5.0, spec.timeout_s), read=spec.timeout_s),
        )
        self.headers = {"X-API-Key": spec.api_key} if spec.api_key else {}
        described = self._politely(lambda: self._request("GET", "/v1/models"))["models"][0]
        title = title_input(described)
        model = ModelRef(str(described["name"]), int(described["version"]))
        self.view = ModelView(model, TagColumns.from_description(described), title)

    def _politely(self, call: Callable[[], T]) -> T:
        return politely(call, _gateway_wait, what=f"the gateway at {self.url}", give_up_s=self.spec.give_up_s)

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str = "") -> Any:
        import urllib3

        headers = {**self.headers, **({"Content-Type": content_type} if content_type else {})}
        try:
            reply = self.http.request(method, self.url + path, body=body, headers=headers)
        except urllib3.exceptions.HTTPError as e:  # refused, reset, timed out: a restart looks like this
            raise Refused(None, 0.0, f"({type(e).__name__}: {e})") from e
        text = reply.data[:500].decode(errors="replace")
        if reply.status in RETRY_STATUSES:
            raise Refused(reply.status, retry_after_s(reply.headers.get("Retry-After")), text)
        if reply.status == 504:  # Triton's queue timed the request out: busy, no Retry-After
            raise Refused(reply.status, 0.0, text)
        if reply.status != 200:
            hint = {401: " (pass --api-key or set FASHION_API_KEY)", 413: " (lower --batch-size)"}
            raise TagError(
                f"the gateway at {self.url} answered {reply.status} to {path}: {text}"
                + hint.get(reply.status, "")
            )
        return json.loads(reply.data)

    def prepare(self, item: Item) -> Prepared:
        return self._read(item)

    def infer(self, batch: Sequence[Prepared]) -> list[dict[str, Any]]:
        from urllib3 import encode_multipart_formdata

        good = [p for p in batch if p.error is None]
        answered: list[dict[str, Any]] = []
        model = self.model
        if good:
            fields: list[tuple[str, Any]] = [
                ("images", (Path(p.item.path).name, p.data, "application/octet-stream")) for p in good
            ]
            title = self.view.title
            if title is not None:  # one `titles` field per image, in order ("" = none)
                fields += [("titles", acceptable_title(p.item.title, title.tokenizer)) for p in good]
            body, content_type = encode_multipart_formdata([*fields, ("top_k", "1")])
            reply = self._politely(lambda: self._request("POST", "/v1/predict/batch", body, content_type))
            answered = reply["results"]
            model = ModelRef(str(reply["model"]["name"]), int(reply["model"]["version"]))
        rows, k = [], 0
        for p in batch:
            if p.error is not None:
                rows.append(self.columns.error_row(p.item.id, p.error, model))
                continue
            result = answered[k]
            k += 1
            if "error" in result:
                error = error_text(result["error"]["code"], result["error"]["message"])
                rows.append(self.columns.error_row(p.item.id, error, model))
            elif set(result["predictions"]) != set(self.columns.attributes):
                raise TagError(
                    f"the gateway now serves {model}, with the attributes {sorted(result['predictions'])}; "
                    f"this output holds {self.model}'s: tag the rest into a new --out"
                )
            else:
                rows.append(self.columns.row(p.item.id, result["predictions"], model))
        return rows

    def close(self) -> None:
        self.http.clear()


ENGINES: dict[str, Callable[[EngineSpec], Engine]] = {
    "local": LocalEngine,
    "triton": TritonEngine,
    "gateway": GatewayEngine,
}


def build_engine(spec: EngineSpec) -> Engine:
    """The engine ``spec`` names, connected (or its session built) and checked."""
    return ENGINES[spec.kind](spec)


def describe(spec: EngineSpec) -> ModelView:
    """The model ``spec``'s engine answers with, without building a session (for the Ray driver)."""
    if spec.kind == "gateway":
        engine = GatewayEngine(spec)
        engine.close()
        return engine.view
    return _view(load_metadata(spec.repository, spec.model_name, spec.version))
