"""Zero-downtime model updates and rollback: `fashion deploy` on the real Triton, and the gateway's switch.

The unit tests check the gateway's own version logic with ``FakeTriton`` (which version it serves, the
retry when Triton unloads a version mid-request). The stack tests run the pip Triton and gunicorn: two
versions of a tiny ``onnx.helper`` model whose answers tell them apart — version 2 has other class names
*and* permuted weights, so a response that mixed one version's labels with the other's outputs would carry a
label that belongs to neither answer ("green" or "blue-2" for a red image).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway import create_app
from gateway.config import PROTOCOLS, GatewayConfig
from gateway.errors import GatewayError
from gateway.triton import classify
from tests.fixtures_gateway import FakeTriton, metric_value, solid, write_metadata
from tests.test_gateway_stack import http

RED, BLUE = (220, 30, 30), (30, 40, 220)
IMAGES = {"red": solid(RED), "blue": solid(BLUE)}
# (version, image) → the colour label that version gives. Mixed answers would read "green" / "blue-2" for
# red and "red" / "green-2" for blue: labels no version gives for that image.
EXPECTED = {(1, "red"): "red", (1, "blue"): "blue", (2, "red"): "red-2", (2, "blue"): "blue-2"}
V2_CLASSES = ("blue-2", "red-2", "green-2")
V2_WEIGHTS = np.eye(3, dtype=np.float32)[:, [2, 0, 1]] / 10.0  # class i of v2 reads channel (2, 0, 1)[i]


# -- what Triton 2.51 answers for a version it does not serve ----------------------------------------
# (tritonclient's InferenceServerException status, message) per protocol, as the pip Triton gives them to
# inference and metadata calls: "unloaded" for a version it served and unloaded (a deploy, a rollback),
# "unknown" for one it never loaded (on disk but not deployed, or no such folder). Checked against the
# real server by test_triton_refuses_a_version_it_does_not_serve_with_the_answers_the_unit_tests_use.
UNLOADED = "Request for unknown model: '{model}' version {version} is not at ready state"
UNKNOWN = "Request for unknown model: '{model}' version {version} is not found"
TRITON_REFUSALS = {
    ("grpc", "unloaded"): ("StatusCode.UNAVAILABLE", UNLOADED),
    ("http", "unloaded"): ("503", UNLOADED),
    ("grpc", "unknown"): ("StatusCode.NOT_FOUND", UNKNOWN),
    ("http", "unknown"): ("404", UNKNOWN),
}


def triton_refusal(protocol: str, kind: str, model: str, version: int) -> GatewayError:
    """What ``gateway.triton.TritonTransport`` raises when Triton refuses ``version`` that way: Triton's own
    status and text, through the gateway's classifier."""
    from tritonclient.utils import InferenceServerException

    status, text = TRITON_REFUSALS[protocol, kind]
    error = classify(InferenceServerException(text.format(model=model, version=version), status=status))
    assert error is not None
    return error


# -- the gateway's version logic (FakeTriton) --------------------------------------------------------
class VersionedTriton(FakeTriton):
    """A FakeTriton that refuses calls on a version it does not have ready as Triton does over ``protocol``
    (``TRITON_REFUSALS[protocol, refusal]``, classified by the gateway's own ``classify``)."""

    def __init__(self, protocol: str = "grpc", refusal: str = "unloaded") -> None:
        super().__init__()
        self.protocol, self.refusal = protocol, refusal

    def _refuse(self, model: str, version: int) -> None:
        if self.ready_versions is not None and version not in self.ready_versions:
            self.calls.append({"version": version, "refused": True})
            raise triton_refusal(self.protocol, self.refusal, model, version)

    def infer(self, model, version, input_name, batch, outputs, timeout_s, **inputs):
        self._refuse(model, version)
        return super().infer(model, version, input_name, batch, outputs, timeout_s, **inputs)

    def model_metadata(self, model, version):
        self._refuse(model, version)
        return super().model_metadata(model, version)


