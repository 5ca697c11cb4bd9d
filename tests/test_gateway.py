"""Unit tests of the gateway: its own logic, with ``FakeTriton`` in place of Triton (no server started).

The transport tests at the end use the real tritonclient against real sockets (a closed port, a server that
never answers, a gRPC server that is too slow) so that the error mapping is checked on real exceptions.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashion.metadata import MetadataError, load_metadata, parse_metadata, skew
from gateway import create_app
from gateway.client import FashionClient
from gateway.config import ConfigError, GatewayConfig
from gateway.errors import ModelUnavailable, UpstreamError, UpstreamTimeout
from gateway.triton import TritonTransport
from tests.fixtures_gateway import (
    FakeTriton,
    encode,
    metadata_dict,
    png_header_only,
    prediction_in_flight,
    solid,
    write_metadata,
)

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 40), (30, 40, 220)
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    write_metadata(tmp_path)
    return tmp_path


@pytest.fixture
def fake() -> FakeTriton:
    return FakeTriton()


def make_app(repository: Path, fake: FakeTriton, **settings):
    config = GatewayConfig(model_repository=str(repository), **settings)
    return create_app(config, triton=fake)


@pytest.fixture
def client(repository: Path, fake: FakeTriton):
    return make_app(repository, fake).test_client()


def multipart(field: str, *images: bytes, **options) -> dict:
    return {field: [(io.BytesIO(data), f"image{i}.jpg") for i, data in enumerate(images)], **options}


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


# -- isolation ---------------------------------------------------------------------------------------
def test_gateway_imports_neither_torch_nor_training_nor_export():
    code = (
        "import sys; import gateway; from gateway import create_app; import gateway.api, gateway.health, "
        "gateway.client, gateway.gunicorn_conf; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'training', 'export', 'timm')); "
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
        check=True,
        env={"PATH": "/usr/bin:/bin", "PROMETHEUS_MULTIPROC_DIR": "/tmp/unused-metrics"},
    )
    assert out.stdout.strip() == "", f"the gateway imported {out.stdout.strip()}"


def test_client_library_imports_without_flask():
    code = "import sys, gateway.client; print('flask' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, check=True
    )
    assert out.stdout.strip() == "False"


# -- predictions -------------------------------------------------------------------------------------
def test_predict_multipart_returns_the_documented_shape(client, fake):
    response = client.post("/v1/predict", data=multipart("image", solid(RED)))
    assert response.status_code == 200
    body = response.get_json()
    assert body["model"] == {"name": "fashion", "version": 1}
    assert set(body["timing_ms"]) == {"preprocess", "inference", "total"}
    assert body["timing_ms"]["total"] >= body["timing_ms"]["inference"] >= 0
    assert list(body["predictions"]) == ["colour", "brightness", "Tshirts/neck", "Sarees/border"]
    colour = body["predictions"]["colour"]
    assert set(colour) == {"label", "confidence", "top_k", "uncertain"}
    assert colour["label"] == "red" and colour["uncertain"] is False
    assert len(colour["top_k"]) == 3 and colour["top_k"][0] == {
        "label": "red",
        "confidence": colour["confidence"],
    }
    confidences = [t["confidence"] for t in colour["top_k"]]
    assert confidences == sorted(confidences, reverse=True)
    # threshold 0.9 on brightness: the fake's answer is never that sure
    assert body["predictions"]["brightness"]["uncertain"] is True
    call = fake.calls[-1]
    assert call["shape"] == (1, 32, 32, 3) and call["dtype"] == np.uint8 and call["input"] == "image"
    assert call["outputs"] == ["colour", "brightness", "Tshirts_neck", "Sarees_border"]
    assert call["version"] == 1


@pytest.mark.parametrize(
    "mimetype,fmt", [("image/jpeg", "JPEG"), ("image/png", "PNG"), ("image/webp", "WEBP")]
)
def test_predict_accepts_a_raw_body(client, mimetype, fmt):
    response = client.post("/v1/predict?top_k=1", data=solid(BLUE, fmt=fmt), content_type=mimetype)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["predictions"]["colour"]["label"] == "blue"
    assert len(response.get_json()["predictions"]["colour"]["top_k"]) == 1


@pytest.mark.parametrize(
    "image",
    [
        Image.new("CMYK", (50, 70), (0, 255, 255, 0)),
        Image.new("L", (50, 70), 128),
    ],
)
def test_predict_accepts_cmyk_and_grey_jpegs(client, image):
    response = client.post("/v1/predict", data=encode(image), content_type="image/jpeg")
    assert response.status_code == 200, response.get_json()


def test_predict_accepts_a_palette_png_with_transparency_and_16_bit_png(client):
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    palette.info["transparency"] = 0
    sixteen = Image.fromarray(np.full((30, 30), 40000, dtype=np.uint16))
    for data in (encode(palette, "PNG", transparency=0), encode(sixteen, "PNG")):
        response = client.post("/v1/predict", data=data, content_type="image/png")
        assert response.status_code == 200, response.get_json()


def test_top_k_is_clamped_to_the_number_of_classes(client):
    body = client.post("/v1/predict", data=multipart("image", solid(RED), top_k="50")).get_json()
    assert len(body["predictions"]["colour"]["top_k"]) == 3
    assert len(body["predictions"]["brightness"]["top_k"]) == 2


@pytest.mark.parametrize("top_k", ["0", "-1", "abc", "2.5", "101", ""])
def test_predict_returns_422_for_a_bad_top_k(client, fake, top_k):
    response = client.post("/v1/predict", data=multipart("image", solid(RED), top_k=top_k))
    assert_error(response, 422, "invalid_top_k")
    assert fake.calls == []


def test_category_returns_only_that_categorys_attributes(client):
    body = client.post("/v1/predict", data=multipart("image", solid(RED), category="Tshirts")).get_json()
    assert list(body["predictions"]) == ["colour", "brightness", "Tshirts/neck"]
    body = client.post("/v1/predict?category=Sarees", data=solid(RED), content_type="image/jpeg").get_json()
    assert list(body["predictions"]) == ["colour", "brightness", "Sarees/border"]


def test_predict_returns_422_for_an_unknown_category(client, fake):
    error = assert_error(
        client.post("/v1/predict", data=multipart("image", solid(RED), category="Shoes")),
        422,
        "unknown_category",
    )
    assert "Sarees" in error["message"] and "Tshirts" in error["message"]
    assert fake.calls == []


# -- batch -------------------------------------------------------------------------------------------
def test_batch_keeps_input_order_and_reports_a_bad_image_in_its_place(client, fake):
    images = [solid(RED), b"this is not an image", solid(GREEN, fmt="PNG"), solid(BLUE)]
    response = client.post("/v1/predict/batch", data=multipart("images", *images))
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert len(results) == 4
    assert [r["predictions"]["colour"]["label"] for r in (results[0], results[2], results[3])] == [
        "red",
        "green",
        "blue",
    ]
    assert results[1] == {
        "error": {"code": "undecodable_image", "message": "the bytes are not an image Pillow can read"}
    }
    assert len(fake.calls) == 1 and fake.calls[0]["shape"][0] == 3  # one Triton request for the good ones


def test_batch_of_only_bad_images_calls_no_triton(client, fake):
    response = client.post("/v1/predict/batch", data=multipart("images", b"", b"GIF89a"))
    assert response.status_code == 200
    assert [r["error"]["code"] for r in response.get_json()["results"]] == ["undecodable_image"] * 2
    assert fake.calls == []


def test_batch_refuses_more_images_than_configured(repository, fake):
    client = make_app(repository, fake, max_batch_images=2).test_client()
    response = client.post("/v1/predict/batch", data=multipart("images", *[solid(RED)] * 3))
    assert_error(response, 413, "too_many_images")


def test_batch_without_images_is_a_400(client):
    assert_error(
        client.post("/v1/predict/batch", data={"top_k": "2"}, content_type="multipart/form-data"),
        400,
        "missing_image",
    )
    assert_error(client.post("/v1/predict/batch", data=solid(RED), content_type="image/jpeg"), 415)


# -- bad input ---------------------------------------------------------------------------------------
def gif(frames: int = 2) -> bytes:
    images = [Image.new("P", (20, 20), i) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:])
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name,data,content_type,status,code",
    [
        ("empty body", b"", "image/jpeg", 400, "undecodable_image"),
        ("text posing as jpeg", b"hello, I am text", "image/jpeg", 400, "undecodable_image"),
        ("truncated jpeg", solid(RED, size=(300, 300))[:700], "image/jpeg", 400, "undecodable_image"),
        ("animated gif", gif(), "image/png", 415, "unsupported_image_format"),
        ("20000x20000 png", png_header_only(20000, 20000), "image/png", 413, "image_too_large"),
        ("text/plain", b"hello", "text/plain", 415, "unsupported_media_type"),
        ("json", b'{"image": "http://example.com/x.jpg"}', "application/json", 415, "unsupported_media_type"),
        ("gif content type", gif(1), "image/gif", 415, "unsupported_media_type"),
        ("no content type", solid(RED), "", 415, "unsupported_media_type"),
    ],
)
def test_bad_input_gets_a_4xx_json_error(client, fake, name, data, content_type, status, code):
    response = client.post(
        "/v1/predict", data=data, headers={"Content-Type": content_type} if content_type else {}
    )
    assert_error(response, status, code)
    assert fake.calls == []


def test_multipart_without_an_image_field_is_a_400(client):
    assert_error(
        client.post("/v1/predict", data={"top_k": "1"}, content_type="multipart/form-data"),
        400,
        "missing_image",
    )
    assert_error(
        client.post("/v1/predict", data=multipart("image", solid(RED), solid(RED))), 400, "too_many_images"
    )


def test_an_oversize_body_is_a_413(repository, fake):
    client = make_app(repository, fake, max_image_bytes=20_000).test_client()
    big = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    data = encode(Image.fromarray(big), "PNG")
    assert len(data) > 100_000
    assert_error(client.post("/v1/predict", data=data, content_type="image/png"), 413, "too_large")
    assert_error(client.post("/v1/predict", data=multipart("image", data)), 413, "too_large")
    # in a batch, the per-image limit makes an error entry
    results = client.post("/v1/predict/batch", data=multipart("images", data, solid(RED))).get_json()[
        "results"
    ]
    assert results[0]["error"]["code"] == "image_too_large" and "predictions" in results[1]


def test_unknown_routes_and_methods_answer_in_the_json_shape(client):
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    response = client.get("/v1/predict")
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


# -- Triton failures ---------------------------------------------------------------------------------
def test_triton_unreachable_is_a_503_with_retry_after(client, fake):
    fake.error = ModelUnavailable("Triton at x is unreachable", code="triton_unreachable")
    response = client.post("/v1/predict", data=solid(RED), content_type="image/jpeg")
    assert_error(response, 503, "triton_unreachable")
    assert response.headers["Retry-After"] == "1"


def test_triton_timeout_is_a_504(client, fake):
    fake.error = UpstreamTimeout("too slow")
    assert_error(
        client.post("/v1/predict", data=solid(RED), content_type="image/jpeg"), 504, "upstream_timeout"
    )
    assert_error(client.post("/v1/predict/batch", data=multipart("images", solid(RED))), 504)


def test_a_triton_error_is_a_502_and_never_a_500(client, fake):
    fake.error = UpstreamError("model raised")
    assert_error(
        client.post("/v1/predict", data=solid(RED), content_type="image/jpeg"), 502, "upstream_error"
    )


def test_a_served_output_with_the_wrong_class_count_is_a_502(repository, fake):
    fake.metadata = metadata_dict(
        outputs=[
            ("colour", "colour", None, "colour", ["a", "b"], None),
            ("brightness", "b", None, "brightness", ["d", "l"], None),
            ("Tshirts/neck", "n", "Tshirts", "Tshirts_neck", ["r"], None),
            ("Sarees/border", "b", "Sarees", "Sarees_border", ["z", "s"], None),
        ]
    )
    client = make_app(repository, fake).test_client()
    assert_error(
        client.post("/v1/predict", data=solid(RED), content_type="image/jpeg"), 502, "output_mismatch"
    )


def test_requests_over_the_inflight_limit_get_a_fast_429(repository, fake):
    app = make_app(repository, fake, max_inflight=1)
    with prediction_in_flight(app, fake, solid(RED)) as first:
        start = time.perf_counter()
        response = app.test_client().post("/v1/predict", data=solid(RED), content_type="image/jpeg")
        assert time.perf_counter() - start < 1.0
        assert_error(response, 429, "overloaded")
        assert response.headers["Retry-After"] == "1"
        assert app.test_client().get("/healthz").status_code == 200  # health is not limited
    assert first["response"].status_code == 200
    assert (
        app.test_client().post("/v1/predict", data=solid(RED), content_type="image/jpeg").status_code == 200
    )


# -- health, models, page, metrics -------------------------------------------------------------------
def test_healthz_and_readyz_when_everything_is_up(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ready", "model": {"name": "fashion", "version": 1}}


def test_readyz_is_not_ready_when_triton_is_down(client, fake):
    fake.error = ModelUnavailable("Triton at localhost:8001 is unreachable", code="triton_unreachable")
    response = client.get("/readyz")
    assert response.status_code == 503
    assert "unreachable" in response.get_json()["reason"]
    assert client.get("/healthz").status_code == 200


def test_readyz_is_not_ready_when_the_model_version_is_not_loaded(client, fake):
    fake.ready_versions = {2}
    body = client.get("/readyz").get_json()
    assert body["status"] == "not_ready" and "version 1 is not ready" in body["reason"]


def test_readyz_reports_version_skew(client, fake):
    fake.served_outputs = [
        {"name": "colour", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "brightness", "datatype": "FP32", "shape": [-1, 2]},
        {"name": "pattern", "datatype": "FP32", "shape": [-1, 5]},
    ]
    response = client.get("/readyz")
    assert response.status_code == 503
    reason = response.get_json()["reason"]
    assert "version skew" in reason
    assert "Tshirts_neck" in reason and "pattern" in reason and "'colour' has shape [-1, 4]" in reason


def test_readyz_without_metadata_says_why_and_predict_is_503(tmp_path, fake):
    client = make_app(tmp_path, fake).test_client()
    response = client.get("/readyz")
    assert response.status_code == 503 and "metadata" in response.get_json()["reason"]
    assert_error(
        client.post("/v1/predict", data=solid(RED), content_type="image/jpeg"), 503, "metadata_unavailable"
    )


def test_models_describes_attributes_classes_and_the_contract(client):
    model = client.get("/v1/models").get_json()["models"][0]
    assert model["name"] == "fashion" and model["version"] == 1
    assert model["preprocessing"]["image_size"] == 32 and model["preprocessing"]["resize_mode"] == "letterbox"
    assert model["attributes"][0] == {
        "name": "colour",
        "label": "colour",
        "category": None,
        "classes": ["red", "green", "blue"],
        "threshold": None,
    }
    assert model["categories"] == {"Tshirts": ["Tshirts/neck"], "Sarees": ["Sarees/border"]}


def test_the_upload_page_is_self_contained_html(client):
    response = client.get("/")
    assert response.status_code == 200 and response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert "/v1/predict" in page and 'type="file"' in page
    assert "http://" not in page and "https://" not in page  # no external assets
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]


def test_metrics_expose_latency_stage_and_image_histograms(client, fake):
    client.post("/v1/predict", data=solid(RED), content_type="image/jpeg")
    client.post("/v1/predict/batch", data=multipart("images", solid(RED), solid(BLUE), b"junk"))
    fake.error = UpstreamTimeout("slow")
    client.post("/v1/predict", data=solid(RED), content_type="image/jpeg")
    text = client.get("/metrics").get_data(as_text=True)
    assert (
        'fashion_gateway_request_duration_seconds_bucket{endpoint="/v1/predict",le="0.005",method="POST",'
        'status="200"}'
    ) in text
    assert (
        'fashion_gateway_request_duration_seconds_count{endpoint="/v1/predict",method="POST",status="504"} '
        "1.0" in text
    )
    for stage in ("decode", "resize", "triton", "postprocess"):
        assert f'fashion_gateway_stage_duration_seconds_count{{stage="{stage}"}}' in text
    assert 'fashion_gateway_images_per_request_sum{endpoint="predict_batch"} 3.0' in text
    assert 'fashion_gateway_image_errors_total{code="undecodable_image"} 1.0' in text
    assert 'fashion_gateway_triton_errors_total{kind="upstream_timeout"} 1.0' in text
    assert "fashion_gateway_inflight_requests 0.0" in text


# -- request id, auth ---------------------------------------------------------------------------------
def test_request_id_is_echoed_when_sane_and_generated_otherwise(client):
    assert (
        client.get("/healthz", headers={"X-Request-ID": "abc-123.x"}).headers["X-Request-ID"] == "abc-123.x"
    )
    for bad in ("", "a b", "x" * 200, "<script>"):
        rid = client.get("/healthz", headers={"X-Request-ID": bad}).headers["X-Request-ID"]
        assert rid != bad and len(rid) == 32
    error = client.post("/v1/predict", data=b"", content_type="image/jpeg")
    assert error.headers["X-Request-ID"]


def test_auth_off_by_default(client):
    assert client.post("/v1/predict", data=solid(RED), content_type="image/jpeg").status_code == 200


def test_api_keys_guard_the_api_but_not_health(repository, fake):
    client = make_app(repository, fake, api_keys="key-one, key-two").test_client()
    image = {"data": solid(RED), "content_type": "image/jpeg"}
    assert_error(client.post("/v1/predict", **image), 401, "unauthorized")
    assert_error(client.post("/v1/predict", headers={"Authorization": "Bearer nope"}, **image), 401)
    assert_error(client.get("/v1/models", headers={"X-API-Key": "key-on"}), 401)
    assert_error(client.post("/v1/predict", headers={"X-API-Key": "ключ"}, **image), 401)  # non-ASCII
    assert client.post("/v1/predict", headers={"Authorization": "Bearer key-two"}, **image).status_code == 200
    assert client.post("/v1/predict", headers={"X-API-Key": "key-one"}, **image).status_code == 200
    both = {"Authorization": "Bearer key-one", "X-API-Key": "key-one"}  # what the Helm test pod sends
    assert client.post("/v1/predict", headers=both, **image).status_code == 200
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.get("/").status_code == 200


def test_metrics_can_require_a_key(repository, fake):
    client = make_app(repository, fake, api_keys="k", metrics_require_key=True).test_client()
    assert_error(client.get("/metrics"), 401)
    assert client.get("/metrics", headers={"X-API-Key": "k"}).status_code == 200


# -- model versions -----------------------------------------------------------------------------------
def test_the_gateway_switches_to_a_newer_version_once_triton_has_it_ready(repository, fake):
    app = make_app(repository, fake, metadata_refresh_s=0.01)
    client = app.test_client()
    assert client.get("/readyz").get_json()["model"]["version"] == 1
    write_metadata(repository, version=2)
    fake.ready_versions = {1}
    time.sleep(0.02)
    body = client.post("/v1/predict", data=solid(RED), content_type="image/jpeg").get_json()
    assert body["model"]["version"] == 1 and fake.calls[-1]["version"] == 1  # v2 not loaded yet
    fake.ready_versions = {1, 2}
    time.sleep(0.02)
    body = client.post("/v1/predict", data=solid(RED), content_type="image/jpeg").get_json()
    assert body["model"]["version"] == 2 and fake.calls[-1]["version"] == 2


def test_a_pinned_version_is_used_even_when_a_newer_one_exists(repository, fake):
    write_metadata(repository, version=3)
    client = make_app(repository, fake, model_version="1").test_client()
    assert (
        client.post("/v1/predict", data=solid(RED), content_type="image/jpeg").get_json()["model"]["version"]
        == 1
    )


# -- metadata and config ------------------------------------------------------------------------------
def test_metadata_reader_picks_the_highest_version(tmp_path):
    for version in (1, 10, 2):
        write_metadata(tmp_path, version=version)
    (tmp_path / "fashion" / "11").mkdir()  # a version folder without metadata is ignored
    assert load_metadata(tmp_path, "fashion").version == 10
    assert load_metadata(tmp_path, "fashion", "2").version == 2


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.update(format="other@2"), "format"),
        (lambda d: d["input"].update(datatype="FP32"), "UINT8"),
        (lambda d: d["input"].update(shape=[-1, 64, 64, 3]), "UINT8 NHWC"),
        (lambda d: d["outputs"][0].update(classes=["a", "a"]), "duplicate"),
        (lambda d: d["outputs"][1].update(tensor="colour"), "not unique"),
        (lambda d: d["outputs"][0].update(threshold=2), "threshold"),
        (lambda d: d["categories"].update(Shoes=["Shoes/heel"]), "no output"),
        (lambda d: d.pop("outputs"), "malformed"),
        (lambda d: d["preprocessing"].update(resize_mode="stretch"), "malformed"),
    ],
)
def test_metadata_reader_refuses_a_bad_file_with_a_typed_error(change, message):
    data = metadata_dict()
    change(data)
    with pytest.raises(MetadataError, match=message):
        parse_metadata(data)


def test_metadata_in_the_wrong_folder_or_unreadable_is_refused(tmp_path):
    path = write_metadata(tmp_path, version=2)
    path.write_text(json.dumps(metadata_dict(version=1)))
    with pytest.raises(MetadataError, match="lies in the folder"):
        load_metadata(tmp_path, "fashion")
    path.write_text("{not json")
    with pytest.raises(MetadataError, match="not readable JSON"):
        load_metadata(tmp_path, "fashion")
    with pytest.raises(MetadataError, match=r"no fashion/<version>/metadata\.json"):
        load_metadata(tmp_path / "empty", "fashion")


def test_skew_is_empty_when_the_served_model_matches():
    meta = parse_metadata(metadata_dict())
    assert skew(meta, FakeTriton().model_metadata("fashion", 1)) == []


def test_config_precedence_is_defaults_then_env_then_arguments():
    env = {
        "FASHION_TRITON_PROTOCOL": "http",
        "FASHION_TIMEOUT_S": "2.5",
        "FASHION_MAX_INFLIGHT": "7",
        "FASHION_API_KEYS": " key-alpha-7f3, ,key-bravo-9c1 ",
        "FASHION_MODEL_VERSION": "",
        "FASHION_METRICS_REQUIRE_KEY": "true",
    }
    config = GatewayConfig.from_env(env, max_inflight=3)
    assert config.triton_url == "localhost:8000"  # the HTTP default port
    assert config.timeout_s == 2.5 and config.max_inflight == 3
    assert config.api_keys == ("key-alpha-7f3", "key-bravo-9c1")
    assert config.metrics_require_key is True and config.model_version == ""
    # Keys stay out of logs: a logged or printed config (repr, str, an f-string) names none of them.
    shown = (repr(config), str(config), f"{config}", f"{config!r}")
    assert not [key for key in config.api_keys for text in shown if key in text], shown[0]
    assert GatewayConfig.from_env({}).triton_url == "localhost:8001"
    assert GatewayConfig.from_env({}).max_request_bytes == 16 * 10 * 1024 * 1024 + 1024 * 1024


@pytest.mark.parametrize(
    "env,message",
    [
        ({"FASHION_TRITON_PROTOCOL": "tcp"}, "FASHION_TRITON_PROTOCOL"),
        ({"FASHION_TIMEOUT_S": "soon"}, "FASHION_TIMEOUT_S must be a float"),
        ({"FASHION_MAX_INFLIGHT": "0"}, "FASHION_MAX_INFLIGHT must be positive"),
        (
            {"FASHION_THREADS": "4", "FASHION_MAX_INFLIGHT": "4"},
            r"FASHION_MAX_INFLIGHT \(4\) must be below FASHION_THREADS \(4\)",
        ),
        ({"FASHION_THREADS": "1"}, "FASHION_THREADS must be at least 2"),
        ({"FASHION_MODEL_VERSION": "latest"}, "FASHION_MODEL_VERSION"),
        ({"FASHION_TRITON_URL": "http://triton:8000"}, "without a scheme"),
        ({"FASHION_PORT": "70000"}, "FASHION_PORT"),
    ],
)
def test_bad_settings_fail_at_start_up(env, message):
    with pytest.raises(ConfigError, match=message):
        GatewayConfig.from_env(env)


def test_the_client_library_gives_the_gateways_answer(repository, fake):
    client = FashionClient(load_metadata(repository, "fashion"), fake)
    answer = client.predict(solid(GREEN), top_k=2, category="Tshirts")
    assert answer["model"] == {"name": "fashion", "version": 1}
    assert answer["predictions"]["colour"]["label"] == "green"
    gateway = make_app(repository, FakeTriton()).test_client()
    body = gateway.post("/v1/predict", data=multipart("image", solid(GREEN), top_k="2", category="Tshirts"))
    assert body.get_json()["predictions"] == answer["predictions"]


# -- the real tritonclient against real sockets --------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BATCH = np.zeros((1, 32, 32, 3), np.uint8)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_transport_maps_a_closed_port_to_model_unavailable(protocol):
    transport = TritonTransport(f"127.0.0.1:{free_port()}", protocol, timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(ModelUnavailable) as info:
        transport.infer("fashion", 1, "image", BATCH, ["colour"], 1.0)
    assert info.value.code == "triton_unreachable" and time.monotonic() - start < 1.0
    with pytest.raises(ModelUnavailable):
        transport.server_ready()


def test_http_transport_maps_a_server_that_hangs_up_mid_request_to_unreachable():
    # What a Triton killed with the request in flight does: the connection closes before any answer.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        stop = threading.Event()

        def hang_up() -> None:
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                with conn:
                    conn.recv(65536)

        threading.Thread(target=hang_up, daemon=True).start()
        transport = TritonTransport(f"127.0.0.1:{server.getsockname()[1]}", "http", timeout_s=2.0)
        try:
            with pytest.raises(ModelUnavailable) as info:
                transport.infer("fashion", 1, "image", BATCH, ["colour"], 2.0)
        finally:
            stop.set()
    assert info.value.code == "triton_unreachable", info.value.message


def test_http_transport_maps_a_silent_server_to_a_timeout():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # accepts connections (the kernel does) and never answers
        transport = TritonTransport(f"127.0.0.1:{server.getsockname()[1]}", "http", timeout_s=0.3)
        start = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            transport.infer("fashion", 1, "image", BATCH, ["colour"], 0.3)
        assert time.monotonic() - start < 2.0


def test_grpc_transport_maps_a_slow_server_to_a_timeout():
    import grpc

    release = threading.Event()

    def slow(request, context):
        release.wait(5)
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(slow)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        transport = TritonTransport(f"127.0.0.1:{port}", "grpc", timeout_s=0.3)
        start = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            transport.infer("fashion", 1, "image", BATCH, ["colour"], 0.3)
        assert time.monotonic() - start < 2.0
    finally:
        release.set()
        server.stop(0)


def test_multi_megabyte_photos_pass_the_multipart_parser(client):
    noise = np.random.default_rng(1).integers(0, 255, (1200, 900, 3), dtype=np.uint8)
    photo = encode(Image.fromarray(noise), "JPEG", quality=95)
    assert len(photo) > 1_000_000
    assert client.post("/v1/predict", data=multipart("image", photo)).status_code == 200
    response = client.post("/v1/predict/batch", data=multipart("images", photo, photo))
    assert response.status_code == 200 and all("predictions" in r for r in response.get_json()["results"])
