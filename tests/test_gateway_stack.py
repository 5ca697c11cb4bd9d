"""The real stack: the pip-installed Triton serving a tiny ONNX model, and the gateway under gunicorn.

No stand-in for Triton here. The model is built with ``onnx.helper`` (no torch): it scores an image by its
mean colour, so answers are predictable. Published with the export's own repository writer.
"""

from __future__ import annotations

import io
import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fashion.contract import Preprocessing
from fashion.schema import Attribute, LabelSchema
from tests.fixtures_gateway import metric_value, solid

pytestmark = pytest.mark.server

SIZE = 32
RED, GREEN, BLUE = (220, 30, 30), (30, 200, 40), (30, 40, 220)
SCHEMA = LabelSchema(
    (
        Attribute("colour", ("red", "green", "blue")),
        Attribute("Tshirts/neck", ("round", "polo"), label="neck", category="Tshirts"),
        Attribute("Sarees/border", ("zari", "solid"), label="border", category="Sarees"),
    ),
    category_column="Category",
)


def colour_model(path: Path) -> None:
    """uint8 NHWC image → per head softmax(mean colour @ W): "colour" picks the dominant channel."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[1, 2], keepdims=0),
    ]
    inits, outputs = [], []
    for a in SCHEMA.attributes:
        n = len(a.classes)
        w = np.eye(3, n, dtype=np.float32) / 10.0 if a.name == "colour" else np.zeros((3, n), np.float32)
        inits.append(numpy_helper.from_array(w, f"w_{a.tensor}"))
        nodes += [
            helper.make_node("MatMul", ["mean", f"w_{a.tensor}"], [f"logits_{a.tensor}"]),
            helper.make_node("Softmax", [f"logits_{a.tensor}"], [a.tensor], axis=1),
        ]
        outputs.append(helper.make_tensor_value_info(a.tensor, TensorProto.FLOAT, ["N", n]))
    graph = helper.make_graph(
        nodes,
        "colour",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", SIZE, SIZE, 3])],
        outputs,
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def publish(repository: Path, work: Path) -> None:
    from export.repository import write_model_version
    from fashion.metadata import build_metadata

    onnx_path = work / "model.onnx"
    colour_model(onnx_path)
    metadata = build_metadata(
        schema=SCHEMA,
        preprocessing=Preprocessing(image_size=SIZE),
        backbone="test",
        temperatures={},
        thresholds={},
        training={},
        export={},
    )
    write_model_version(
        repository,
        "fashion",
        schema=SCHEMA,
        image_size=SIZE,
        model_files={"fp32": onnx_path},
        metadata=metadata,
        warmup_image=np.zeros((SIZE, SIZE, 3), np.uint8),
    )


def http(
    method: str, url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 30
) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def multipart(field: str, images: list[bytes], **fields: str) -> tuple[bytes, dict]:
    boundary = "----fashion-test-boundary"
    body = io.BytesIO()
    for name, value in fields.items():
        body.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    for i, data in enumerate(images):
        body.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{i}.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n".encode()
        )
        body.write(data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture(scope="module")
def stack(colour_stack) -> Iterator[dict]:
    with colour_stack.gateway("gateway-stack", workers=2, threads=2, timeout_s=5) as gateway:
        # ready = /readyz answers 200
        yield {
            "url": gateway.url,
            "triton": colour_stack.triton(),
            "repository": colour_stack.repository,
            "work": colour_stack.work,
        }

def wait_ready(url: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status, _, body = http("GET", url + "/readyz")
        if status == 200 or time.monotonic() > deadline:
            return {**json.loads(body), "http_status": status}
        time.sleep(0.5)


def test_stack_predicts_from_multipart_and_raw_bodies(stack):
    url = stack["url"]
    assert wait_ready(url)["http_status"] == 200
    body, headers = multipart("image", [solid(RED)], top_k="2")
    status, response_headers, data = http("POST", url + "/v1/predict", body, headers)
    answer = json.loads(data)
    assert status == 200, answer
    assert answer["model"] == {"name": "fashion", "version": 1}
    assert (
        answer["predictions"]["colour"]["label"] == "red"
        and len(answer["predictions"]["colour"]["top_k"]) == 2
    )
    assert response_headers["X-Request-ID"]
    status, _, data = http(
        "POST", url + "/v1/predict?category=Sarees", solid(BLUE, fmt="PNG"), {"Content-Type": "image/png"}
    )
    assert status == 200 and list(json.loads(data)["predictions"]) == ["colour", "Sarees/border"]
    assert json.loads(data)["predictions"]["colour"]["label"] == "blue"


def test_stack_batch_keeps_order_and_isolates_a_bad_image(stack):
    body, headers = multipart("images", [solid(GREEN), b"\xff\xd8\xff truncated", solid(RED), solid(BLUE)])
    status, _, data = http("POST", stack["url"] + "/v1/predict/batch", body, headers)
    results = json.loads(data)["results"]
    assert status == 200
    assert [r.get("predictions", {}).get("colour", {}).get("label") for r in results] == [
        "green",
        None,
        "red",
        "blue",
    ]
    assert results[1]["error"]["code"] == "undecodable_image"


def test_stack_bad_inputs_get_4xx_json(stack):
    url = stack["url"] + "/v1/predict"
    cases = [(b"", "image/jpeg", 400), (b"text", "image/jpeg", 400), (b"text", "text/plain", 415)]
    for data, content_type, expected in cases:
        status, _, body = http("POST", url, data, {"Content-Type": content_type})
        assert status == expected and "error" in json.loads(body)
    status, _, body = http("POST", url + "?category=Shoes", solid(RED), {"Content-Type": "image/jpeg"})
    assert status == 422 and json.loads(body)["error"]["code"] == "unknown_category"


def test_stack_metrics_move_after_requests(stack):
    """Each request is counted once, by its status, in the sum over both workers' metric files."""
    url = stack["url"]
    request = {"endpoint": "/v1/predict", "method": "POST"}
    series = {
        "ok": ("fashion_gateway_request_duration_seconds_count", {**request, "status": "200"}),
        "refused": ("fashion_gateway_request_duration_seconds_count", {**request, "status": "415"}),
        "triton": ("fashion_gateway_stage_duration_seconds_count", {"stage": "triton"}),
        "images": ("fashion_gateway_images_per_request_sum", {"endpoint": "predict"}),
    }

    def scrape() -> dict[str, float]:
        text = http("GET", url + "/metrics")[2].decode()
        return {key: metric_value(text, name, **labels) for key, (name, labels) in series.items()}

    before = scrape()
    sent, refused = 6, 2
    for _ in range(sent):
        assert http("POST", url + "/v1/predict", solid(RED), {"Content-Type": "image/jpeg"})[0] == 200
    for _ in range(refused):
        assert http("POST", url + "/v1/predict", b"text", {"Content-Type": "text/plain"})[0] == 415
    after = scrape()
    moved = {key: after[key] - before[key] for key in series}
    assert moved == {"ok": sent, "refused": refused, "triton": sent, "images": sent}, (before, after)