REFUSALS = sorted(TRITON_REFUSALS)


@pytest.mark.parametrize("protocol,refusal", REFUSALS)
def test_tritons_answers_for_a_version_it_does_not_serve_are_classified_model_not_ready(protocol, refusal):
    error = triton_refusal(protocol, refusal, "fashion", 3)
    assert error.code == "model_not_ready" and error.status == 503, (error.code, error.message)


def fake_gateway(repository: Path, triton: FakeTriton, **settings: Any):
    config = GatewayConfig(model_repository=str(repository), metadata_refresh_s=3600, **settings)
    return create_app(config, triton=triton).test_client()


def predict(client) -> dict:
    response = client.post("/v1/predict", data=IMAGES["red"], content_type="image/jpeg")
    return {"status": response.status_code, **response.get_json()}


def test_the_gateway_serves_the_highest_version_that_triton_has_ready_and_follows_a_rollback(tmp_path):
    for version in (1, 2, 3):
        write_metadata(tmp_path, version=version)
    triton = VersionedTriton()
    triton.ready_versions = {2}  # 3 is on disk but not loaded
    client = fake_gateway(tmp_path, triton)
    assert client.get("/readyz").get_json()["model"]["version"] == 2
    triton.ready_versions = {1}  # rolled back: Triton unloaded 2
    assert client.get("/readyz").get_json() == {"status": "ready", "model": {"name": "fashion", "version": 1}}
    assert predict(client)["model"]["version"] == 1


@pytest.mark.parametrize("protocol,refusal", REFUSALS)
def test_a_request_whose_version_triton_unloaded_is_answered_by_the_version_now_served(
    tmp_path, protocol, refusal
):
    for version in (1, 2):
        write_metadata(tmp_path, version=version)
    triton = VersionedTriton(protocol, refusal)
    triton.ready_versions = {1}
    client = fake_gateway(tmp_path, triton)  # refreshes hourly: only the failed request can move it
    assert predict(client)["model"]["version"] == 1
    triton.ready_versions = {2}  # deployed 2 between two refreshes
    answer = predict(client)
    assert answer["status"] == 200 and answer["model"]["version"] == 2
    assert [c["version"] for c in triton.calls[-2:]] == [1, 2] and triton.calls[-2].get("refused")
    assert predict(client)["model"]["version"] == 2 and "refused" not in triton.calls[-1]


@pytest.mark.parametrize("protocol,refusal", REFUSALS)
def test_a_request_is_not_retried_when_no_other_version_is_ready(tmp_path, protocol, refusal):
    write_metadata(tmp_path, version=1)
    triton = VersionedTriton(protocol, refusal)
    triton.ready_versions = {1}
    client = fake_gateway(tmp_path, triton)
    triton.ready_versions = set()
    answer = predict(client)
    assert answer["status"] == 503 and answer["error"]["code"] == "model_not_ready"
    assert len([c for c in triton.calls if c.get("refused")]) == 1


def test_readyz_stays_ready_while_triton_loads_or_unloads_another_version(tmp_path):
    # Triton's server readiness is false during a deploy (strict readiness); the served version is ready.
    write_metadata(tmp_path, version=1)
    triton = VersionedTriton()
    triton.ready_versions = {1}
    triton.server_ready = lambda: False  # type: ignore[method-assign]
    client = fake_gateway(tmp_path, triton)
    assert client.get("/readyz").status_code == 200
    triton.ready_versions = set()
    body = client.get("/readyz").get_json()
    assert body["status"] == "not_ready" and body["reason"] == "Triton is not ready"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_readyz_stays_ready_when_triton_unloads_the_served_version_between_its_two_checks(tmp_path, protocol):
    # A rollback: Triton has 1 loaded, and unloads 2 after /readyz found 2 ready but before it read 2's
    # metadata (a window that a loaded machine widens; the update-under-load test met it).
    for version in (1, 2):
        write_metadata(tmp_path, version=version)
    triton = VersionedTriton(protocol, "unloaded")
    triton.ready_versions = {1, 2}
    client = fake_gateway(tmp_path, triton)
    assert client.get("/readyz").get_json()["model"]["version"] == 2
    metadata = triton.model_metadata

    def unloaded_meanwhile(model, version):
        triton.ready_versions = {1}
        return metadata(model, version)

    triton.model_metadata = unloaded_meanwhile  # type: ignore[method-assign]
    response = client.get("/readyz")
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["model"]["version"] == 1
    assert [c["version"] for c in triton.calls if c.get("refused")] == [2]


