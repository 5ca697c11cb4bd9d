"""The listing's title through the gateway, with ``FakeTriton`` in place of Triton (no server started): the
request shapes of docs/api.md, the ids sent (``fashion.text``'s, as the trainer makes them), the ``inputs``
and ``conflict`` of the answers, a model that reads photos only, and hostile titles (always a 4xx JSON
error, never a 500). ``tests/test_title_serving.py`` does the same against the real Triton and gunicorn."""

from __future__ import annotations

import io
import json
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

from fashion.metadata import parse_metadata, skew
from fashion.text import TitleTokenizer
from gateway import create_app
from gateway.client import FashionClient, acceptable_title
from gateway.config import GatewayConfig
from gateway.errors import InvalidTitle
from tests.fixtures_gateway import FakeTriton, metric_value, solid, titled_metadata, write_metadata

RED, BLUE = (220, 30, 30), (30, 40, 220)


def make(tmp_path: Path, doc: dict) -> tuple:
    folder = tmp_path / "fashion" / "1"
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text(json.dumps(doc))
    fake = FakeTriton(doc)
    app = create_app(GatewayConfig(model_repository=str(tmp_path)), triton=fake)
    return app.test_client(), fake


@pytest.fixture
def titled(tmp_path):
    return make(tmp_path, titled_metadata())


@pytest.fixture
def photo_only(tmp_path):
    write_metadata(tmp_path)
    fake = FakeTriton()
    return create_app(GatewayConfig(model_repository=str(tmp_path)), triton=fake).test_client(), fake


def post(client, title=None, image=None, **fields):
    data = {"image": (io.BytesIO(image or solid(RED)), "red.jpg"), **fields}
    if title is not None:
        data["title"] = title
    return client.post("/v1/predict", data=data, content_type="multipart/form-data")


def tokenizer() -> TitleTokenizer:
    return TitleTokenizer.from_dict(titled_metadata()["title"]["tokenizer"])


def assert_error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body


# -- what is sent and answered ------------------------------------------------------------------------
def test_a_title_is_sent_as_the_trainers_ids_and_the_answer_says_both_inputs_were_used(titled):
    client, fake = titled
    response = post(client, "Brand 3 Red Tshirt")
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert list(body) == ["model", "inputs", "predictions", "timing_ms"]
    assert body["inputs"] == ["image", "title"]
    (call,) = fake.calls
    sent = call["extra_inputs"]["title"]
    assert sent.dtype == np.int64 and sent.shape == (1, 24)
    np.testing.assert_array_equal(sent[0], tokenizer().ids("Brand 3 Red Tshirt"))
    assert call["outputs"][-1] == "conflict"
    colour = body["predictions"]["colour"]
    assert colour["label"] == "red" and colour["conflict"] is False  # the title agrees with the photo
    assert body["predictions"]["brightness"]["conflict"] is False  # no threshold: never flagged


def test_a_title_that_names_another_colour_is_flagged_as_a_conflict(titled):
    client, _ = titled
    body = post(client, "Brand 3 Blue Tshirt").get_json()
    assert (
        body["predictions"]["colour"]["label"] == "red" and body["predictions"]["colour"]["conflict"] is True
    )


@pytest.mark.parametrize("title", [None, "", "!!! ---"])
def test_no_title_or_an_empty_one_is_the_photo_alone_with_zero_ids_and_no_conflict_field(titled, title):
    client, fake = titled
    body = post(client, title).get_json()
    assert body["inputs"] == ["image"]
    assert not fake.calls[0]["extra_inputs"]["title"].any()  # the contract: zeros, never a missing input
    assert all("conflict" not in p for p in body["predictions"].values())


def test_the_raw_image_body_takes_the_title_as_a_percent_encoded_query_parameter(titled):
    client, fake = titled
    title = "Bleu marine — chemise à carreaux"
    response = client.post(f"/v1/predict?title={quote(title)}", data=solid(RED), content_type="image/jpeg")
    assert response.status_code == 200 and response.get_json()["inputs"] == ["image", "title"]
    np.testing.assert_array_equal(fake.calls[0]["extra_inputs"]["title"][0], tokenizer().ids(title))


def test_a_batch_takes_one_titles_field_per_image_in_order(titled):
    client, fake = titled
    data = {
        "images": [(io.BytesIO(solid(c)), f"{i}.jpg") for i, c in enumerate((RED, BLUE, RED))],
        "titles": ["Blue Shirt", "", "Red Shirt"],
    }
    response = client.post("/v1/predict/batch", data=data, content_type="multipart/form-data")
    assert response.status_code == 200, response.get_data(as_text=True)
    results = response.get_json()["results"]
    assert [r["inputs"] for r in results] == [["image", "title"], ["image"], ["image", "title"]]
    assert [r["predictions"]["colour"].get("conflict") for r in results] == [True, None, False]
    sent = fake.calls[0]["extra_inputs"]["title"]
    np.testing.assert_array_equal(sent, tokenizer().batch(["Blue Shirt", "", "Red Shirt"]))