def test_stack_readyz_reports_skewed_metadata(stack):
    # The gateway in-process (real transport, real Triton) reading a metadata file with one more head.
    from gateway import create_app
    from gateway.config import GatewayConfig

    skewed = stack["work"] / "skewed"
    shutil.copytree(
        stack["repository"] / "fashion" / "1",
        skewed / "fashion" / "1",
        ignore=shutil.ignore_patterns("*.onnx"),
    )
    path = skewed / "fashion" / "1" / "metadata.json"
    doc = json.loads(path.read_text())
    doc["outputs"].append({**doc["outputs"][0], "attribute": "pattern", "tensor": "pattern"})
    path.write_text(json.dumps(doc))
    triton = stack["triton"]
    config = GatewayConfig(triton_url=triton.grpc_url.replace("grpc://", ""), model_repository=str(skewed))
    response = create_app(config).test_client().get("/readyz")
    assert response.status_code == 503
    assert "version skew" in response.get_json()["reason"] and "pattern" in response.get_json()["reason"]


def test_stack_turns_not_ready_and_503_when_triton_stops(stack):
    url = stack["url"]
    stack["triton"].stop()
    status, headers, body = http("GET", url + "/readyz")
    assert status == 503 and json.loads(body)["status"] == "not_ready"
    start = time.monotonic()
    status, headers, body = http("POST", url + "/v1/predict", solid(RED), {"Content-Type": "image/jpeg"})
    assert status == 503 and "Retry-After" in headers and json.loads(body)["error"]["code"]
    assert time.monotonic() - start < 5