def test_a_pinned_gateway_does_not_follow_triton_to_another_version(tmp_path):
    for version in (1, 2):
        write_metadata(tmp_path, version=version)
    triton = VersionedTriton()
    triton.ready_versions = {2}
    client = fake_gateway(tmp_path, triton, model_version="1")
    answer = predict(client)
    assert answer["status"] == 503 and answer["error"]["code"] == "model_not_ready"


def test_version_policy_config_keeps_everything_but_the_versions():
    from export.deploy import version_policy_config

    config = {"name": "fashion", "max_batch_size": 32, "version_policy": {"latest": {"num_versions": 1}}}
    assert version_policy_config(config, 3) == {
        "name": "fashion",
        "max_batch_size": 32,
        "version_policy": {"specific": {"versions": [3]}},
    }
    assert config["version_policy"] == {"latest": {"num_versions": 1}}


# -- the real stack ----------------------------------------------------------------------------------
def v2_model(v1: Path, path: Path) -> None:
    """Version 1's graph with the colour head's weights permuted (see ``V2_WEIGHTS``)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(v1)
    for i, init in enumerate(model.graph.initializer):
        if init.name == "w_colour":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(V2_WEIGHTS, "w_colour"))
            break
    else:
        raise AssertionError("w_colour not found in version 1's graph")
    onnx.save(model, path)


def publish_v2(repository: Path, work: Path) -> Path:
    """Version 2: same heads and class counts (one Triton configuration serves both), other labels."""
    from export.repository import write_model_version
    from fashion.contract import Preprocessing
    from fashion.metadata import build_metadata
    from fashion.schema import Attribute, LabelSchema
    from tests.test_gateway_stack import SCHEMA, SIZE

    schema = LabelSchema(
        tuple(
            Attribute(a.name, V2_CLASSES, label=a.label, category=a.category) if a.name == "colour" else a
            for a in SCHEMA.attributes
        ),
        category_column=SCHEMA.category_column,
    )
    onnx_path = work / "model-v2.onnx"
    v2_model(repository / "fashion" / "1" / "model.onnx", onnx_path)
    metadata = build_metadata(
        schema=schema,
        preprocessing=Preprocessing(image_size=SIZE),
        backbone="test-v2",
        temperatures={},
        thresholds={},
        training={},
        export={},
    )
    return write_model_version(
        repository,
        "fashion",
        schema=schema,
        image_size=SIZE,
        model_files={"fp32": onnx_path},
        metadata=metadata,
        warmup_image=np.zeros((SIZE, SIZE, 3), np.uint8),
    )


@pytest.fixture(scope="module")
def stack(stack_factory, tmp_path_factory) -> Iterator[dict]:
    """Its own repository (the tests publish versions into it), served by its own Triton; the tests start
    their gateways."""
    from tests.test_gateway_stack import publish

    work = tmp_path_factory.mktemp("update")
    repository = work / "model_repository"
    publish(repository, work)  # version 1
    served = stack_factory(repository, work, log_file=work / "triton.log")
    try:
        yield {"stack": served, "triton": served.triton(), "repository": repository, "work": work}
    finally:
        served.stop()


def ensure_v2(stack: dict) -> None:
    """Version 2 on disk (published once per module; Triton loads it only when deployed)."""
    if not (stack["repository"] / "fashion" / "2").is_dir():
        publish_v2(stack["repository"], stack["work"])

@dataclass
class Answer:
    sent_s: float
    done_s: float
    image: str
    status: int
    version: int | None = None
    label: str | None = None
    body: str = ""


@dataclass
class Load:
    """Client threads posting images in a loop; each counts what it sent and keeps every answer."""

    url: str
    threads: int = 4
    stop: threading.Event = field(default_factory=threading.Event)
    sent: list[int] = field(default_factory=list)
    answers: list[list[Answer]] = field(default_factory=list)
    triton_url: str = ""  # Triton's HTTP host:port, whose readiness endpoints are polled too
    failures: list[str] = field(default_factory=list)  # exceptions: no HTTP answer at all
    # (t, gateway /readyz, Triton /v2/health/ready, Triton /v2/models/fashion/ready): HTTP statuses
    probes: list[tuple[float, int, int, int]] = field(default_factory=list)
    not_ready: list[str] = field(default_factory=list)  # the bodies of answers other than 200

    def __post_init__(self) -> None:
        self.sent = [0] * self.threads
        self.answers = [[] for _ in range(self.threads)]
        self._workers = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)
        ]
        self._workers.append(threading.Thread(target=self._probe, daemon=True))

    def _probe(self) -> None:
        """What a Kubernetes readiness probe would see during the switch, every 0.2 s."""
        from tests.test_gateway_stack import http

        def status(url: str) -> int:
            try:
                code, _, body = http("GET", url, timeout=10)
            except OSError:
                return 0  # no answer
            if code != 200:
                self.not_ready.append(f"{url}: {code} {body[:300].decode(errors='replace')}")
            return code

        while not self.stop.wait(0.2):
            gateway = status(self.url + "/readyz")
            server = status(f"http://{self.triton_url}/v2/health/ready")
            model = status(f"http://{self.triton_url}/v2/models/fashion/ready")
            self.probes.append((time.monotonic(), gateway, server, model))

    def _run(self, i: int) -> None:
        from tests.test_gateway_stack import http

        n = 0
        while not self.stop.is_set():
            image = ("red", "blue")[(n + i) % 2]
            n += 1
            self.sent[i] += 1
            start = time.monotonic()
            try:
                status, _, body = http(
                    "POST",
                    self.url + "/v1/predict",
                    IMAGES[image],
                    {"Content-Type": "image/jpeg"},
                    timeout=60,
                )
            except Exception as e:  # counted: sent but never answered
                self.failures.append(f"{type(e).__name__}: {e}")
                continue
            answer = Answer(start, time.monotonic(), image, status, body=body[:300].decode(errors="replace"))
            if status == 200:
                doc = json.loads(body)
                answer.version = doc["model"]["version"]
                answer.label = doc["predictions"]["colour"]["label"]
            self.answers[i].append(answer)

    def __enter__(self) -> Load:
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for w in self._workers:
            w.join(90)

    def all(self) -> list[Answer]:
        return sorted((a for answers in self.answers for a in answers), key=lambda a: a.sent_s)


def switch_window(answers: list[Answer], old: int, new: int, start_s: float, end_s: float) -> str:
    """When, from the deploy call's start, the new version first answered and the old one last answered."""
    window = [a for a in answers if start_s <= a.done_s < end_s]
    first_new = min((a.done_s for a in window if a.version == new), default=float("nan"))
    last_old = max((a.done_s for a in window if a.version == old), default=float("nan"))
    return f"first v{new} answer at {first_new - start_s:.2f} s, last v{old} at {last_old - start_s:.2f} s"