def test_a_full_batch_with_a_title_per_image_and_its_options_is_accepted(tmp_path):
    # Every image with its title plus top_k and category: twice max_batch_images parts and more. Werkzeug
    # counts multipart parts against MAX_FORM_PARTS; a bound of images + 16 refused full titled batches
    # with a 413 that blamed the body's size (seen with `fashion tag --gateway` on the shipped model).
    doc = titled_metadata()
    folder = tmp_path / "fashion" / "1"
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text(json.dumps(doc))
    config = GatewayConfig(model_repository=str(tmp_path), max_batch_images=16)
    client = create_app(config, triton=FakeTriton(doc)).test_client()
    data = {
        "images": [(io.BytesIO(solid(RED)), f"{i}.jpg") for i in range(16)],
        "titles": ["Red Shirt"] * 16,
        "top_k": "1",
        "category": "",
    }
    response = client.post("/v1/predict/batch", data=data, content_type="multipart/form-data")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert [r["inputs"] for r in response.get_json()["results"]] == [["image", "title"]] * 16


def test_a_body_with_too_many_parts_is_a_413_that_says_so_not_that_it_is_too_large(titled):
    client, fake = titled
    data = {"images": [(io.BytesIO(solid(RED)), "a.jpg")], "junk": [str(i) for i in range(200)]}
    response = client.post("/v1/predict/batch", data=data, content_type="multipart/form-data")
    assert_error(response, 413, "too_large")
    assert "parts" in response.get_json()["error"]["message"]
    assert not fake.calls


def test_a_batch_without_titles_sends_zero_titles(titled):
    client, fake = titled
    data = {"images": [(io.BytesIO(solid(c)), f"{i}.jpg") for i, c in enumerate((RED, BLUE))]}
    results = client.post("/v1/predict/batch", data=data, content_type="multipart/form-data").get_json()[
        "results"
    ]
    assert [r["inputs"] for r in results] == [["image"], ["image"]]
    assert (
        fake.calls[0]["extra_inputs"]["title"].shape == (2, 24)
        and not fake.calls[0]["extra_inputs"]["title"].any()
    )


def test_a_batch_whose_titles_do_not_pair_up_with_its_images_is_refused_before_any_work(titled):
    client, fake = titled
    data = {
        "images": [(io.BytesIO(solid(RED)), "a.jpg"), (io.BytesIO(solid(BLUE)), "b.jpg")],
        "titles": ["x"],
    }
    assert_error(client.post("/v1/predict/batch", data=data), 400, "title_count_mismatch")
    assert not fake.calls


def test_a_bad_title_in_a_batch_is_an_error_entry_and_the_other_images_are_tagged(titled):
    client, _ = titled
    data = {
        "images": [(io.BytesIO(solid(RED)), "a.jpg"), (io.BytesIO(solid(BLUE)), "b.jpg")],
        "titles": ["x" * 301, "Blue Shirt"],
    }
    results = client.post("/v1/predict/batch", data=data).get_json()["results"]
    assert results[0]["error"]["code"] == "title_too_long"
    assert results[1]["inputs"] == ["image", "title"]
    assert results[1]["predictions"]["colour"]["label"] == "blue"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert metric_value(metrics, "fashion_gateway_title_errors_total", code="title_too_long") == 1
    assert metric_value(metrics, "fashion_gateway_answers_total", inputs="image+title") == 1
    assert metric_value(metrics, "fashion_gateway_image_errors_total") == 0


def test_a_model_that_reads_photos_only_answers_a_title_from_the_photo_and_says_so(photo_only):
    client, fake = photo_only
    response = post(client, "Brand 3 Blue Tshirt")
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["inputs"] == ["image"] and "conflict" not in body["predictions"]["colour"]
    assert fake.calls[0]["extra_inputs"] == {}  # nothing but the image reaches a photo-only model


def test_models_describes_the_title_input_with_its_tokenizer_and_limit(titled, photo_only):
    title = titled[0].get("/v1/models").get_json()["models"][0]["title"]
    assert title["input"] == "title" and title["max_chars"] == 300 and title["shape"] == [-1, 24]
    assert TitleTokenizer.from_dict(title["tokenizer"]) == tokenizer()
    assert title["conflict"] == {"output": "conflict", "thresholds": {"colour": 0.5}}
    assert photo_only[0].get("/v1/models").get_json()["models"][0]["title"] is None