def not_ready_spans(probes: list[tuple], column: int, start_s: float) -> str:
    """The first and last probe (from ``start_s``) that saw a status other than 200."""
    bad = [p[0] - start_s for p in probes if p[column] != 200]
    return f"{len(bad)} probes from {bad[0]:.2f} s to {bad[-1]:.2f} s" if bad else "none"


def statuses_of(probes: list[tuple], column: int) -> dict[int, int]:
    return dict(Counter(probe[column] for probe in probes))


HOLD_S = 4.0  # load kept after each deploy
SWITCH_BOUND_S = 2.5  # requests sent this long after a deploy returned must get the new version
UPDATE_GATEWAY = {"workers": 2, "threads": 8, "max_inflight": 6, "timeout_s": 10, "metadata_refresh_s": 0.5}


@pytest.mark.server
def test_update_and_rollback_under_load_fail_no_request_and_label_every_answer_with_its_version(stack):
    """Export v2 while v1 serves, deploy it, roll back: every request answered 200 by one whole version.

    Over gRPC (the chart's default) only, to keep CI short: over HTTP, the same switch is driven request by
    request by test_a_request_sent_to_a_version_triton_unloaded_is_answered_by_the_new_one_after_exactly_...
    """
    from export.deploy import deploy

    protocol = "grpc"
    triton, repository = stack["triton"], stack["repository"]
    assert deploy(triton.http_url, "fashion", 1).ready == (1,)  # what an earlier test left is undone
    with (
        stack["stack"].gateway(f"update-{protocol}", protocol, **UPDATE_GATEWAY) as gateway,
        Load(gateway.url, threads=4, triton_url=triton.http_url) as load,
    ):
        time.sleep(2.0)
        ensure_v2(stack)  # on disk, not loaded: the gateway must keep serving 1
        time.sleep(1.5)
        update_start = time.monotonic()
        update = deploy(triton.http_url, "fashion", 2, repository=repository, timeout_s=120)
        updated = time.monotonic()
        time.sleep(HOLD_S)
        rollback_start = time.monotonic()
        rollback = deploy(triton.http_url, "fashion", 1, repository=repository, timeout_s=120)
        rolled_back = time.monotonic()
        time.sleep(HOLD_S)
        metrics = http("GET", gateway.url + "/metrics")[2].decode()
    answers = load.all()
    statuses = Counter(a.status for a in answers)

    assert (update.before, update.ready, rollback.before, rollback.ready) == ((1,), (2,), (2,), (1,))
    assert not load.failures, load.failures[:5]
    assert sum(load.sent) == len(answers) > 40
    assert statuses == {200: len(answers)}, [a.body for a in answers if a.status != 200][:5]
    wrong = [(a.version, a.image, a.label) for a in answers if EXPECTED.get((a.version, a.image)) != a.label]
    assert not wrong, wrong[:10]
    assert all(a.version == 1 for a in answers if a.done_s < update_start)  # 2 on disk, not yet loaded
    after_update = [a for a in answers if updated + SWITCH_BOUND_S < a.sent_s and a.done_s < rollback_start]
    after_rollback = [a for a in answers if rolled_back + SWITCH_BOUND_S < a.sent_s]
    assert after_update and {a.version for a in after_update} == {2}
    assert after_rollback and {a.version for a in after_rollback} == {1}
    gateway_not_ready = [body for body in load.not_ready if "/readyz" in body]  # it never left the Service
    assert load.probes and {p[1] for p in load.probes} == {200}, gateway_not_ready[:5]

    # Every Triton failure the gateway met was a version Triton had unloaded, and each was retried (every
    # answer is a 200): one per request that was on its way to the old version when its worker switched,
    # so per switch and worker at most one per client (test_a_request_sent_to_a_version_triton_unloaded_...
    # checks that one such request costs exactly one retry).
    retried = metric_value(metrics, "fashion_gateway_triton_errors_total", kind="model_not_ready")
    assert metric_value(metrics, "fashion_gateway_triton_errors_total") == retried, metrics
    switches, workers = 2, UPDATE_GATEWAY["workers"]
    assert retried <= switches * workers * load.threads, retried
    lines = [
        f"model update under load ({protocol}): {len(answers)} requests, "
        f"{len(answers) - statuses.get(200, 0)} failed, "
        f"{retried:.0f} retried on the new version after Triton unloaded theirs",
        f"deploy 1→2: {timing(update, update_start, updated)}, "
        + switch_window(answers, 1, 2, update_start, rollback_start),
        f"rollback 2→1: {timing(rollback, rollback_start, rolled_back)}, "
        + switch_window(answers, 2, 1, rollback_start, float("inf")),
        f"{len(load.probes)} probes: gateway /readyz {statuses_of(load.probes, 1)}, "
        f"Triton /v2/health/ready {statuses_of(load.probes, 2)} "
        f"(not ready: {not_ready_spans(load.probes, 2, update_start)} after the update started; "
        f"rollback started at {rollback_start - update_start:.2f} s), "
        f"/v2/models/fashion/ready {statuses_of(load.probes, 3)}",
    ]
    print("\n" + "\n  ".join(lines))


def timing(result: Any, start_s: float, end_s: float) -> str:
    return (
        f"Triton load {result.seconds:.2f} s, old version unloaded at {result.settled_s:.2f} s, "
        f"call {end_s - start_s:.2f} s"
    )


@pytest.mark.server
def test_deploy_refuses_what_it_cannot_serve_and_leaves_the_served_version_alone(stack, capsys):
    """A version Triton cannot load, or the gateway could not label, must not take the served one down."""
    from export.deploy import DeployError, deploy
    from fashion.cli import main
    from tests.test_gateway_stack import http

    triton, repository = stack["triton"], stack["repository"]
    ensure_v2(stack)
    assert deploy(triton.http_url, "fashion", 2).ready == (2,)
    ready = f"http://{triton.http_url}/v2/models/fashion/versions/{{}}/ready"
    assert (http("GET", ready.format(2))[0], http("GET", ready.format(1))[0]) == (200, 400)

    with pytest.raises(DeployError, match="version 9 is not served; Triton serves: 2"):
        deploy(triton.http_url, "fashion", 9)  # no such folder: Triton's own refusal
    # A version whose heads differ from the served configuration (4 colours) is refused before the load.
    odd = repository / "fashion" / "3"
    shutil.copytree(repository / "fashion" / "1", odd)
    doc = json.loads((odd / "metadata.json").read_text())
    doc["model"]["version"] = 3
    doc["outputs"][0]["classes"] = ["red", "green", "blue", "white"]
    (odd / "metadata.json").write_text(json.dumps(doc))
    with pytest.raises(DeployError, match=r"'colour' has shape \[3\] in Triton but 4 classes"):
        deploy(triton.http_url, "fashion", 3, repository=repository)
    shutil.rmtree(odd)

    argv = ["deploy", "--triton-url", triton.http_url, "--version", "1", "--repository", str(repository)]
    assert main(argv) == 0
    assert "fashion: version 1 ready" in capsys.readouterr().out
    assert main([*argv[:-3], "7", "--repository", str(repository)]) == 2  # no folder 7: refused, exit 2
    assert "does not exist" in capsys.readouterr().err
    assert deploy(triton.http_url, "fashion", 1).before == (1,)  # still serving 1
    assert (http("GET", ready.format(1))[0], http("GET", ready.format(2))[0]) == (200, 400)