def test_readiness_needs_triton_to_serve_the_title_input_and_the_conflict_output(titled):
    client, fake = titled
    assert client.get("/readyz").status_code == 200
    meta = parse_metadata(fake.metadata)
    served = fake.model_metadata("fashion", 1)
    assert skew(meta, served) == []
    no_title = {**served, "inputs": served["inputs"][:1]}
    assert any("no input 'title'" in p for p in skew(meta, no_title))
    no_conflict = {**served, "outputs": served["outputs"][:-1]}
    assert any("no output 'conflict'" in p for p in skew(meta, no_conflict))
    photo_only = parse_metadata({k: v for k, v in fake.metadata.items() if k != "title"})
    assert any("inputs that metadata.json lacks: ['title']" in p for p in skew(photo_only, served))


# -- hostile titles: a 4xx JSON error, never a 500 ------------------------------------------------------
def test_a_title_over_the_documented_length_is_400_title_too_long(titled):
    client, _ = titled
    assert post(client, "x" * 300).status_code == 200
    assert_error(post(client, "x" * 301), 400, "title_too_long")
    assert_error(post(client, "é" * 301), 400, "title_too_long")  # characters, not bytes


@pytest.mark.parametrize("control", ["\x00", "\x1b[31m", "\x7f", "\x85"])
def test_a_title_with_control_characters_is_400_invalid_title(titled, control):
    client, _ = titled
    assert_error(post(client, f"Red{control}Shirt"), 400, "invalid_title")


def test_tabs_and_line_breaks_are_whitespace_in_a_title(titled):
    client, fake = titled
    assert post(client, "Red\tShirt\r\n").status_code == 200
    np.testing.assert_array_equal(fake.calls[0]["extra_inputs"]["title"][0], tokenizer().ids("Red Shirt"))


def test_a_multipart_title_that_is_not_utf8_is_400_invalid_title(titled):
    client, _ = titled
    boundary = "b0und4ry"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + solid(RED)
        + (f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="title"\r\n\r\n').encode()
        + b"Red \xff\xfe Shirt"
        + f"\r\n--{boundary}--\r\n".encode()
    )
    response = client.post("/v1/predict", data=body, content_type=f"multipart/form-data; boundary={boundary}")
    assert_error(response, 400, "invalid_title")


def test_a_query_title_that_is_not_utf8_is_400_invalid_title_and_a_percent_sign_is_text(titled):
    client, fake = titled
    response = client.post("/v1/predict?title=Red%FF%FEShirt", data=solid(RED), content_type="image/jpeg")
    assert_error(response, 400, "invalid_title")
    ok = client.post("/v1/predict?title=100%25%20Cotton", data=solid(RED), content_type="image/jpeg")
    assert ok.status_code == 200
    np.testing.assert_array_equal(fake.calls[-1]["extra_inputs"]["title"][0], tokenizer().ids("100% Cotton"))


def test_a_title_sent_as_a_file_or_twice_is_400_invalid_title(titled):
    client, _ = titled
    as_file = {"image": (io.BytesIO(solid(RED)), "a.jpg"), "title": (io.BytesIO(b"Red Shirt"), "t.txt")}
    assert_error(client.post("/v1/predict", data=as_file), 400, "invalid_title")
    twice = {"image": (io.BytesIO(solid(RED)), "a.jpg"), "title": ["Red", "Blue"]}
    assert_error(client.post("/v1/predict", data=twice), 400, "invalid_title")


def test_a_ten_megabyte_title_field_is_413_too_large_before_any_work(titled):
    client, fake = titled
    assert_error(post(client, "x" * (10 * 1024 * 1024)), 413, "too_large")
    assert not fake.calls


def test_a_photo_only_model_refuses_hostile_titles_all_the_same(photo_only):
    client, _ = photo_only
    assert_error(post(client, "x" * 301), 400, "title_too_long")
    assert_error(post(client, "a\x00b"), 400, "invalid_title")


# -- the Python client ----------------------------------------------------------------------------------
def test_fashion_client_takes_title_and_refuses_what_the_gateway_refuses(tmp_path):
    doc = titled_metadata()
    client = FashionClient(parse_metadata(doc), FakeTriton(doc))
    answer = client.predict(solid(RED), title="Blue T-shirt")
    assert answer["inputs"] == ["image", "title"] and answer["predictions"]["colour"]["conflict"] is True
    assert client.predict(solid(RED))["inputs"] == ["image"]
    with pytest.raises(InvalidTitle) as e:
        client.predict(solid(RED), title="x" * 301)
    assert (e.value.status, e.value.code) == (400, "title_too_long")
    with pytest.raises(InvalidTitle, match="not valid Unicode"):
        client.predict(solid(RED), title="\ud800 lone surrogate")


def test_an_acceptable_title_gives_the_ids_of_the_catalogue_title_it_was_made_from():
    from fashion.text import tokenize_all

    tok = tokenizer()
    for raw in ["Red\x00Shirt", "Navy\ufffdBlue", "y" * 400 + " Red", None, "", "plain Red Shirt"]:
        sent = acceptable_title(raw, tok)
        np.testing.assert_array_equal(tok.batch([sent]), tokenize_all(tok, [raw]))
        assert len(sent) <= tok.max_chars