@pytest.mark.server
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_request_sent_to_a_version_triton_unloaded_is_answered_by_the_new_one_after_exactly_one_retry(
    stack, protocol
):
    """The real refusal (the gateway's transport over ``protocol``, the real Triton) of a version a deploy
    unloaded: classified model_not_ready, counted once, and answered 200 by the version now served."""
    from export.deploy import deploy

    triton, repository = stack["triton"], stack["repository"]
    ensure_v2(stack)
    assert deploy(triton.http_url, "fashion", 1).ready == (1,)
    config = GatewayConfig(
        triton_url={"grpc": triton.grpc_url, "http": triton.http_url}[protocol],
        triton_protocol=protocol,
        model_repository=str(repository),
        metadata_refresh_s=3600,  # only the failed request can move this gateway to version 2
    )
    client = create_app(config).test_client()

    def retried() -> float:
        text = client.get("/metrics").get_data(as_text=True)
        return metric_value(text, "fashion_gateway_triton_errors_total", kind="model_not_ready")

    try:
        first = predict(client)
        assert (first["status"], first["model"]["version"], first["predictions"]["colour"]["label"]) == (
            200,
            1,
            "red",
        )
        assert deploy(triton.http_url, "fashion", 2).ready == (2,)  # Triton unloaded version 1
        answer = predict(client)
        assert answer["status"] == 200, answer
        assert (answer["model"]["version"], answer["predictions"]["colour"]["label"]) == (2, "red-2")
        assert retried() == 1
        again = predict(client)
        assert (again["status"], again["model"]["version"]) == (200, 2) and retried() == 1
    finally:
        deploy(triton.http_url, "fashion", 1)


@pytest.mark.server
def test_triton_refuses_a_version_it_does_not_serve_with_the_answers_the_unit_tests_use(stack):
    """``TRITON_REFUSALS`` is what this Triton really answers, over both protocols: to a version a deploy
    unloaded, and to one it never loaded."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from export.deploy import deploy
    from tests.test_gateway_stack import SIZE

    triton = stack["triton"]
    ensure_v2(stack)
    modules = {"grpc": grpcclient, "http": httpclient}
    clients = {
        "grpc": grpcclient.InferenceServerClient(triton.grpc_url),
        "http": httpclient.InferenceServerClient(triton.http_url),
    }
    batch = np.zeros((1, SIZE, SIZE, 3), np.uint8)

    def refusals(version: int) -> dict[str, tuple[str, str]]:
        """(status, message) of an inference and of a metadata call on ``version``, per protocol."""
        found = {}
        for protocol, client in clients.items():
            image = modules[protocol].InferInput("image", list(batch.shape), "UINT8")
            image.set_data_from_numpy(batch)
            with pytest.raises(InferenceServerException) as infer:
                client.infer("fashion", [image], model_version=str(version))
            with pytest.raises(InferenceServerException) as metadata:
                client.get_model_metadata("fashion", str(version))
            for call, refused in (("infer", infer.value), ("metadata", metadata.value)):
                found[f"{protocol} {call}"] = (str(refused.status()), refused.message())
        return found

    def expected(kind: str, version: int) -> dict[str, tuple[str, str]]:
        return {
            f"{protocol} {call}": (status, text.format(model="fashion", version=version))
            for (protocol, refusal), (status, text) in TRITON_REFUSALS.items()
            if refusal == kind
            for call in ("infer", "metadata")
        }

    try:
        assert deploy(triton.http_url, "fashion", 1).ready == (1,)
        assert deploy(triton.http_url, "fashion", 2).ready == (2,)
        assert refusals(1) == expected("unloaded", 1)  # served, then unloaded by the deploy
        assert refusals(9) == expected("unknown", 9)  # never loaded
    finally:
        for client in clients.values():
            client.close()
        deploy(triton.http_url, "fashion", 1)


def test_deploy_checks_versions_with_the_gateways_metadata_reader_and_skew_check(tmp_path):
    from export.deploy import DeployError, check_version_files
    from tests.fixtures_gateway import OUTPUTS

    write_metadata(tmp_path, version=1)
    config = {
        "input": [{"name": "image", "data_type": "TYPE_UINT8", "dims": [32, 32, 3]}],
        "output": [{"name": t, "data_type": "TYPE_FP32", "dims": [len(c)]} for _, _, _, t, c, _ in OUTPUTS],
    }
    check_version_files(tmp_path, "fashion", 1, config)  # fits: no error
    config["input"][0]["dims"] = [64, 64, 3]  # the served model takes another image size
    with pytest.raises(DeployError, match=r"input 'image' has shape \[64, 64, 3\] in Triton"):
        check_version_files(tmp_path, "fashion", 1, config)
    (tmp_path / "fashion" / "2").mkdir()
    (tmp_path / "fashion" / "2" / "metadata.json").write_text("{not json")
    with pytest.raises(DeployError, match="could not label version 2"):
        check_version_files(tmp_path, "fashion", 2, config)
